"""One client's view of a task: retained history, then live events, exactly once each.

:meth:`Feed.open` reads the task's state and the first page of history in one round trip and
decides where the client starts; iterating the feed yields ready-to-write SSE chunks until the
terminal event. The hub may hand over events the client already has (skipped by sequence) or
start past the client (the gap is read from Redis), so nothing is lost and nothing is sent twice.

When the client's Last-Event-ID points at history that no longer exists (another epoch, a
trimmed range, a position past the end) the feed sends ``event: reset`` with the reason, then
everything retained.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from . import sse
from .codec import Event, decode_entry
from .errors import UnknownTask
from .eventlog import EventLog, TaskState
from .hub import Frame, Hub, Listener
from .ids import EventId
from .keys import TaskRef

HISTORY_PAGE = 1000


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
        self._first_page: list[Event] = []
        self.ended = False  # the client already has the terminal event: nothing to send

    @classmethod
    async def open(
        cls, log: EventLog, hub: Hub, ref: TaskRef, *, last_id: EventId | None = None, latest: bool = False
    ) -> Feed:
        """Read the task's state and first history page; raise :class:`UnknownTask` if the task
        has neither."""
        after = last_id.seq if last_id else 0
        pipe = log.redis.pipeline(transaction=False)
        pipe.hgetall(log.keys.state(ref))
        if latest and not last_id:
            pipe.xrevrange(log.keys.events(ref), "+", "-", count=1)
        else:
            pipe.xrange(log.keys.events(ref), f"({after}-0", "+", count=HISTORY_PAGE)
        raw_state, entries = await pipe.execute()  # bytes: clients never decode replies
        state = TaskState.from_hash(raw_state)
        page = [decode_entry(i, f) for i, f in entries]
        if state is None and not page:
            raise UnknownTask(f"no task {ref}")
        feed = cls(log, hub, ref, state)
        await feed._position(last_id, after, page)
        return feed

    async def _position(self, last_id: EventId | None, after: int, page: list[Event]) -> None:
        state = self.state
        last_seq = state.last_seq if state else 0
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
                return
            if reason:
                self._pending.append(self._reset(reason))
                page = await self._read(0)
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
            return
        self._first_page = page
        self._last = page[0].seq - 1 if page else after

    def _reset(self, reason: str) -> bytes:
        data = {
            "reason": reason,
            "epoch": self._epoch.decode(),
            "_task_id": self.ref.pk_json,
            "_model": self.ref.model,
            "_app": self.ref.app_label,
        }
        return sse.encode_event(json.dumps(data, separators=(",", ":")).encode(), event=b"reset")

    async def _read(self, after: int, before: int | None = None) -> list[Event]:
        return await self.log.read(self.ref, after, before, count=HISTORY_PAGE)

    def _accept(self, events: list[Event], out: list[bytes]) -> bool:
        """Append the frames of ``events`` not sent yet; True once the terminal event is out."""
        for event in events:
            if event.seq <= self._last:
                continue
            out.append(event.frame())
            self._last = event.seq
            self._epoch = event.epoch
            if event.terminal:
                return True
        return False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield SSE chunks (whole frames) until the terminal event or the listener closes."""
        out, self._pending = self._pending, []
        if self.ended:
            if out:
                yield b"".join(out)
            return
        page = self._first_page
        while True:  # history, a page at a time
            if self._accept(page, out):
                yield b"".join(out)
                return
            if out:
                yield b"".join(out)
                out = []
            if len(page) < HISTORY_PAGE:
                break
            page = await self._read(self._last)
        self.listener, hub_cursor = self.hub.subscribe(self._key, self._last, self._epoch)
        # The hub cancels the task writing this feed if its client falls too far behind.
        self.listener.task = asyncio.current_task()
        # When the hub already read past us for earlier listeners, fetch the difference ourselves.
        if hub_cursor > self._last and await self._catch_up(hub_cursor + 1, out):
            yield b"".join(out)
            return
        if out:  # what we caught up on goes out now, not with the next live event
            yield b"".join(out)
        async for chunk in self._live():
            yield chunk

    async def _catch_up(self, before: int, out: list[bytes]) -> bool:
        while self._last < before - 1:
            page = await self._read(self._last, before)
            if not page:
                break  # trimmed away under us; the next live event starts a new position
            if self._accept(page, out):
                return True
        return False

    async def _live(self) -> AsyncIterator[bytes]:
        listener = self.listener
        assert listener is not None
        while True:
            batches = await listener.take()
            if not batches:  # closed: overflow or shutdown
                return
            out: list[bytes] = []
            done = False
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
                    self._last, done = batch.last, batch.terminal
                else:
                    done = await self._take_frames(batch.frames, out)
                if done:
                    break
            if out:  # a batch of duplicates only sends nothing
                yield out[0] if len(out) == 1 else b"".join(out)
            if done:
                return

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
            out.append(frame.data)
            self._last, self._epoch = frame.seq, frame.epoch
            if frame.terminal:
                return True
        return False

    def close(self) -> None:
        if self.listener is not None:
            self.hub.unsubscribe(self.listener)
            self.listener = None
