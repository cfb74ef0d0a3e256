"""Event ids: ``<epoch>-<seq>``, as sent in SSE ``id:`` lines and read back from Last-Event-ID.

The epoch names one incarnation of a task's stream (it changes when the stream is created anew);
the sequence counts that stream's events 1, 2, 3, ... without gaps. Anything a client sends is
parsed here before it can reach Redis.
"""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

from .errors import InvalidEventId

MAX_ID_LENGTH = 64
#: Sequence numbers stay well inside what Redis ids, JSON numbers and JavaScript hold exactly.
MAX_SEQ = 10**15 - 1
_EPOCH = re.compile(r"[0-9a-z]{1,16}\Z")
_SEQ = re.compile(r"[1-9][0-9]{0,14}\Z")


class EventId(NamedTuple):
    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"


def new_epoch() -> str:
    """A fresh epoch: 8 random hex digits."""
    return secrets.token_hex(4)


def parse_event_id(raw: str) -> EventId:
    """Parse a client's Last-Event-ID; raise :class:`InvalidEventId` with a plain reason."""
    if len(raw) > MAX_ID_LENGTH:
        raise InvalidEventId(f"event id is longer than {MAX_ID_LENGTH} characters")
    if not raw.isprintable() or not raw.isascii():
        raise InvalidEventId("event id contains control or non-ASCII characters")
    epoch, sep, seq = raw.partition("-")
    if not sep or not _EPOCH.match(epoch):
        raise InvalidEventId("event id must look like <epoch>-<sequence>, e.g. 3f9a02bc-17")
    if not _SEQ.match(seq):
        raise InvalidEventId(f"event id sequence must be a whole number from 1 to {MAX_SEQ}")
    return EventId(epoch, int(seq))
