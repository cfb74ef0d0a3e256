"""What the hub hands each client: batches of frames, in a bounded queue per listener.

The hub encodes what one read brought from one stream once, as a :class:`Batch`, and appends
that same batch to the queue of every :class:`Listener` of the stream. Besides events, a batch
may be a heartbeat (a comment line that keeps proxies from timing the connection out) or a
rewind (Redis lost events of the stream: the feed resets its client, see
:attr:`streamcoord.resets.ResetReason.LOST`).

A client is bounded two ways here. Its queue holds at most ``client_queue_size`` frames and
``client_queue_bytes`` bytes it has not taken, history it is still being sent counted in
(:meth:`Listener.hold`); past either, it is cut. And a :class:`WriteStall` cuts a client whose
connection took no bytes for ``write_stall_seconds``, however little it holds: one that stopped
reading in the middle of a history page, or on an idle stream, never fills its queue.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import struct
import sys
import termios
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

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


def make_batch(frames: list[Frame]) -> Batch:
    """A batch of events (``frames``: at least one, oldest first)."""
    epoch = frames[0].epoch if all(f.epoch == frames[0].epoch for f in frames) else b""
    return Batch(
        BatchKind.EVENTS, tuple(frames), b"".join(f.data for f in frames), epoch,
        frames[0].seq, frames[-1].seq, any(f.terminal for f in frames),
    )


HEARTBEAT = Batch(BatchKind.HEARTBEAT, (), sse.HEARTBEAT, b"", 0, 0, False)
REWIND = Batch(BatchKind.REWIND, (), b"", b"", 0, 0, False)


class Listener:
    """One client's bounded queue of batches from one stream.

    The bounds are checked when a batch arrives: a client still holding ``limit`` frames, or
    ``limit_bytes`` bytes, it has not taken is not keeping up. A client that keeps up takes
    whole batches, so a burst larger than a bound (one XREAD returns up to the hub's
    READ_COUNT events) does not cut it.
    """

    __slots__ = (
        "_loop", "_waiter", "batches", "closed", "held_bytes", "key", "limit", "limit_bytes",
        "pending", "pending_bytes", "task",
    )

    def __init__(self, key: bytes, limit: int, limit_bytes: int = sys.maxsize) -> None:
        self.key = key
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.batches: list[Batch] = []
        self.pending = 0  # frames in ``batches`` (a batch without frames counts as one)
        #: Bytes in ``batches``, plus ``held_bytes``.
        self.pending_bytes = 0
        #: Bytes of history the feed holds for this client while it listens (:meth:`hold`).
        self.held_bytes = 0
        # A bare future per wait, not an asyncio.Event: this is paid once per client per batch,
        # and Event.wait looks up the running loop each time (a getpid() system call on 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: Why the listener was closed ("overflow", "shutdown"), or None while open.
        self.closed: str | None = None
        #: The task writing this listener's frames; cancelled when the listener overflows.
        self.task: asyncio.Task[Any] | None = None

    def push(self, batch: Batch) -> None:
        """Queue a batch, or close the listener if it is not keeping up."""
        if self.closed:
            return
        if self.pending >= self.limit or self.pending_bytes >= self.limit_bytes:
            self.close("overflow")
            if self.task is not None:
                self.task.cancel()
            return
        self.batches.append(batch)
        self.pending += len(batch.frames) or 1
        self.pending_bytes += len(batch.data)
        self._wake()

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

    async def take(self) -> list[Batch]:
        """Wait for batches and take all of them (empty once closed and drained)."""
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


class Transport(Protocol):
    """What :class:`WriteStall` reads of a connection: an asyncio transport."""

    def get_write_buffer_size(self) -> int: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def unsent_bytes(fd: int) -> int:
    """Bytes the kernel holds of what was written to socket ``fd``: not yet read by the peer (a
    unix socket; memory, a little more than the bytes) or not yet acknowledged (TCP).
    ``SIOCOUTQ`` (Linux); 0 where that cannot be read."""
    if fd < 0:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class WriteStall:
    """Cuts a client whose connection takes no bytes for ``seconds``.

    Its queue bounds do not catch a client that stopped reading while it holds little: the
    task writing to it waits in ``send()`` (on a history page, or on an idle stream whose
    heartbeats come every few seconds) and its queue fills slowly or not at all, while what the
    connection's buffer and the waiting send hold stays in memory. ``send()`` itself never
    times out, and wrapping each one in a timeout would cost a task per send on the hot path.

    So a timer looks at the connection every ``seconds / 4`` instead. The writer adds each
    chunk's size to :attr:`written` once its send returned; what is still waiting for the
    client is in the transport's write buffer and in the kernel's socket buffer
    (:func:`unsent_bytes`), so ``written - waiting`` grows exactly when the client takes
    bytes. The kernel's part matters: a socket turns writable again only once the peer emptied
    much of its buffer (three quarters, for a unix socket), so a client reading slowly but
    steadily can leave the transport's buffer untouched for seconds. A connection where nothing
    waits is not stalled, however long it is quiet. One where bytes wait and the client took
    none of them for ``seconds`` is cut: ``on_stall`` runs once, and :attr:`stalled` is True.

    ``written`` counts bodies only; the server's chunk framing (a few bytes per chunk) waits
    too, and the kernel counts a unix socket's bytes with its bookkeeping: both err toward
    seeing no progress, never toward seeing some that did not happen. A client that takes
    less than that while more is written is cut.
    """

    __slots__ = (
        "_fd", "_handle", "_on_stall", "_progress_at", "_taken", "_transport", "seconds", "stalled",
        "written",
    )

    def __init__(self, transport: Transport | None, seconds: float) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        self._fd: int = sock.fileno() if sock is not None else -1
        self.seconds = seconds
        #: Body bytes handed to the connection (the writer adds each chunk after its send).
        self.written = 0
        self.stalled = False
        self._taken = 0  # ``written - waiting`` when progress was last seen
        self._progress_at: float | None = None  # when it was (None: not looked at yet)
        self._handle: asyncio.TimerHandle | None = None
        self._on_stall: Callable[[], object] | None = None

    def start(self, on_stall: Callable[[], object]) -> None:
        """Check the connection from now on (never, when its transport is not known: another
        server than uvicorn); call ``on_stall`` if it stalls."""
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        self._on_stall = on_stall
        self._progress_at = loop.time()
        self._handle = loop.call_later(self.seconds / 4, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def check(self, now: float) -> bool:
        """Look at the connection at ``now`` (the loop's clock); True once it took no bytes for
        ``seconds`` (since :meth:`start`, or the first look)."""
        assert self._transport is not None
        waiting = self._transport.get_write_buffer_size() + unsent_bytes(self._fd)
        taken = self.written - waiting
        if not waiting or taken > self._taken or self._progress_at is None:
            self._taken, self._progress_at = taken, now
        return now - self._progress_at >= self.seconds

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if self.check(loop.time()):
            self._handle = None
            self.stalled = True
            assert self._on_stall is not None
            self._on_stall()
        else:
            self._handle = loop.call_later(self.seconds / 4, self._tick)
