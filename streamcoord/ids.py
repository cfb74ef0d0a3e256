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


# -- composite ids: one connection following many tasks (GET /streams) ------------------------
#
# An event of a multiplexed stream carries the position of the whole connection: for every task
# the client was sent events of, ``<tag>-<epoch>-<seq>`` (its last one), joined by ``.``::
#
#     0k3j9xa-3f9a02bc-17.1zz9x0q-9c0e11aa-3
#
# ``tag`` names the task in 7 characters: FNV-1a (32 bits) of its label (``app.Model:pk``, UTF-8)
# in base 36, zero-padded. It is not a secret (the token is) and it is cheap to compute in any
# language, so a client that changes the set of tasks it follows can drop the parts of tasks it
# no longer follows. Every character is URL-safe, so the id also travels as ``?last_event_id=``.

#: Characters of a task's tag in a composite id.
TAG_CHARS = 7
#: Separates the tasks' parts of a composite id.
PART_SEPARATOR = "."
#: The longest part: a tag, an epoch, a sequence, their separators, and the one before it.
MAX_PART_CHARS = TAG_CHARS + 1 + 16 + 1 + 15 + 1
_PART = re.compile(r"([0-9a-z]{7})-([0-9a-z]{1,16})-([1-9][0-9]{0,14})\Z")
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def task_tag(label: str) -> str:
    """The 7-character tag of the task ``label`` (``app.Model:pk``) in composite ids."""
    value = _FNV_OFFSET
    for byte in label.encode():
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    digits = []
    while value:
        value, digit = divmod(value, 36)
        digits.append(_BASE36[digit])
    return "".join(reversed(digits)).rjust(TAG_CHARS, "0")


def composite_part(tag: bytes, epoch: bytes, seq: int | bytes) -> bytes:
    """One task's part of a composite id."""
    return b"%s-%s-%s" % (tag, epoch, seq if isinstance(seq, bytes) else b"%d" % seq)


def parse_composite_id(raw: str, max_parts: int) -> dict[str, EventId]:
    """Parse a multiplexed stream's Last-Event-ID: each task's tag and its last event. Raises
    :class:`InvalidEventId` with a plain reason for anything a gateway would not send."""
    if len(raw) > max_parts * MAX_PART_CHARS:
        raise InvalidEventId(f"event id is longer than {max_parts * MAX_PART_CHARS} characters")
    if not raw.isprintable() or not raw.isascii():
        raise InvalidEventId("event id contains control or non-ASCII characters")
    parts = raw.split(PART_SEPARATOR)
    if len(parts) > max_parts:
        raise InvalidEventId(f"event id names more than {max_parts} tasks")
    positions: dict[str, EventId] = {}
    for part in parts:
        match = _PART.match(part)
        if match is None:
            raise InvalidEventId(
                "a multiplexed stream's event id is <tag>-<epoch>-<sequence> per task, joined by"
                " '.', e.g. 0k3j9xa-3f9a02bc-17.1zz9x0q-9c0e11aa-3"
            )
        tag, epoch, seq = match.groups()
        if tag in positions:
            raise InvalidEventId(f"event id names task {tag} twice")
        positions[tag] = EventId(epoch, int(seq))
    return positions
