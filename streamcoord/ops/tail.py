"""Following one task's events straight from Redis, each exactly once, until its end.

No gateway is involved: the tail reads the task's stream with XRANGE (its history, a page at a
time) and then XREAD BLOCK on that one key, from a concrete last id, so nothing falls between
the two. The sequence numbers make it exact: within an epoch they count 1, 2, 3, ... without
gaps, and a worker that takes a task over (an ``attempt`` event) goes on numbering the same
stream, so a takeover is just the next event.

What the tail cannot go on from is told as a :class:`Reset` (the reasons are the gateway's,
:class:`streamcoord.resets.ResetReason`), never passed over in silence:

* ``epoch``: the stream was created anew (a retry, or Redis lost it and the writer started a
  new epoch). The tail starts over from the new stream's first event.
* ``position``: the stream, in the same epoch, now ends before the last event shown (Redis lost
  its tail). The tail starts over from the stream's first event.
* ``trimmed``: events after the last one shown are no longer in the stream
  (``STREAMCOORD_MAX_STREAM_LENGTH``): the tail says which, and goes on after them.

It ends at the terminal event (``complete``, ``error``, ``cancelled``), or with :class:`Stopped`
when none can come (the task is gone, its stream expired, or it ended before ``from_seq``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from ..keys import KeySpace, TaskRef
from ..resets import ResetReason
from ..taskstate import ENDED, Field
from .events import StreamEvent, events_of

#: Entries read per XRANGE page and per XREAD.
PAGE = 500


@dataclasses.dataclass(frozen=True, slots=True)
class Reset:
    """The tail could not go on from where it was (see the module's docstring)."""

    reason: ResetReason
    epoch: str  #: the epoch of the events shown so far ('' before any)
    new_epoch: str = ""  #: the epoch it goes on with ('' when not known yet)
    missing: tuple[int, int] | None = None  #: for ``trimmed``: the sequences gone (first, last)

    def to_json(self) -> dict[str, Any]:
        missing = list(self.missing) if self.missing else None
        return {"reset": {"reason": str(self.reason), "epoch": self.epoch, "new_epoch": self.new_epoch, "missing": missing}}


class StopReason(enum.StrEnum):
    """Why a tail ended without a terminal event."""

    #: the task has no stream and no record (never known, expired, or deleted)
    GONE = "gone"
    #: the task ended and its stream expired before the tail reached the terminal event
    EXPIRED = "expired"
    #: the task ended before the sequence the tail was asked to start from
    PAST_END = "past_end"


@dataclasses.dataclass(frozen=True, slots=True)
class Stopped:
    """The tail ends with no terminal event to give (see :class:`StopReason`)."""

    reason: StopReason
    state: str  #: the record's state ('' when there is no record)
    last_seq: int = 0  #: the record's last sequence

    def to_json(self) -> dict[str, Any]:
        return {"stopped": {"reason": str(self.reason), "state": self.state, "last_seq": self.last_seq}}


TailItem = StreamEvent | Reset | Stopped


@dataclasses.dataclass
class Position:
    """Where a tail stands: the epoch and sequence of the last event it gave."""

    epoch: str = ""
    seq: int = 0


def take(position: Position, events: list[StreamEvent]) -> tuple[list[TailItem], bool]:
    """What to give for ``events`` (read after ``position``), moving ``position`` on; and
    whether to read the stream again from its start (an epoch change). Pure: the heart of the
    tail, tested on its own. Stops after a terminal event or a restart."""
    items: list[TailItem] = []
    for event in events:
        if position.epoch and event.epoch != position.epoch:
            items.append(Reset(ResetReason.EPOCH, position.epoch, event.epoch))
            position.epoch, position.seq = event.epoch, 0
            return items, True
        if event.seq <= position.seq:
            continue  # already given (never, from an exclusive read; kept for safety)
        if event.seq != position.seq + 1:
            items.append(Reset(ResetReason.TRIMMED, position.epoch, event.epoch, (position.seq + 1, event.seq - 1)))
        position.epoch, position.seq = event.epoch, event.seq
        items.append(event)
        if event.terminal:
            break
    return items, False


def after(seq: int) -> str:
    """The exclusive XRANGE start after sequence ``seq`` (``-`` for the whole stream)."""
    return f"({seq}-0" if seq else "-"


async def follow(
    redis: Redis, keys: KeySpace, ref: TaskRef, *, from_seq: int = 1, block_ms: int = 1000,
) -> AsyncIterator[TailItem]:
    """The task's events from sequence ``from_seq`` on (in the stream's current epoch), each
    once and in order, with resets where the stream breaks, until its terminal event (or a
    :class:`Stopped` when none can come)."""
    key = keys.events(ref)
    position = Position(seq=max(from_seq - 1, 0))
    while True:
        entries: Any = await redis.xrange(key, min=after(position.seq), max="+", count=PAGE)
        if not entries:
            entries = await _wait(redis, key, position, block_ms)
        if entries:
            items, restart = take(position, events_of(entries))
            for item in items:
                yield item
                if isinstance(item, StreamEvent) and item.terminal:
                    return
            if restart or items:
                continue
        # Nothing new: has the stream been replaced or cut under the tail, or is the task gone?
        problem = await _check(redis, keys, ref, position)
        if isinstance(problem, Stopped):
            yield problem
            return
        if problem is not None:
            yield problem
            position.epoch, position.seq = problem.new_epoch, 0


async def _wait(redis: Redis, key: str, position: Position, block_ms: int) -> Any:
    """XREAD BLOCK after the position, on the one key; the entries it returned."""
    reply: Any = await redis.xread({key: f"{position.seq}-0"}, count=PAGE, block=block_ms)
    return [entry for _key, entries in reply or () for entry in entries]


async def _check(redis: Redis, keys: KeySpace, ref: TaskRef, position: Position) -> Reset | Stopped | None:
    """After a wait with nothing new: a reset when the stream was replaced by a shorter one of
    another epoch, or lost its tail; :class:`Stopped` when nothing more can come; else None
    (wait on)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(keys.state(ref), [Field.STATE, Field.EPOCH, Field.LAST_SEQ])
    pipe.exists(keys.events(ref))
    (raw_state, raw_epoch, raw_last), exists = await pipe.execute()
    state = (raw_state or b"").decode()
    epoch = (raw_epoch or b"").decode()
    last_seq = int(raw_last or 0)
    if not state and not exists:
        return Stopped(StopReason.GONE, "")
    if state in ENDED and not exists:
        return Stopped(StopReason.EXPIRED, state, last_seq)
    if not exists:
        return None  # not begun yet (pending, queued, or retried: its new stream comes)
    if not position.epoch:  # nothing given yet: waiting for the sequence asked for
        if state in ENDED and last_seq < position.seq + 1:
            return Stopped(StopReason.PAST_END, state, last_seq)
        return None
    if epoch and epoch != position.epoch:
        return Reset(ResetReason.EPOCH, position.epoch, epoch)
    if epoch == position.epoch and last_seq < position.seq:
        return Reset(ResetReason.POSITION, position.epoch, epoch)
    return None
