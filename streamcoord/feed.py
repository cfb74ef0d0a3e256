"""One client's view of a task: retained history, then live events, exactly once each.

:meth:`Feed.open` decides where the client starts. When the hub follows the stream and its
window of recent frames covers the client's position, the feed starts from memory, with no
Redis read at all. Otherwise it reads the task's state and the tail of its stream in one round
trip, shared with every feed of the same stream opening at that moment (a reconnect storm
costs one read). Iterating the feed yields ready-to-write SSE chunks until the terminal event.
The hub may hand over events the client already has (skipped by sequence) or start past the
client (the gap is read from Redis), so nothing is lost and nothing is sent twice.

When the client's Last-Event-ID points at history that no longer exists (another epoch, a
trimmed range, a position past the end) the feed sends ``event: reset`` with the reason, then
everything retained. A shared read may be older than what the client has, so such a verdict
(and "nothing left", and the outcome of an expired stream) is only given on a read of the
feed's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from . import sse
from .codec import Frame, entry_frame
from .errors import UnknownTask
from .eventlog import EventLog
from .hub import Hub, Listener, Position
from .ids import EventId
from .keys import TaskRef
from .taskstate import TaskState
from .window import frames_after

HISTORY_PAGE = 1000


class Snapshot(NamedTuple):
    """A task's state record and the latest frames of its stream, read in one round trip."""

    state: TaskState | None
    tail: list[Frame]  # oldest first


async def read_snapshot(log: EventLog, ref: TaskRef) -> Snapshot:
    pipe = log.redis.pipeline(transaction=False)
    pipe.hgetall(log.keys.state(ref))
    pipe.xrevrange(log.keys.events(ref), "+", "-", count=max(log.settings.window_events, 1))
    raw_state, entries = await pipe.execute()  # bytes: clients never decode replies
    tail = [entry_frame(entry_id, fields) for entry_id, fields in reversed(entries)]
    return Snapshot(TaskState.from_hash(raw_state), tail)


async def read_position(log: EventLog, ref: TaskRef, hub: Hub) -> Position:
    """The stream's epoch and last sequence in Redis, with how far the hub's window reached
    when the read was sent."""
    before = hub.window_last(log.keys.events(ref))
    reply: Any = await log.redis.hmget(log.keys.state(ref), ["epoch", "last_seq"])
    epoch, last_seq = reply  # bytes: clients never decode replies
    return Position(epoch or b"", int(last_seq or 0), before)


class Feed:
    """Where one client starts in a task's stream, and the chunks it is sent from there."""

    def __init__(self, log: EventLog, hub: Hub, ref: TaskRef, state: TaskState | None) -> None:
        self.log = log
        self.hub = hub
        self.ref = ref
        self.state = state
        self.listener: Listener | None = None
        self._key = log.keys.events(ref)
        self._epoch = state.epoch.encode() if state and state.epoch else b""
        self._last = 0  # sequence of the last event sent (or skipped over by the client's choice)
        self._pending: list[bytes] = []  # frames decided at open time, sent first
        self._first: list[Frame] = []  # history to send first
        self._tail: list[Frame] = []  # the snapshot's tail: where history reading ends
        self.ended = False  # the terminal event is out (or is all that is left to send)

    @property
    def empty(self) -> bool:
        """Nothing to send at all: the client already has the terminal event."""
        return self.ended and not self._pending

    @classmethod
    async def open(
        cls, log: EventLog, hub: Hub, ref: TaskRef, *, last_id: EventId | None = None, latest: bool = False
    ) -> Feed:
        """Decide where the client starts; raise :class:`UnknownTask` if the task has neither
        a state record nor events."""
        key = log.keys.events(ref)
        if hub.has_window(key):
            # The window only knows what the hub read: confirm with Redis (one small read,
            # shared) that the stream was not created anew or cut back under it since.
            confirmed, _ = await hub.position_reads.run(key, functools.partial(read_position, log, ref, hub))
            attached = hub.attach(key, last_id, latest, confirmed)
            if attached is not None:
                return cls._attached(log, hub, ref, last_id, *attached)
        snapshot, shared = await hub.history_reads.run(key, functools.partial(read_snapshot, log, ref))
        hub.stats["history_shared" if shared else "history_reads"] += 1
        if shared:
            feed = cls(log, hub, ref, snapshot.state)
            with contextlib.suppress(UnknownTask):
                if await feed._position(last_id, latest, snapshot):
                    return feed
            # A verdict from a read that may be older than what the client has (a new run, an
            # event it got elsewhere): only a read of our own may give it.
            hub.stats["history_reads"] += 1
            snapshot = await read_snapshot(log, ref)
        feed = cls(log, hub, ref, snapshot.state)
        await feed._position(last_id, latest, snapshot)
        return feed

    @classmethod
    def _attached(
        cls, log: EventLog, hub: Hub, ref: TaskRef, last_id: EventId | None, listener: Listener,
        frames: list[Frame],
    ) -> Feed:
        """A feed that starts from the hub's window, already listening."""
        feed = cls(log, hub, ref, None)
        feed.listener, feed._first = listener, frames
        if last_id is not None:
            feed._last, feed._epoch = last_id.seq, last_id.epoch.encode()
        elif frames:
            feed._last, feed._epoch = frames[0].seq - 1, frames[0].epoch
        return feed

    async def _position(self, last_id: EventId | None, latest: bool, snapshot: Snapshot) -> bool:
        """Place the feed from ``snapshot``: True when the client simply goes on in the stream,
        False when it was given a verdict (a reset, nothing left to send, the outcome of an
        expired stream). Raises :class:`UnknownTask`."""
        state, self._tail = snapshot
        if state is None and not snapshot.tail:
            raise UnknownTask(f"no task {self.ref}")
        last_seq = state.last_seq if state else 0
        after = last_id.seq if last_id else 0
        if latest and not last_id:
            page = self._tail[-1:]
        else:
            page = await self._history(after)
        if last_id is not None:
            reason = ""
            if not self._epoch or last_id.epoch.encode() != self._epoch:
                reason = "epoch"  # the stream this id came from no longer exists
            elif last_id.seq > last_seq:
                reason = "position"  # past the end: Redis lost the tail
            elif (page and page[0].seq > after + 1) or (not page and after < last_seq):
                reason = "trimmed"
            elif state is not None and state.ended and after == last_seq:
                self.ended = True
                return False
            if reason:
                self._pending.append(self._reset(reason))
                page = await self._history(0)
                after = 0
        if not page and state is not None and state.ended and state.end_data:
            # The stream expired but the state record kept the outcome: say so, then send it.
            if not self._pending:
                self._pending.append(self._reset("expired"))
            self._pending.append(
                sse.encode_event(state.end_data, event=state.last_type.encode(),
                                 id=b"%s-%d" % (self._epoch, last_seq))
            )
            self.ended = True
            return False
        self._first = page
        self._last = page[0].seq - 1 if page else after
        return not self._pending

    async def _history(self, after: int) -> list[Frame]:
        """The first frames after ``after``: from the snapshot's tail when it reaches back that
        far, else a page from Redis (the tail, when that range was trimmed away)."""
        tail = self._tail
        if not tail or after >= tail[0].seq - 1:
            return frames_after(tail, after)
        return await self._read(after, tail[0].seq) or tail

    def _reset(self, reason: str) -> bytes:
        data = {
            "reason": reason,
            "epoch": self._epoch.decode(),
            "_task_id": self.ref.pk_json,
            "_model": self.ref.model,
            "_app": self.ref.app_label,
        }
        return sse.encode_event(json.dumps(data, separators=(",", ":")).encode(), event=b"reset")

    async def _read(self, after: int, before: int | None = None) -> list[Frame]:
        read = functools.partial(self.log.read_frames, self.ref, after, before, count=HISTORY_PAGE)
        frames, _ = await self.hub.page_reads.run((self._key, after, before), read)
        return frames  # shared: never changed in place

    def _accept(self, frames: list[Frame], out: list[bytes]) -> bool:
        """Append the frames not sent yet; True once the terminal event is out."""
        for frame in frames:
            if frame.seq <= self._last:
                continue
            if frame.seq != self._last + 1:
                self._check_gap(frame.seq, out)
            out.append(frame.data)
            self._last = frame.seq
            self._epoch = frame.epoch
            if frame.terminal:
                return True
        return False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield SSE chunks (whole frames) until the terminal event or the listener closes:
        :meth:`history`, then :meth:`next_chunk` until it returns None."""
        async for chunk in self.history():
            yield chunk
        while (live := await self.next_chunk()) is not None:
            yield live

    async def history(self) -> AsyncIterator[bytes]:
        """Yield what the client is sent before live events: resets, history, and what was
        missed while subscribing. Listens to the hub by the time it ends."""
        out, self._pending = self._pending, []
        if self.ended:
            if out:
                yield b"".join(out)
            return
        if self.listener is not None:  # attached: the window's frames reach the hub's position
            self.listener.task = asyncio.current_task()
            if self._accept(self._first, out):
                self.ended = True
        else:
            async for page in self._pages():
                if self._accept(page, out):
                    self.ended = True
                    yield b"".join(out)
                    return
                if len(out) >= HISTORY_PAGE:
                    yield b"".join(out)
                    out = []
            seen = self._tail if self._tail and self._tail[-1].seq == self._last else ()
            self.listener, hub_cursor = self.hub.subscribe(self._key, self._last, self._epoch, seen)
            # The hub cancels the task writing this feed if its client falls too far behind.
            self.listener.task = asyncio.current_task()
            # When the hub already read past us for earlier listeners, fetch the difference.
            if hub_cursor > self._last and await self._catch_up(hub_cursor + 1, out):
                self.ended = True
        if out:  # what we caught up on goes out now, not with the next live event
            yield b"".join(out)

    async def next_chunk(self) -> bytes | None:
        """The next chunk of live events; None once the terminal event is out or the listener
        closed (overflow, shutdown).

        A plain coroutine, not an async generator: it runs once per client per batch, the
        gateway's hottest path, where each generator layer costs microseconds."""
        listener = self.listener
        if self.ended or listener is None:
            return None
        while True:
            batches = await listener.take()
            if not batches:  # closed: overflow or shutdown
                return None
            out: list[bytes] = []
            for batch in batches:
                if batch.heartbeat:
                    out.append(batch.data)
                elif batch.rewind:
                    # Redis lost events of this stream: what the client has may be gone. Say so,
                    # then send the stream from its start (the hub reads it again from 1).
                    out.append(self._reset("lost"))
                    self._last, self._epoch = 0, b""
                elif batch.epoch == self._epoch and batch.first == self._last + 1:
                    # In step with the stream (the usual case): the hub's bytes as they are.
                    out.append(batch.data)
                    self._last, self.ended = batch.last, batch.terminal
                else:
                    self.ended = await self._take_frames(batch.frames, out)
                if self.ended:
                    break
            if out:  # a batch of duplicates only sends nothing
                return out[0] if len(out) == 1 else b"".join(out)
            if self.ended:
                return None

    async def _pages(self) -> AsyncIterator[list[Frame]]:
        """History from the first page on: pages from Redis up to the tail, then the tail."""
        yield self._first
        tail = self._tail
        if not tail:
            return
        while self._last < tail[0].seq - 1:
            page = await self._read(self._last, tail[0].seq)
            if not page:
                break  # trimmed away under us: the tail goes on from where the stream does
            yield page
        yield frames_after(tail, self._last)

    def _check_gap(self, seq: int, out: list[bytes]) -> None:
        """Events between the last one sent and ``seq`` were trimmed away while this feed read
        (a stream longer than STREAMCOORD_MAX_STREAM_LENGTH, read slower than it grows): say
        so, and go on with what Redis still holds."""
        if seq > self._last + 1 and self._last:
            out.append(self._reset("trimmed"))

    async def _catch_up(self, before: int, out: list[bytes]) -> bool:
        while self._last < before - 1:
            page = await self._read(self._last, before)
            if not page:
                break  # trimmed away under us; the next live event starts a new position
            if self._accept(page, out):
                return True
        return False

    async def _take_frames(self, frames: tuple[Frame, ...], out: list[bytes]) -> bool:
        """Frame by frame, for a batch out of step: skip what was sent, read gaps from Redis,
        reset on a new epoch."""
        for frame in frames:
            if self._epoch and frame.epoch != self._epoch:
                # The stream was created anew under us: everything we sent is history of
                # another epoch. Tell the client, then send the new stream from its start.
                out.append(self._reset("epoch"))
                self._epoch, self._last = frame.epoch, 0
            if frame.seq <= self._last:
                continue
            if frame.seq > self._last + 1 and await self._catch_up(frame.seq, out):
                return True
            self._check_gap(frame.seq, out)
            out.append(frame.data)
            self._last, self._epoch = frame.seq, frame.epoch
            if frame.terminal:
                return True
        return False

    def close(self) -> None:
        if self.listener is not None:
            self.hub.unsubscribe(self.listener)
            self.listener = None
