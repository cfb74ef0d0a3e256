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


class DirectWriter:
    """Writes a batch to one uvicorn response cycle, when it safely can (see the module)."""

    __slots__ = ("_cycle", "_position", "_stall")

    def __init__(self, cycle: Any, position: Position | None, stall: Written) -> None:
        self._cycle = cycle
        self._position = position
        self._stall = stall

    @classmethod
    def of(cls, send: Any, position: Position | None, stall: Written) -> DirectWriter | None:
        """The writer for the ASGI ``send`` of a uvicorn response cycle, or None (another server).
        Without a ``position`` it writes heartbeats and what :meth:`write` is given only."""
        cycle = getattr(send, "__self__", None)
        needed = ("transport", "flow", "chunked_encoding", "disconnected", "response_complete")
        if cycle is None or not all(hasattr(cycle, name) for name in needed):
            return None
        return cls(cycle, position, stall)

    def __call__(self, batch: Batch) -> bool:
        """Write ``batch`` now; False when it must go the usual way."""
        cycle = self._cycle
        if (
            cycle.chunked_encoding is not True or cycle.disconnected or cycle.response_complete
            or cycle.flow.write_paused or cycle.transport.is_closing()
        ):
            return False
        kind = batch.kind
        events = kind is _EVENTS
        position = self._position
        if not (events and position is not None and position.follows(batch)) and kind is not _HEARTBEAT:
            return False
        data = batch.data
        try:
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))  # as uvicorn writes a chunk
        except (OSError, RuntimeError):  # the connection went away: the task finds out
            return False
        if events and position is not None:
            position.sent(batch)
        self._stall.written += len(data)
        return True

    def write(self, data: bytes) -> bool:
        """Write ``data`` (whole frames) as a chunk of the response now, when the connection
        takes it at once (see the module); False when it must go the usual way. (``__call__``
        does the same inline for a batch: it runs once per client per batch.)"""
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
