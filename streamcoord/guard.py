"""The gateway's HTTP protocol: uvicorn's httptools protocol, made safe against hostile clients.

uvicorn (0.55, httptools parser) has no limit on a request head's size and no deadline for it:
a 128 MB header grew a gateway by 230 MB, and silent or slowloris sockets stay open forever
(its keep-alive timer starts only after a first response). :class:`GuardedProtocol` adds three
limits from :class:`~streamcoord.settings.Settings`, and leaves the parser and the hot path
(an open stream's writes) untouched:

- ``max_header_bytes``: the bytes of a request head (request line and headers) are counted as
  they arrive; past the limit the client gets ``431`` and the connection is closed. The parser
  is never fed past the limit, so nothing beyond it is ever buffered. (A pipelined head that
  begins inside a read is counted from the next read on: at most one read, 256 KB, more.)
- ``header_timeout_seconds``: a request head must be complete within this many seconds of the
  connection's start, or of the first byte that arrives after a response (the next request on
  a keep-alive connection, or stray bytes). Bytes trickling in never extend the deadline. An
  idle keep-alive connection is uvicorn's keep-alive timeout's; the time a response takes (an
  SSE stream: hours) is never limited here.
- No bodies: no route takes one, so a request that announces one (``Transfer-Encoding``, or a
  ``Content-Length`` above 0) gets ``400`` and the connection is closed, and nothing after its
  head reaches the parser (chunked trailers would otherwise pile up as headers, unbounded).
- ``max_connections``: a request arriving while the process holds more connections than this
  gets ``503`` with ``Retry-After`` and the connection is closed (load shedding); ``/health``
  and ``/ready`` are still answered. Connections
  beyond the cap that send no request are closed by the header deadline.

``uvicorn.Config(http=guarded_protocol(settings))`` installs it. It leans on uvicorn's
internals (the parser callbacks, ``self.app``, ``self.cycle``, ``self.connections``):
``tests/test_guard.py`` drives it without a process, so an upgrade that moves them fails there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import Settings

log = logging.getLogger(__name__)

#: Seconds a refused client is asked to wait. Slots free up as streams end and as connections
#: that sent no request reach their header deadline (10 s by default), so a retry within a
#: second mostly meets another 503 and costs the full process another accept and parse; a
#: much longer wait would leave a client idle that this gateway, or another behind the same
#: balancer, could serve a few seconds later.
RETRY_AFTER_SECONDS = 5
#: At most one warning per this many seconds about refused requests (a flood must not become
#: a flood of log lines).
WARN_EVERY_SECONDS = 10.0


def plain_response(status: int, reason: str, body: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``HTTP/1.1`` plain-text response that closes the connection."""
    payload = body.encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: text/plain; charset=utf-8",
        "x-content-type-options: nosniff",
        f"content-length: {len(payload)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
        "connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


#: Paths answered even beyond the connection cap: they end at once, and a liveness probe that
#: met a 503 at the cap would have the orchestrator restart a busy gateway, dropping every stream.
PROBES = frozenset({b"/health", b"/ready"})

HEAD_TOO_LARGE = plain_response(431, "Request Header Fields Too Large", "request head too large")
OVERLOADED_BODY = b"the gateway is at its connection limit; retry later"
BODY_REFUSED_BODY = b"requests to this gateway carry no body"

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def closing_answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> ASGIApp:
    """An ASGI app that answers every request with ``status`` and the plain-text ``body`` and
    closes the connection: what a request gets instead of the gateway when it is refused here."""
    raw_headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-length", str(len(body)).encode()),
        *((name.encode(), value.encode()) for name, value in (headers or {}).items()),
        (b"connection", b"close"),
    ]

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return answer


#: For a request beyond the connection cap (load shedding).
shed = closing_answer(503, OVERLOADED_BODY, {"retry-after": str(RETRY_AFTER_SECONDS)})
#: For a request that announces a body.
refuse_body = closing_answer(400, BODY_REFUSED_BODY)


def announces_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether request headers announce a body: any Transfer-Encoding, or a Content-Length
    that is not 0."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def head_room(limit: int, counted: int, incoming: int) -> int | None:
    """How many of ``incoming`` bytes may go to the parser while a head is read: all of them
    (None) when ``counted + incoming`` stays within ``limit``, else the bytes left to it."""
    room = limit - counted
    return None if incoming <= room else max(room, 0)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, a head deadline and a connection
    cap. The class attributes hold the limits; :func:`guarded_protocol` sets them."""

    # Set by guarded_protocol(); the bare class has none.
    max_connections: ClassVar[int]
    max_header_bytes: ClassVar[int]
    header_timeout_seconds: ClassVar[float]
    # Refused requests since the last warning, and when it was (per configured class: shared
    # by every connection of the process's listeners).
    _refused: ClassVar[int] = 0
    _warned_at: ClassVar[float] = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # from the connection's start, or a next request's first byte
        self._in_message = False  # between a request's first byte and its end (body included)
        self._head_bytes = 0
        self._heads_complete = 0  # tells a head that ended inside a chunk from one still open
        self._head_deadline: asyncio.TimerHandle | None = None
        self._gateway_app = self.app
        self._discarding = False  # a body was announced and refused: the rest is not read

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        while True:
            if not self._reading_head:
                if not self._in_message:  # between requests: these bytes begin the next head
                    self._begin_head()
                    continue
                # A body. One the response no longer waits for gets the head deadline, or
                # trickling it would hold the connection forever.
                if self._head_deadline is None and self.cycle is not None and self.cycle.response_complete:
                    self._arm_head_deadline()
                super().data_received(data)
                return
            room = head_room(self.max_header_bytes, self._head_bytes, len(data))
            if room is None:
                self._head_bytes += len(data)
                super().data_received(data)
                return
            # The limit falls inside this chunk: feed up to it, and no further unless the head
            # ended there (the rest is then a body or the next request, counted as such).
            heads = self._heads_complete
            if room:
                self._head_bytes += room
                super().data_received(data[:room])
            if self.transport.is_closing():
                return
            if self._heads_complete == heads:
                self._refuse_head()
                return
            data = data[room:]

    # -- httptools parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        if not self._reading_head:  # a pipelined request, begun inside a read
            self._begin_head()

    def on_headers_complete(self) -> None:
        self._heads_complete += 1
        self._reading_head = False
        self._cancel_head_deadline()
        if announces_body(self.headers):
            self.app = refuse_body
            self._discarding = True
        elif len(self.connections) > self.max_connections and self.url.partition(b"?")[0] not in PROBES:
            self.app = shed
            self._note_refused()
        else:
            self.app = self._gateway_app
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    # -- the limits ----------------------------------------------------------------------------

    def _begin_head(self) -> None:
        self._reading_head = True
        self._head_bytes = 0
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        """Start the clock for a request head, unless it runs already (never extended)."""
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout_seconds, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined next head stalls behind a response still being sent (a stream):
            # never cut that response; the connection closes when it ends.
            self.cycle.keep_alive = False
            return
        self.transport.close()

    def _refuse_head(self) -> None:
        self._cancel_head_deadline()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(HEAD_TOO_LARGE)
        # else a pipelined head behind a response in progress: a status line now would land
        # inside that response's body; just close.
        self.transport.close()

    def _note_refused(self) -> None:
        cls = type(self)
        cls._refused += 1
        now = time.monotonic()
        if now - cls._warned_at >= WARN_EVERY_SECONDS:
            log.warning(
                "at the connection limit (%d): refused %d request(s) with 503 since the last warning",
                self.max_connections, cls._refused,
            )
            cls._refused, cls._warned_at = 0, now


def guarded_protocol(settings: Settings) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` with the limits of ``settings``, for ``uvicorn.Config(http=...)``
    (uvicorn makes one instance per connection, by calling the class)."""

    class ConfiguredProtocol(GuardedProtocol):
        max_connections = settings.max_connections
        max_header_bytes = settings.max_header_bytes
        header_timeout_seconds = settings.header_timeout_seconds

    return ConfiguredProtocol
