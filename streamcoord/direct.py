"""Writing live batches straight to a client's connection, while its task waits for them.

A client in step with its stream, whose writing task is parked waiting for the next batch,
would otherwise cost a task wake-up and a trip through the feed, asgineer and uvicorn's
``send`` per batch: most of a gateway's CPU per delivery when thousands of streams have one
client each, or one stream has thousands. Instead the hub's push hands the batch to a
:class:`DirectWriter`, which writes it as uvicorn's ``send`` would (a chunk of the chunked
response) when that is safe, and says so; otherwise the batch is queued and the task woken as
before. Safe means:

- the task is parked in :meth:`streamcoord.listener.Listener.take` with nothing queued, so
  everything it was handed before is already written (order is kept);
- the batch carries events that follow the last one the client was sent, of its epoch, and
  not the terminal one (ending the response is the task's: it goes the usual way); or a
  heartbeat;
- uvicorn's response is under way, chunked, not complete, the client connected, and the
  transport is not paused: a client that does not keep up makes the transport pause once
  its buffer passes uvicorn's high-water mark, and from then on its batches queue, bounded
  as ever (:mod:`streamcoord.listener`, :mod:`streamcoord.stall`).

Under another ASGI server than uvicorn's httptools/h11 cycle nothing is written directly.
"""

from __future__ import annotations

from typing import Any, Protocol

from .listener import Batch, BatchKind

_EVENTS, _HEARTBEAT = BatchKind.EVENTS, BatchKind.HEARTBEAT


class Position(Protocol):
    """What the writer moves on when it writes events: the client's place in its stream."""

    def follows(self, batch: Batch) -> bool:
        """``batch`` holds the events right after the last one sent, none of them terminal."""

    def sent(self, batch: Batch) -> None: ...


class Written(Protocol):
    """What counts the bytes handed to the connection (the WriteStall)."""

    written: int


def uvicorn_cycle(send: Any) -> Any | None:
    """The uvicorn response cycle whose bound method ``send`` is, or None (another server)."""
    cycle = getattr(send, "__self__", None)
    needed = ("transport", "flow", "chunked_encoding", "disconnected", "response_complete")
    return cycle if cycle is not None and all(hasattr(cycle, name) for name in needed) else None


class ChunkWriter:
    """Writes whole frames to one uvicorn response cycle, when it safely can (see the module):
    a multiplexed connection's, which gives each frame its own id first (:mod:`streamcoord.mux`)."""

    __slots__ = ("_cycle", "_stall")

    def __init__(self, cycle: Any, stall: Written) -> None:
        self._cycle = cycle
        self._stall = stall

    @classmethod
    def of(cls, send: Any, stall: Written) -> ChunkWriter | None:
        """The writer for the ASGI ``send`` of a uvicorn response cycle, or None (another server)."""
        cycle = uvicorn_cycle(send)
        return None if cycle is None else cls(cycle, stall)

    def write(self, data: bytes) -> bool:
        """Write ``data`` as a chunk of the response now; False when it must go the usual way."""
        cycle = self._cycle
        if (
            cycle.chunked_encoding is not True or cycle.disconnected or cycle.response_complete
            or cycle.flow.write_paused or cycle.transport.is_closing()
        ):
            return False
        try:
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))  # as uvicorn writes a chunk
        except (OSError, RuntimeError):  # the connection went away: the task finds out
            return False
        self._stall.written += len(data)
        return True


class DirectWriter:
    """Writes a batch to one uvicorn response cycle, when it safely can (see the module)."""

    __slots__ = ("_cycle", "_position", "_stall")

    def __init__(self, cycle: Any, position: Position, stall: Written) -> None:
        self._cycle = cycle
        self._position = position
        self._stall = stall

    @classmethod
    def of(cls, send: Any, position: Position, stall: Written) -> DirectWriter | None:
        """The writer for the ASGI ``send`` of a uvicorn response cycle, or None (another server)."""
        cycle = uvicorn_cycle(send)
        return None if cycle is None else cls(cycle, position, stall)

    def __call__(self, batch: Batch) -> bool:
        """Write ``batch`` now; False when it must go the usual way. (:meth:`ChunkWriter.write`,
        inline: this runs once per client per batch.)"""
        cycle = self._cycle
        if (
            cycle.chunked_encoding is not True or cycle.disconnected or cycle.response_complete
            or cycle.flow.write_paused or cycle.transport.is_closing()
        ):
            return False
        kind = batch.kind
        events = kind is _EVENTS
        if not (events and self._position.follows(batch)) and kind is not _HEARTBEAT:
            return False
        data = batch.data
        try:
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))  # as uvicorn writes a chunk
        except (OSError, RuntimeError):  # the connection went away: the task finds out
            return False
        if events:
            self._position.sent(batch)
        self._stall.written += len(data)
        return True
