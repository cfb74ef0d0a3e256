"""One ASGI application for small sites: the Django site and streamcoord's gateway in one process.

    # mysite/asgi.py
    from django.core.asgi import get_asgi_application
    from django_app.asgi import with_streams

    application = with_streams(get_asgi_application())

    $ uvicorn mysite.asgi:application

Routing: ``/stream/...`` and ``/streams`` (and ``/health``, ``/ready`` unless ``probes=False``) go to the gateway,
the very code ``runserver_stream`` and ``python -m streamcoord gateway`` run
(:func:`streamcoord.server.gateway_parts`): the same token auth, CORS and per-client limits, from
the same settings. Everything else, websockets included, goes to the Django application. ``/stats``
is not served here: it belongs to a separate gateway's admin listener.

Lifespan: Django's ASGIHandler refuses ``lifespan`` scopes, so this application handles them and
never passes one on. At startup it reads the settings (``django_app.conf.get_settings()``), opens
the gateway's Redis clients, starts its hub and registers the project's task models; at shutdown it
stops them. A server without lifespan (``uvicorn --lifespan off``) gets ``503`` on those routes,
saying why: there would be no moment to stop the hub and close its connections.

Limits: a client's queue, bytes and write stall are the gateway's own, as everywhere.
``max_connections`` caps the open streams of the process (beyond it: ``503`` with
``Retry-After``; Django's requests are not counted). ``max_header_bytes`` and
``header_timeout_seconds`` live in the separate gateway's HTTP protocol (:mod:`streamcoord.guard`),
which refuses request bodies and so cannot serve Django: here the server's protocol reads the
request heads, so put the limits on the proxy in front (nginx: ``large_client_header_buffers``,
``client_header_timeout``).

Shutdown: a server waits for open responses before it shuts the application down, and a stream
never ends by itself. So SIGTERM or SIGINT ends every open stream cleanly (clients resume
elsewhere with Last-Event-ID), as a separate gateway does, and is then handed on to the handler
that was there (the server's): the server stops, and exits, as it would have (uvicorn 0.29 and
later re-raise the signal once done: status -15, 143 in a shell). This needs the server's loop in
the main thread, where signals arrive; a shutdown without a signal (``--limit-max-requests``)
waits for open streams, so give uvicorn ``--timeout-graceful-shutdown`` as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any

from redis.exceptions import RedisError

from streamcoord.errors import ConfigurationError
from streamcoord.gateway import Gateway, Response, is_stream_path, text
from streamcoord.guard import OVERLOADED_BODY, RETRY_AFTER_SECONDS
from streamcoord.hub import Hub
from streamcoord.server import ensure_fd_room, gateway_parts

from . import conf

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBES = frozenset({"/health", "/ready"})
#: While the server drains, streams that began after the signal are ended this often.
DRAIN_INTERVAL_SECONDS = 0.1
NO_REDIS = (
    "with_streams needs a Redis: set STREAMCOORD_REDIS_URL (or STREAMCOORD['REDIS_URL'] in "
    "settings.py), or start manage.py runserver_stream first: its embedded default is used "
    "when it runs"
)
NO_LIFESPAN = (
    "streams are not served: the server runs this application without the ASGI lifespan, "
    "where with_streams starts its gateway (run uvicorn with --lifespan on, or leave the default)"
)


def with_streams(django_app: ASGIApp, *, probes: bool = True) -> SiteWithStreams:
    """``django_app`` with streamcoord's gateway in front of it (see the module's docstring).

    ``probes=False`` leaves ``/health`` and ``/ready`` to ``django_app``."""
    return SiteWithStreams(django_app, probes=probes)


class SiteWithStreams:
    """An ASGI application: the gateway's routes here, the rest to the wrapped application."""

    def __init__(self, app: ASGIApp, *, probes: bool = True) -> None:
        self.app = app
        self.probes = probes
        #: The running gateway: set from lifespan startup to shutdown.
        self.gateway: Gateway | None = None
        self._gateway_app: ASGIApp | None = None
        self._open_streams = 0
        self._max_streams = 0
        self._drain: asyncio.Task[None] | None = None
        self._warned_no_lifespan = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http" and self._routes_to_gateway(scope["path"]):
            await self._serve_gateway(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _routes_to_gateway(self, path: str) -> bool:
        return is_stream_path(path) or (self.probes and path in PROBES)

    async def _serve_gateway(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway_app = self._gateway_app
        if gateway_app is None:
            if not self._warned_no_lifespan:
                self._warned_no_lifespan = True
                log.error(NO_LIFESPAN)
            await _respond(send, text(503, NO_LIFESPAN))
            return
        if not is_stream_path(scope["path"]):
            await gateway_app(scope, receive, send)  # a probe: answered even at the limit
            return
        # The separate gateway's connection cap (streamcoord.guard) lives in its own HTTP
        # protocol; here the server's protocol is the project's, so streams are counted instead.
        if self._open_streams >= self._max_streams:
            await _respond(send, text(503, OVERLOADED_BODY.decode(), {
                "retry-after": str(RETRY_AFTER_SECONDS), "connection": "close",
            }))
            return
        self._open_streams += 1
        try:
            await gateway_app(scope, receive, send)
        finally:
            self._open_streams -= 1

    # -- lifespan ----------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        running = contextlib.AsyncExitStack()
        try:
            await self._start(running)
        except Exception as exc:
            await running.aclose()
            await send({"type": "lifespan.startup.failed", "message": _startup_failure(exc)})
            return
        try:
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        finally:  # also when the server cancels us instead (a forced exit)
            stopped = await _close(running)
        if stopped is None:
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await send({"type": "lifespan.shutdown.failed", "message": stopped})

    async def _start(self, running: contextlib.AsyncExitStack) -> None:
        settings = conf.get_settings()
        if not settings.redis_url:
            raise ConfigurationError(NO_REDIS)
        ensure_fd_room(settings.max_connections)
        gateway = await running.enter_async_context(gateway_parts(settings))
        # The task models are this project's: tell the gateways (this one too) their names, as
        # runserver_stream does. The coordinator imports the models, which cannot be imported
        # before django.setup(); the project's asgi.py imports this module before that.
        from .coordinator import coordinator

        await coordinator.register_models()
        running.push_async_callback(coordinator.close)
        self.gateway, self._gateway_app = gateway, gateway.asgi()
        self._max_streams = settings.max_connections
        running.callback(self._forget_gateway)
        running.push_async_callback(self._stop_draining)
        signals = ShutdownSignals(asyncio.get_running_loop(), lambda: self._start_draining(gateway.hub))
        signals.install()
        running.callback(signals.restore)
        log.info("streamcoord streams served at /stream/* and /streams in this process")

    def _forget_gateway(self) -> None:
        self.gateway, self._gateway_app = None, None

    def _start_draining(self, hub: Hub) -> None:
        """The server is shutting down: end every open stream now, and any that begins before
        the server stops taking requests (it waits for every open response)."""
        if self._drain is None:
            self._drain = asyncio.create_task(_end_streams_until_cancelled(hub), name="streamcoord-drain")

    async def _stop_draining(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain


async def _end_streams_until_cancelled(hub: Hub) -> None:
    while True:
        hub.close_all("shutdown")
        await asyncio.sleep(DRAIN_INTERVAL_SECONDS)


class ShutdownSignals:
    """Calls ``on_signal`` in ``loop`` when SIGTERM or SIGINT arrives, then hands the signal to
    the handler that was installed before (the server's), so the server shuts down as it would
    have. Only in the main thread, where signal handlers live; a signal the process ignores is
    left ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[], None]) -> None:
        self._loop = loop
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: open streams will not end when the server stops")
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:  # nobody installed another over ours
                signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous.get(sig, signal.SIG_DFL)
        if previous in (signal.SIG_IGN, None):
            return
        self._loop.call_soon_threadsafe(self._on_signal)
        if callable(previous):
            previous(sig, frame)
        else:  # SIG_DFL: what the signal would have done without us
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)


def _startup_failure(exc: Exception) -> str:
    """The reason a failed startup gives the server (uvicorn logs it and exits with status 3)."""
    if isinstance(exc, ConfigurationError):
        return f"streamcoord: {exc}"
    if isinstance(exc, RedisError | OSError):
        return f"streamcoord: cannot reach the Redis of STREAMCOORD_REDIS_URL: {exc}"
    log.error("streamcoord's gateway failed to start", exc_info=exc)
    return f"streamcoord's gateway failed to start: {type(exc).__name__}: {exc}"


async def _close(running: contextlib.AsyncExitStack) -> str | None:
    """Stop what startup started; None, or why stopping failed."""
    try:
        await running.aclose()
    except Exception as exc:
        log.error("stopping streamcoord's gateway failed", exc_info=exc)
        return f"stopping streamcoord's gateway failed: {type(exc).__name__}: {exc}"
    return None


async def _respond(send: Send, response: Response) -> None:
    """Send a whole response of the gateway's shape from here (no request reached the gateway)."""
    status, headers, body = response
    payload = body.encode() if isinstance(body, str) else body
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
