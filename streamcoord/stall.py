"""Cutting a client whose connection takes no bytes for ``write_stall_seconds``.

A client's queue bounds (:mod:`streamcoord.listener`) do not catch one that stopped reading
while it holds little: one in the middle of a history page, or on an idle stream.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from collections.abc import Callable
from typing import Any, Protocol


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
