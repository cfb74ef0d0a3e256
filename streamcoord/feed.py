"""One client's view of a task: retained history, then live events, exactly once each.

:meth:`Feed.open` finds where the client starts (:mod:`streamcoord.resume`); iterating the feed
yields ready-to-write SSE chunks until the terminal event: what was decided at open (a reset,
say), history (read page by page, :mod:`streamcoord.history`), then live events from the hub.

The feed's own concern is the race between the two sources. The hub may hand over events the
client already has (skipped by sequence), start past the client (the gap is read from Redis),
or bring a stream created anew; Redis may have trimmed away events the client lacks. The feed
tracks the last event the client was sent, so nothing is lost and nothing is sent twice, and
says so with a reset (:mod:`streamcoord.resets`) when history the client has or lacks is gone.

What a feed holds for its client at once is bounded in bytes: a page (sized by
:mod:`streamcoord.history`) or the window's frames it starts from, written in chunks of
:data:`CHUNK_BYTES`; once it listens, the history it has not sent yet counts against its
listener's bytes (:meth:`streamcoord.listener.Listener.hold`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from .codec import Frame
from .eventlog import EventLog
from .hub import Hub, ListenerFactory
from .ids import EventId
from .keys import TaskRef
from .listener import Batch, BatchKind
from .resets import ResetReason, epoch_reset, gap_reset, reset_frame
from .resume import Start, find_start
from .window import frames_bytes, runs_within

# Module globals: looked up once per batch on the hot path, faster than enum attributes.
_EVENTS = BatchKind.EVENTS
_HEARTBEAT = BatchKind.HEARTBEAT
#: History goes out in chunks of about this many bytes (a bigger frame goes alone): what a
#: client that stops reading holds in a waiting send and in its connection's buffer (uvicorn
#: makes a writer wait once that buffer holds 64 KiB).
CHUNK_BYTES = 64 * 1024

class Feed:
    """Where one client starts in a task's stream, and the chunks it is sent from there."""

    def __init__(
        self, hub: Hub, ref: TaskRef, start: Start, make: ListenerFactory | None = None
    ) -> None:
        self.hub = hub
        self.ref = ref
        self.state = start.state
        self.listener = start.listener
        self.ended = start.ended  # the terminal event is out (or is all that is left to send)
        self._history = start.history
        self._last = start.last  # sequence of the last event sent (or skipped by the client's choice)
        self._epoch = start.epoch  # of the events sent
        self._pending = start.preface  # frames decided at open time, sent first
        self._pending_resets = start.resets  # the reasons of the resets among them
        self._first = start.first  # history to send first
        self._make = make  # builds the listener, when it is not the hub's own kind
        #: Gives each frame sent (``id:`` first) the id the client is to see instead of the
        #: stream's own (a multiplexed connection's, :mod:`streamcoord.mux`); None: as it is.
        self.rewrite: Callable[[bytes], bytes] | None = None

    @classmethod
    async def open(
        cls, log: EventLog, hub: Hub, ref: TaskRef, *, last_id: EventId | None = None, latest: bool = False,
        make: ListenerFactory | None = None,
    ) -> Feed:
        """Decide where the client starts; raise :class:`UnknownTask` if the task has neither
        a state record nor events. ``make``: see :func:`streamcoord.resume.find_start`."""
        return cls(hub, ref, await find_start(log, hub, ref, last_id, latest, make), make)

    @property
    def empty(self) -> bool:
        """Nothing to send at all: the client already has the terminal event."""
        return self.ended and not self._pending

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
        if out and self.rewrite is not None:  # (a reset has no id: it keeps its bytes)
            out = [self.rewrite(frame) if frame.startswith(b"id: ") else frame for frame in out]
        if out:  # counted as they go out: each reset by its reason, the rest as history
            for reason in self._pending_resets:
                self.hub.stats[f"reset_{reason.value}"] += 1
            self.hub.stats["history_deliveries"] += len(out) - len(self._pending_resets)
        if self.ended:
            if out:
                yield b"".join(out)
            return
        first, self._first = self._first, []  # held no longer than it takes to send
        if self.listener is not None:  # from the window: its frames reach the hub's position
            self.listener.task = asyncio.current_task()
            async for chunk in self._send_history(first, out):
                yield chunk
        else:
            page: list[Frame] | None = first
            while page is not None and not self.ended:
                async for chunk in self._send_history(page, out):
                    yield chunk
                page = None if self.ended else await self._history.next_page(self._last)
            if self.ended:
                if out:
                    yield b"".join(out)
                return
            tail, self._history.tail = self._history.tail, []  # sent: only the hub keeps it
            seen = tail if tail and tail[-1].seq == self._last else ()
            self.listener, hub_cursor = self.hub.subscribe(
                self._history.key, self._last, self._epoch, seen, self._make
            )
            del tail, seen  # this generator waits in sends below: it must not keep them alive
            # The hub cancels the task writing this feed if its client falls too far behind.
            self.listener.task = asyncio.current_task()
            # When the hub already read past us for earlier listeners, fetch the difference.
            while not self.ended and self._last < hub_cursor:
                page = await self._history.page(self._last, hub_cursor + 1)
                if not page:
                    break  # trimmed away under us; the next live event starts a new position
                async for chunk in self._send_history(page, out):
                    yield chunk
        if out:  # what we caught up on goes out now, not with the next live event
            yield b"".join(out)

    async def _send_history(self, frames: Sequence[Frame], out: list[bytes]) -> AsyncIterator[bytes]:
        """Yield ``frames`` (history, in order as Redis or the window holds them), after what
        ``out`` holds, in chunks of about :data:`CHUNK_BYTES`; sets ``ended`` once the terminal
        event is out. What does not fill a chunk is left in ``out``, for the next page to fill.
        Each chunk is sent before the next is made, so a client that stops reading holds one
        in a waiting send, not the whole page. While the feed listens, the frames it has not
        made into a chunk yet count against the listener's bytes."""
        listener = self.listener
        held = frames_bytes(frames) if listener is not None else 0
        if listener is not None:
            listener.hold(held)
        try:
            runs = list(runs_within(frames, CHUNK_BYTES, sum(map(len, out))))
            for index, run in enumerate(runs):
                self.ended = await self._send(run, out, live=False)
                if listener is not None:
                    made = frames_bytes(run)
                    listener.hold(-made)
                    held -= made
                # A full run makes a chunk; the last may take frames of the next page first.
                if out and (self.ended or index < len(runs) - 1):
                    chunk = b"".join(out)
                    out.clear()
                    yield chunk
                if self.ended:
                    return
        finally:
            if listener is not None and held:
                listener.hold(-held)  # cut short: nothing of it is held any more

    def follows(self, batch: Batch) -> bool:
        """``batch`` (live events) holds the events right after the last one the client was
        sent, of its epoch, and not the terminal one: it may be written as it is."""
        return (
            not self.ended and batch.epoch == self._epoch and batch.first == self._last + 1
            and not batch.terminal
        )

    def sent(self, batch: Batch) -> None:
        """``batch``, which :meth:`follows`, was written to the client directly."""
        self._last = batch.last

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
                if batch.kind is _EVENTS and batch.epoch == self._epoch and batch.first == self._last + 1:
                    # In step with the stream (the usual case): the hub's bytes as they are.
                    out.append(batch.data)
                    self._last, self.ended = batch.last, batch.terminal
                else:
                    await self._out_of_step(batch, out)
                if self.ended:
                    break
            if out:  # a batch of duplicates only sends nothing
                return out[0] if len(out) == 1 else b"".join(out)
            if self.ended:
                return None

    async def absorb(self, batch: Batch, out: list[bytes]) -> None:
        """Append to ``out`` what the client is sent of ``batch`` (the next from the hub),
        each frame given its :attr:`rewrite` id: :meth:`next_chunk`'s work, for a connection
        that writes many feeds (:mod:`streamcoord.mux`)."""
        rewrite = self.rewrite
        if rewrite is not None and batch.kind is _EVENTS and batch.epoch == self._epoch and batch.first == self._last + 1:
            out.extend([rewrite(frame.data) for frame in batch.frames])
            self._last, self.ended = batch.last, batch.terminal
        else:
            await self._out_of_step(batch, out)

    async def _out_of_step(self, batch: Batch, out: list[bytes]) -> None:
        """A batch that does not simply follow what the client was sent: events out of step
        (repeats, a gap, a new epoch), a heartbeat, or a rewind."""
        kind = batch.kind
        if kind is _EVENTS:
            self.ended = await self._send(batch.frames, out, live=True)
        elif kind is _HEARTBEAT:
            out.append(batch.data)
        else:  # a rewind: Redis lost events of this stream; what the client has may be gone.
            # Say so, then send the stream from its start (the hub reads it again from 1).
            out.append(self._reset(ResetReason.LOST))
            self._last, self._epoch = 0, b""

    async def _send(self, frames: Iterable[Frame], out: list[bytes], *, live: bool) -> bool:
        """Append to ``out`` the frames the client lacks, in order, skipping what it has; True
        once the terminal event is out.

        ``live``: frames from the hub, which may be out of step with the client: one of a new
        epoch resets the client, and a gap before one is first read from Redis. Otherwise the
        frames were read from Redis (or the window) and run as Redis holds them. Either way, a
        gap that remains was trimmed away: the client is told, and goes on from there."""
        sent = 0  # frames read from Redis that go out: counted once, whichever way this ends
        try:
            for frame in frames:
                if live and (reason := epoch_reset(self._epoch, frame.epoch)):
                    # The stream was created anew under us: everything we sent is history of
                    # another epoch. Tell the client, then send the new stream from its start.
                    out.append(self._reset(reason))
                    self._epoch, self._last = frame.epoch, 0
                if frame.seq <= self._last:
                    continue
                if frame.seq != self._last + 1:
                    if live and await self._catch_up(frame.seq, out):
                        return True
                    if reason := gap_reset(self._last, frame.seq):
                        out.append(self._reset(reason))
                out.append(frame.data if self.rewrite is None else self.rewrite(frame.data))
                sent += 1
                self._last, self._epoch = frame.seq, frame.epoch
                if frame.terminal:
                    return True
            return False
        finally:
            if not live:  # (live frames were counted by the hub, as it handed them out)
                self.hub.stats["history_deliveries"] += sent

    async def _catch_up(self, before: int, out: list[bytes]) -> bool:
        """Send what Redis holds between the client's position and ``before`` (a gap before an
        event from the hub); True once the terminal event is out."""
        while self._last < before - 1:
            page = await self._history.page(self._last, before)
            if not page:
                break  # trimmed away under us; the next live event starts a new position
            if await self._send(page, out, live=False):
                return True
        return False

    def _reset(self, reason: ResetReason) -> bytes:
        self.hub.stats[f"reset_{reason.value}"] += 1
        return reset_frame(reason, self._epoch, self.ref)

    def close(self) -> None:
        if self.listener is not None:
            self.hub.unsubscribe(self.listener)
            self.listener = None
