"""What the hub hands each client: batches of frames, in a bounded queue per listener.

The hub encodes what one read brought from one stream once, as a :class:`Batch`, and appends
that same batch to the queue of every :class:`Listener` of the stream. Besides events, a batch
may be a heartbeat (a comment line that keeps proxies from timing the connection out) or a
rewind (Redis lost events of the stream: the feed resets its client, see
:attr:`streamcoord.resets.ResetReason.LOST`).

A client's queue holds at most ``client_queue_size`` frames and ``client_queue_bytes`` bytes it
has not taken, history it is still being sent counted in (:meth:`Listener.hold`); past either,
it is cut. A client that takes nothing while it holds little is :mod:`streamcoord.stall`'s.
"""

from __future__ import annotations

import asyncio
import enum
import sys
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

from . import sse
from .codec import Frame


class BatchKind(enum.Enum):
    """What a :class:`Batch` carries."""

    EVENTS = "events"  #: frames read from the stream
    HEARTBEAT = "heartbeat"  #: no frames: ``data`` is a comment line, written as it is
    REWIND = "rewind"  #: no frames: Redis lost events of the stream; what a listener sent may be gone


class Batch(NamedTuple):
    """What one XREAD brought from one stream, encoded once and shared by every listener."""

    kind: BatchKind
    frames: tuple[Frame, ...]
    #: The frames' bytes, joined: what a listener in step with the stream writes.
    data: bytes
    #: The epoch of every frame, or b"" when they differ (then listeners go frame by frame).
    epoch: bytes
    first: int  # sequence of the first frame (0 without frames)
    last: int
    terminal: bool


_EVENTS = BatchKind.EVENTS  # a module global: looked up faster than the enum's attribute


def make_batch(frames: list[Frame]) -> Batch:
    """A batch of events (``frames``: at least one, oldest first)."""
    if len(frames) == 1:  # the usual case with many streams: one event each
        frame = frames[0]
        return Batch(_EVENTS, (frame,), frame.data, frame.epoch, frame.seq, frame.seq, frame.terminal)
    epoch = frames[0].epoch if all(f.epoch == frames[0].epoch for f in frames) else b""
    return Batch(
        BatchKind.EVENTS, tuple(frames), b"".join(f.data for f in frames), epoch,
        frames[0].seq, frames[-1].seq, any(f.terminal for f in frames),
    )


HEARTBEAT = Batch(BatchKind.HEARTBEAT, (), sse.HEARTBEAT, b"", 0, 0, False)
REWIND = Batch(BatchKind.REWIND, (), b"", b"", 0, 0, False)


Item = TypeVar("Item")


class BoundedQueue(Generic[Item]):
    """A client's bounded queue of items (batches, or batches of one of its tasks), which the
    task writing to the client takes.

    The bounds are checked when a batch arrives: a client still holding ``limit`` frames, or
    ``limit_bytes`` bytes, it has not taken is not keeping up. A client that keeps up takes
    whole batches, so a burst larger than a bound (one XREAD returns up to the hub's
    READ_COUNT events) does not cut it.
    """

    __slots__ = (
        "_loop", "_waiter", "batches", "closed", "held_bytes", "limit", "limit_bytes", "over_bytes",
        "pending", "pending_bytes", "task",
    )

    def __init__(self, limit: int, limit_bytes: int = sys.maxsize) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.batches: list[Item] = []
        self.pending = 0  # frames in ``batches`` (a batch without frames counts as one)
        #: Bytes in ``batches``, plus ``held_bytes``.
        self.pending_bytes = 0
        #: Bytes of history the feed holds for this client while it listens (:meth:`hold`).
        self.held_bytes = 0
        # A bare future per wait, not an asyncio.Event: this is paid once per client per batch,
        # and Event.wait looks up the running loop each time (a getpid() system call on 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: Why the queue was closed ("overflow", "shutdown"), or None while open.
        self.closed: str | None = None
        #: It overflowed its bound in bytes, not in frames (the metrics' reason for the cut).
        self.over_bytes = False
        #: The task writing this queue's frames; cancelled when the queue overflows.
        self.task: asyncio.Task[Any] | None = None

    @staticmethod
    def _batch(item: Item) -> Batch:
        """The batch an item carries."""
        raise NotImplementedError

    def _admit(self, item: Item, batch: Batch) -> None:
        """Queue ``item`` (carrying ``batch``), or close the queue if it is not keeping up."""
        if self.pending >= self.limit or self.pending_bytes >= self.limit_bytes:
            self.over_bytes = self.pending < self.limit
            self.close("overflow")
            if self.task is not None:
                self.task.cancel()
            return
        self.batches.append(item)
        self.pending += len(batch.frames) or 1
        self.pending_bytes += len(batch.data)
        self._wake()

    def _write_queued(self, write: Callable[[Item], bool]) -> None:
        """Hand the queued items to ``write``, in order, as far as it takes them."""
        written = 0
        for queued in self.batches:
            if not write(queued):
                break
            written += 1
            batch = self._batch(queued)
            self.pending -= len(batch.frames) or 1
            self.pending_bytes -= len(batch.data)
        if written:
            del self.batches[:written]

    def hold(self, size: int) -> None:
        """Count ``size`` bytes more (fewer, when negative) of history the feed holds for this
        client in memory while it listens: they count against ``limit_bytes`` like queued ones,
        until the feed has sent them and gives them back."""
        self.held_bytes += size
        self.pending_bytes += size

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = reason
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Item]:
        """Wait for items and take all of them (empty once closed and drained)."""
        while not self.batches and not self.closed:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        taken, self.batches, self.pending = self.batches, [], 0
        self.pending_bytes = self.held_bytes
        return taken


class Listener(BoundedQueue[Batch]):
    """One client's bounded queue of batches from one stream (see :class:`BoundedQueue`)."""

    __slots__ = ("direct", "key")

    def __init__(self, key: bytes, limit: int, limit_bytes: int = sys.maxsize) -> None:
        super().__init__(limit, limit_bytes)
        self.key = key
        #: Writes a batch straight to the client while its task waits in :meth:`take`, and
        #: says whether it did (:class:`streamcoord.direct.DirectWriter`); None: always queue.
        self.direct: Callable[[Batch], bool] | None = None

    @staticmethod
    def _batch(item: Batch) -> Batch:
        return item

    def push(self, batch: Batch) -> None:
        """Queue a batch (or write it directly: see :attr:`direct`), or close the listener if
        it is not keeping up."""
        if self.closed:
            return
        if self.direct is not None and self._waiter is not None:
            # The task is inside take(): waiting, or woken and not yet run. Everything it was
            # handed before is written, so what is queued, then this batch, may go out now, in
            # order, as far as the writer can take them; a busy loop that woke the task for an
            # earlier batch still writes later ones directly (the task then finds nothing and
            # waits again), instead of queueing more behind it.
            if self.batches:
                self._write_queued(self.direct)
            if not self.batches and self.direct(batch):
                return
        self._admit(batch, batch)
