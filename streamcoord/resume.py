"""Where a client starts in a task's stream: a join, ``?replay=latest``, or a resume after its
Last-Event-ID.

When the hub follows the stream and its window of recent frames covers the client's position,
the client starts from memory, already listening, with no read of history: one small read,
shared, confirms that Redis still holds the stream the window saw. Otherwise the task's state
record and the tail of its stream are read in one round trip (a :class:`Snapshot`), shared with
every feed of the stream opening at that moment (a reconnect storm costs one read), and the
client is placed in it: it goes on from its position, or is given a verdict first (a reset,
nothing left to send, the outcome of an expired stream). A shared read may be older than what
the client has (a new run, an event it got elsewhere), so a verdict is only given on a read of
the feed's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple

from . import sse
from .codec import Frame, Skipped, entry_frames
from .errors import UnknownTask
from .eventlog import EventLog
from .history import History
from .hub import POSITION_FIELDS, Hub, ListenerFactory, Position
from .ids import EventId
from .keys import TaskRef
from .listener import Listener
from .resets import ResetReason, reset_frame, resume_reset
from .taskstate import TaskState
from .window import history_bytes, newest_within


class Snapshot(NamedTuple):
    """A task's state record and the latest frames of its stream, read in one round trip."""

    state: TaskState | None
    tail: list[Frame]  # oldest first; as many as fit in half a client's history bytes
    #: Malformed entries of the tail, left out (the caller reports them to the hub's log).
    skipped: tuple[Skipped, ...] = ()


async def read_snapshot(log: EventLog, ref: TaskRef) -> Snapshot:
    pipe = log.redis.pipeline(transaction=False)
    pipe.hgetall(log.keys.state(ref))
    pipe.xrevrange(log.keys.events(ref), "+", "-", count=max(log.settings.window_events, 1))
    raw_state, entries = await pipe.execute()  # bytes: clients never decode replies
    tail, skipped = entry_frames(entries[::-1])
    # A feed holds its tail until it has sent the history before it: at most half of what a
    # client's history may hold (big frames: fewer of them, the rest is read page by page).
    tail = newest_within(tail, history_bytes(log.settings) // 2)
    return Snapshot(TaskState.from_hash(raw_state), tail, tuple(skipped))


async def read_position(log: EventLog, ref: TaskRef, hub: Hub) -> Position:
    """The stream's epoch and last sequence in Redis, with how far the hub's window reached
    when the read was sent."""
    before = hub.window_last(log.keys.events(ref))
    reply: Any = await log.redis.hmget(log.keys.state(ref), POSITION_FIELDS)
    epoch, last_seq = reply  # bytes: clients never decode replies
    # A record written by hand (a junk last_seq) confirms nothing: the feed reads Redis.
    return Position(epoch or b"", int(last_seq) if (last_seq or b"").isdigit() else 0, before)


@dataclasses.dataclass(slots=True)
class Start:
    """Where a client starts, and what it is sent before the rest of its stream."""

    history: History
    #: The state record read (None when the client starts from the hub's window).
    state: TaskState | None = None
    #: The epoch of the client's position (of the stream's state record, when read).
    epoch: bytes = b""
    #: The sequence the client has: sent, or skipped over by its choice.
    last: int = 0
    #: Frames decided now, sent before anything else: a reset, an expired stream's outcome.
    preface: list[bytes] = dataclasses.field(default_factory=list)
    #: The reasons of the resets in ``preface`` (for the gateway's counters).
    resets: list[ResetReason] = dataclasses.field(default_factory=list)
    #: History to send first (from the snapshot or the window), oldest first.
    first: list[Frame] = dataclasses.field(default_factory=list)
    #: The terminal event is out, or is all that is left to send.
    ended: bool = False
    #: Listening already: the client starts from the hub's window.
    listener: Listener | None = None

    def reset(self, reason: ResetReason, ref: TaskRef) -> None:
        """Tell the client ``reason`` first."""
        self.preface.append(reset_frame(reason, self.epoch, ref))
        self.resets.append(reason)

    @property
    def goes_on(self) -> bool:
        """The client simply goes on in the stream: no verdict was given."""
        return not self.ended and not self.preface


async def find_start(
    log: EventLog, hub: Hub, ref: TaskRef, last_id: EventId | None, latest: bool,
    make: ListenerFactory | None = None,
) -> Start:
    """Decide where the client starts; raise :class:`UnknownTask` if the task has neither a
    state record nor events. ``make``: builds its listener (see
    :meth:`streamcoord.hub.Hub.subscribe`)."""
    key = log.keys.events(ref)
    if hub.has_window(key):
        # The window only knows what the hub read: confirm with Redis (one small read,
        # shared) that the stream was not created anew or cut back under it since.
        confirmed, _ = await hub.position_reads.run(key, functools.partial(read_position, log, ref, hub))
        attached = hub.attach(key, last_id, latest, confirmed, make)
        if attached is not None:
            return _from_window(History(log, hub, ref, []), last_id, *attached)
    snapshot, shared = await hub.history_reads.run(key, functools.partial(read_snapshot, log, ref))
    hub.stats["history_shared" if shared else "history_reads"] += 1
    hub.skips.report(key, snapshot.skipped)  # each kind logged once, however many shared it
    if shared:
        with contextlib.suppress(UnknownTask):
            start = await place(History(log, hub, ref, snapshot.tail), ref, snapshot.state, last_id, latest)
            if start.goes_on:
                return start
        # A verdict from a read that may be older than what the client has: only a read of
        # our own may give it.
        hub.stats["history_reads"] += 1
        snapshot = await read_snapshot(log, ref)
        hub.stats["history_read_events"] += len(snapshot.tail) + len(snapshot.skipped)  # as the shared reads count
        hub.skips.report(key, snapshot.skipped)
    return await place(History(log, hub, ref, snapshot.tail), ref, snapshot.state, last_id, latest)


def _from_window(history: History, last_id: EventId | None, listener: Listener, frames: list[Frame]) -> Start:
    """A start from the hub's window: ``frames`` reach the hub's position."""
    start = Start(history, listener=listener, first=frames)
    if last_id is not None:
        start.last, start.epoch = last_id.seq, last_id.epoch.encode()
    elif frames:
        start.last, start.epoch = frames[0].seq - 1, frames[0].epoch
    return start


async def place(
    history: History, ref: TaskRef, state: TaskState | None, last_id: EventId | None, latest: bool
) -> Start:
    """Place the client in a snapshot (``state``, and ``history.tail``). Raises
    :class:`UnknownTask` when the snapshot holds neither."""
    tail = history.tail
    if state is None and not tail:
        raise UnknownTask(f"no task {ref}")
    start = Start(history, state, epoch=state.epoch.encode() if state and state.epoch else b"")
    last_seq = state.last_seq if state else 0
    after = last_id.seq if last_id else 0
    page = tail[-1:] if latest and not last_id else await history.first_page(after)
    if last_id is not None:
        reason = resume_reset(last_id, start.epoch, last_seq, page)
        if reason is None and state is not None and state.ended and after == last_seq:
            start.ended = True  # the client has the terminal event: nothing to send
            return start
        if reason is not None:
            start.reset(reason, ref)
            page, after = await history.first_page(0), 0
    if not page and state is not None and state.ended and state.end_data:
        # The stream expired but the state record kept the outcome: say so, then send it.
        if not start.preface:
            start.reset(ResetReason.EXPIRED, ref)
        outcome_id = b"%s-%d" % (start.epoch, last_seq)
        start.preface.append(sse.encode_event(state.end_data, event=state.last_type.encode(), id=outcome_id))
        start.ended = True
        return start
    start.first = page
    start.last = page[0].seq - 1 if page else after
    return start
