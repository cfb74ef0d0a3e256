"""The SSE gateway's HTTP side (an asgineer handler). Stateless: Redis holds every position.

Routes::

    GET /stream/{Model}/{id}              a task's events (history, then live); starts a
                                          pending task (lazy start) for a token that may
    GET /stream/{app_label}/{Model}/{id}  the same, naming the app
    GET /streams?task=app.Model:pk&...    many tasks' events on one connection (streamcoord.mux)
    OPTIONS /stream/..., /streams         a CORS preflight (``Settings.cors_origins``)
    GET /health                           200 "OK" while the process serves
    GET /ready                            200 "READY" when Redis answers and the subscriber is connected, else 503

On the admin listener only (``--admin-socket``/``--admin-port``; never the public port, where
these paths answer 404)::

    GET /stats                            this process's listeners, streams and counters (JSON)
    GET /metrics                          the same counters for Prometheus (streamcoord.metrics)
    GET /  and  GET /dashboard/...        the live dashboard (streamcoord.dashboard)
    GET /health                           200 "OK"

A stream needs a stream token (``streamcoord.access``) unless ``stream_auth`` is ``public``: 401
without a good one, 403 when it names other streams, both decided before any Redis lookup.

Errors are plain text with a 4xx or 503 status; no response ever carries an exception's text,
and none echoes more than a short excerpt of what the client sent. A method a route does not
serve gets 405 with ``Allow``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol
from urllib.parse import parse_qsl

import asgineer
from asgineer import HttpRequest, _request
from redis.exceptions import RedisError

from . import cors, sse
from .access import CHALLENGE, Permit, Refusal, authorize, require_secret
from .dashboard import Dashboard
from .direct import DirectWriter
from .errors import InvalidEventId, InvalidTaskRef, UnknownTask
from .eventlog import EventLog
from .feed import Feed
from .hosts import is_ip_or_localhost, rebinding_guard_applies
from .hub import Hub
from .ids import EventId, parse_composite_id, parse_event_id, task_tag
from .jobs import START_GRACE_MS, JobQueue
from .keys import TaskRef
from .listener import Listener
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import GatewayMetrics
from .mux import Confluence, Multiplex, requested_tasks
from .registry import ModelRegistry
from .settings import Settings
from .stall import WriteStall
from .taskstate import State

log = logging.getLogger(__name__)

Response = tuple[int, dict[str, str], str | bytes]
#: Extra routes (a demo page, say): return a response, or None to fall through to 404.
ExtraRoutes = Callable[[HttpRequest], Awaitable[Response | None]]

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-store",
    "x-accel-buffering": "no",  # nginx: pass each frame on at once
}
#: The headers of the JSON answer for an ended task (a URL that also serves SSE: caches must
#: key on Accept).
SUMMARY_HEADERS = {
    "content-type": "application/json",
    "cache-control": "no-store",
    "vary": "Accept",
    "x-content-type-options": "nosniff",
}
#: How long a finished stream's last chunk may take before the connection is cut instead.
FINISH_TIMEOUT = 1.0
#: At most this much of a client's input goes back in an error message.
EXCERPT_CHARS = 100
#: Methods of the read-only routes.
READ_METHODS = ("GET", "HEAD")
#: Methods of the stream route: reads, and CORS preflights.
STREAM_METHODS = ("GET", "HEAD", "OPTIONS")


def text(status: int, body: str, headers: dict[str, str] | None = None) -> Response:
    """A plain-text answer (``nosniff``: a browser must never take it for HTML)."""
    base = {
        "content-type": "text/plain; charset=utf-8",
        "cache-control": "no-store",
        "x-content-type-options": "nosniff",
    }
    return status, {**base, **(headers or {})}, body


def with_headers(response: Response, extra: dict[str, str]) -> Response:
    """``response`` with ``extra`` headers added (``Vary`` values joined, not replaced)."""
    status, headers, body = response
    return status, merge_headers(headers, extra), body


def merge_headers(headers: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    merged = {**headers, **extra}
    if "vary" in headers and "vary" in extra and headers["vary"] != extra["vary"]:
        merged["vary"] = f"{headers['vary']}, {extra['vary']}"
    return merged


def method_not_allowed(allowed: tuple[str, ...]) -> Response:
    return text(405, f"method not allowed: use {' or '.join(allowed)}", {"allow": ", ".join(allowed)})


def excerpt(value: str) -> str:
    """A client's input, quoted and cut to ``EXCERPT_CHARS`` characters, for an error message."""
    return repr(value[:EXCERPT_CHARS]) + ("..." if len(value) > EXCERPT_CHARS else "")


#: The paths of the multiplexed route (many tasks on one connection).
STREAMS_PATHS = frozenset({"/streams", "/streams/"})


def is_stream_path(path: str) -> bool:
    """A path of a stream route: one task's (``/stream/...``) or many tasks' (``/streams``)."""
    return path.startswith("/stream/") or path in STREAMS_PATHS


def parse_stream_path(path: str) -> tuple[str | None, str, str] | None:
    """``/stream/[app/]Model/id`` -> (app or None, model, id); None when not a stream path."""
    parts = path.removeprefix("/stream/").rstrip("/").split("/")
    if not path.startswith("/stream/") or len(parts) not in (2, 3) or not all(parts):
        return None
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return parts[0], parts[1], parts[2]


def _raw_event_id(request: HttpRequest) -> str | None:
    """The client's position as it sent it: the Last-Event-ID header, else the
    ``last_event_id`` query parameter (for a first connect that resumes)."""
    raw = request.headers.get("last-event-id")
    if raw is None:
        raw = request.querydict.get("last_event_id")
    return raw or None


def last_event_id(request: HttpRequest) -> EventId | None:
    """The client's position in a task's stream. Raises InvalidEventId."""
    raw = _raw_event_id(request)
    return None if raw is None else parse_event_id(raw)


def composite_event_id(request: HttpRequest, max_tasks: int) -> dict[str, EventId]:
    """The client's position on a multiplexed connection: each task's last event, by tag
    (:mod:`streamcoord.ids`). Raises InvalidEventId."""
    raw = _raw_event_id(request)
    return {} if raw is None else parse_composite_id(raw, max_tasks)


class Source(Protocol):
    """What the gateway writes to a client: one task's :class:`Feed`, or a :class:`Multiplex`."""

    @property
    def ref(self) -> TaskRef | str: ...

    @property
    def ended(self) -> bool: ...

    @property
    def listener(self) -> Listener | Confluence | None: ...

    def close(self) -> None: ...


class Gateway:
    """Serves task streams from one process's hub."""

    def __init__(
        self, log: EventLog, hub: Hub, settings: Settings, extra_routes: ExtraRoutes | None = None
    ) -> None:
        require_secret(settings)  # a token gateway without its key would refuse every client
        self.log = log
        self.hub = hub
        self.settings = settings
        self.registry = ModelRegistry(log.redis, log.keys)
        self.jobs = JobQueue(log.redis, log.keys)
        self.extra_routes = extra_routes
        self.started = time.time()
        self._open_chunk = sse.OPEN_COMMENT + sse.encode_retry(settings.retry_ms)
        self._later_starts: dict[TaskRef, asyncio.Task[None]] = {}
        self._cors_origins = settings.cors_origin_list
        # For /metrics, read when scraped: the stream connections open now (each one's
        # WriteStall counts the bytes it was written), how many were opened, and the bytes
        # written by those already closed (and by the open lines).
        self.connections: set[WriteStall] = set()
        self.connections_opened = 0
        self._closed_bytes = 0
        self.metrics = GatewayMetrics(self)

    def _start_after_grace(self, ref: TaskRef) -> None:
        """Another start is adding the task's job, or was cut off doing it: this client waits on
        an open stream and will not come back to start it again, so the gateway looks once
        more when that start's grace is over (a no-op if its job arrived meanwhile)."""
        if ref in self._later_starts:
            return

        async def start_later() -> None:
            try:
                await asyncio.sleep(START_GRACE_MS / 1000 + 0.1)
                await self.jobs.start(ref, lazy=True)
            except (RedisError, OSError) as exc:
                log.warning("starting %s after another start's grace failed: %s", ref, exc)
                self.hub.stats["request_redis_errors"] += 1
            finally:
                self._later_starts.pop(ref, None)

        self._later_starts[ref] = asyncio.create_task(start_later(), name=f"start-later {ref}")

    def asgi(self) -> Any:
        return asgineer.to_asgi(self.handle)

    async def handle(self, request: HttpRequest) -> Response | None:
        decode_leniently(request)
        try:
            return await self._route(request)
        except RedisError as exc:
            log.warning("Redis error serving %s: %s", request.path, exc)
            self.hub.stats["request_redis_errors"] += 1
            return text(503, "Redis is unavailable; retry shortly")
        except Exception:
            log.exception("error serving %s", request.path)
            return text(500, "internal error")

    async def _route(self, request: HttpRequest) -> Response | None:
        path = request.path
        if is_stream_path(path):
            if request.method not in STREAM_METHODS:
                return method_not_allowed(STREAM_METHODS)
            cors_headers = cors.response_headers(self._cors_origins, request.headers)
            if request.method == "OPTIONS":
                return self._preflight(request)
            serve = self._stream if path.startswith("/stream/") else self._streams
            response = await serve(request, cors_headers)
            return None if response is None else with_headers(response, cors_headers)
        if path in ("/health", "/ready") and request.method not in READ_METHODS:
            return method_not_allowed(READ_METHODS)
        if path == "/health":
            return text(200, "OK")
        if path == "/ready":
            return await self._ready()
        if self.extra_routes is not None:
            response = await self.extra_routes(request)
            if response is not None:
                return response
        return text(404, "not found")

    def _preflight(self, request: HttpRequest) -> Response:
        headers = cors.preflight(self._cors_origins, request.headers)
        if headers is None:
            return text(403, "cross-origin reads from this origin are not allowed", {"vary": "Origin"})
        return 204, {**headers, "cache-control": "no-store"}, b""

    def admin_asgi(self) -> Any:
        """The internal routes, for a listener only operators reach."""
        return asgineer.to_asgi(self.handle_admin)

    async def handle_admin(self, request: HttpRequest) -> Response | None:
        decode_leniently(request)
        guarded = rebinding_guard_applies(request.scope.get("server"))
        if guarded and not is_ip_or_localhost(request.headers.get("host", "")):
            # A DNS-rebinding guard (streamcoord.hosts): never a browser page's own name.
            return text(421, "the admin listener answers requests addressed to an IP address or localhost only")
        if Dashboard.serves(request.path):  # GET /, /dashboard/... (streamcoord.dashboard)
            return await Dashboard.of(self).handle(request)
        if request.path not in ("/stats", "/health", "/metrics"):
            return text(404, "not found")
        if request.method not in READ_METHODS:
            return method_not_allowed(READ_METHODS)
        if request.path == "/health":
            return text(200, "OK")
        if request.path == "/metrics":
            return 200, {"content-type": METRICS_CONTENT_TYPE, "cache-control": "no-store"}, self.metrics.exposition()
        return 200, {"content-type": "application/json", "cache-control": "no-store"}, json.dumps(self.stats())

    async def _ready(self) -> Response:
        if not self.hub.reading:  # its streams are frozen until the reader is back
            return text(503, "hub reader down")
        try:
            await asyncio.wait_for(self.log.redis.ping(), timeout=2)
        except (RedisError, OSError, TimeoutError):
            self.hub.stats["request_redis_errors"] += 1
            return text(503, "Redis unavailable")
        return text(200, "READY")

    def stats(self) -> dict[str, Any]:
        return {
            "gateway_id": self.hub.gateway_id,
            "listeners": self.hub.listener_count,
            # Open stream responses: one per client connection, however many tasks it follows.
            "stream_connections": len(self.connections),
            "streams": self.hub.stream_count,
            # Followed streams not live yet: subscribing, or read to fill a gap.
            "streams_catching_up": self.hub.catching_up_count,
            "uptime_seconds": round(time.time() - self.started, 1),
            # For leak checks: both return to their baseline once clients are gone.
            "asyncio_tasks": len(asyncio.all_tasks()),
            "open_fds": _open_fds(),
            **self.hub.stats,
        }

    def written_bytes(self) -> int:
        """SSE bytes written to clients by this process: closed streams' and open ones'."""
        return self._closed_bytes + sum(stall.written for stall in self.connections)

    async def _stream(self, request: HttpRequest, cors_headers: dict[str, str]) -> Response | None:
        parsed = parse_stream_path(request.path)
        if parsed is None:
            return text(404, "not found: use /stream/<Model>/<id> or /stream/<app>/<Model>/<id>")
        app_label, model, pk = parsed
        too_long = next((p for p in parsed if p is not None and len(p) > EXCERPT_CHARS), None)
        if too_long is not None:
            return text(400, f"{excerpt(too_long)} is too long for an app label, model name or task id")
        try:
            TaskRef(app_label or "x", model, pk)  # shape check before any Redis lookup
        except InvalidTaskRef as exc:
            return text(400, str(exc))
        # Who may read it, from the request alone: nothing below runs for a stranger, so no
        # answer tells which tasks or models exist.
        permit = authorize(self.settings, request.headers, request.querydict, (app_label, model, pk))
        if isinstance(permit, Refusal):
            return self._refuse(permit)
        try:
            resume = last_event_id(request)
        except InvalidEventId as exc:
            return text(400, str(exc))
        replay = request.querydict.get("replay", "all")
        if replay not in ("all", "latest"):
            return text(400, "replay must be 'all' or 'latest'")
        resolved = await self.registry.resolve(app_label, model)
        if resolved is None:
            return text(404, f"unknown model {excerpt(model)}")
        ref = TaskRef(resolved[0], resolved[1], pk)
        if not permit.covers(ref):  # the token named another app's model of that name
            return self._refuse(Refusal(403, "this stream token does not grant this stream"))
        try:
            feed = await Feed.open(self.log, self.hub, ref, last_id=resume, latest=replay == "latest")
        except UnknownTask:
            return text(404, f"unknown task {ref}")
        try:
            return await self._serve(request, feed, permit, cors_headers)
        finally:
            feed.close()  # a feed may listen from the start (attached to the hub's window)

    async def _streams(self, request: HttpRequest, cors_headers: dict[str, str]) -> Response | None:
        """``GET /streams?task=app.Model:pk&task=...``: many tasks on one connection."""
        limit = self.settings.max_tasks_per_stream
        try:
            refs = requested_tasks([value for key, value in request.querylist if key == "task"], limit)
        except InvalidTaskRef as exc:
            return text(400, str(exc))
        permit = authorize(
            self.settings, request.headers, request.querydict, *((r.app_label, r.model, r.pk) for r in refs)
        )
        if isinstance(permit, Refusal):
            return self._refuse(permit)
        try:  # its shape, before anything reaches Redis; which tasks it names, below
            given = composite_event_id(request, limit)
        except InvalidEventId as exc:
            return text(400, str(exc))
        canonical: list[TaskRef] = []
        for ref in refs:  # (a few models, their names cached: no Redis read each)
            resolved = await self.registry.resolve(ref.app_label, ref.model)
            if resolved is None:
                return text(404, f"unknown model {excerpt(ref.model_label)}")
            named = TaskRef(resolved[0], resolved[1], ref.pk)
            if not permit.covers(named):
                return self._refuse(Refusal(403, f"this stream token does not grant this stream ({named})"))
            canonical.append(named)
        refs = list(dict.fromkeys(canonical))  # (the same task named in two spellings: once)
        # Tags of the names events carry (``_app``, ``_model``, ``_task_id``), as the
        # application names its tasks: what a client computes them from.
        tags = [task_tag(ref.label) for ref in refs]
        if len(set(tags)) < len(tags):  # (any number of them: a 32-bit hash's are easy to find)
            first, second = [ref for ref, tag in zip(refs, tags, strict=True) if tags.count(tag) > 1][:2]
            return text(
                400, f"tasks {first} and {second} cannot share one connection (their tags in event"
                " ids are the same): follow them on two",
            )
        stranger = next((tag for tag in given if tag not in tags), None)
        if stranger is not None:
            return text(
                400, f"the Last-Event-ID names a task this request does not follow (tag {stranger}):"
                " drop its part when you stop following a task",
            )
        try:
            mux = await Multiplex.open(self.log, self.hub, refs, tags, given)
        except UnknownTask as exc:
            return text(404, str(exc).replace("no task", "unknown task"))
        try:
            return await self._serve_many(request, mux, permit, cors_headers)
        finally:
            mux.close()

    async def _serve_many(
        self, request: HttpRequest, mux: Multiplex, permit: Permit, cors_headers: dict[str, str]
    ) -> Response | None:
        if permit.start and request.method != "HEAD":
            for ref in mux.awaiting_start():
                await self._lazy_start(ref, permit)
        if mux.empty:
            return 204, {"cache-control": "no-store"}, b""  # EventSource stops reconnecting
        await self._event_stream(request, cors_headers, mux, lambda stall: mux.pump(request, stall))
        return None

    async def _event_stream(
        self, request: HttpRequest, cors_headers: dict[str, str], source: Source,
        write: Callable[[WriteStall], Coroutine[Any, Any, None]],
    ) -> None:
        """Answer with an event stream: its head and opening lines, then what ``write`` writes
        of ``source`` until it ends (nothing more for a HEAD)."""
        await request.accept(200, merge_headers(SSE_HEADERS, cors_headers))
        if request.method == "HEAD":
            await request.send(b"", more=False)
            return
        await request.send(self._open_chunk)
        self._closed_bytes += len(self._open_chunk)
        await self._pump_until_done(request, source, write)

    async def _lazy_start(self, ref: TaskRef, permit: Permit) -> None:
        """The predecessor's lazy start: the first client of a created task starts it. The
        start is one atomic step, so clients racing through any gateways start it once."""
        outcome = await self.jobs.start(ref, lazy=True)
        if outcome.queued:
            log.info("lazy start of %s (token issued to %s)", ref, permit.subject or "nobody named")
        if not outcome.queued and outcome.state == State.QUEUED:
            self._start_after_grace(ref)

    @staticmethod
    def _refuse(refusal: Refusal) -> Response:
        challenge = {"www-authenticate": CHALLENGE} if refusal.status == 401 else {}
        return text(refusal.status, refusal.message, challenge)

    async def _serve(
        self, request: HttpRequest, feed: Feed, permit: Permit, cors_headers: dict[str, str]
    ) -> Response | None:
        ref = feed.ref
        if feed.state is not None and feed.state.awaits_start and permit.start and request.method != "HEAD":
            await self._lazy_start(ref, permit)
        wants_sse = "text/event-stream" in request.headers.get("accept", "")
        if feed.state is not None and feed.state.ended and not wants_sse:
            return 200, SUMMARY_HEADERS, json.dumps(self._summary(feed))
        if feed.empty:
            return 204, {"cache-control": "no-store"}, b""  # EventSource stops reconnecting
        await self._event_stream(request, cors_headers, feed, lambda stall: self._pump(request, feed, stall))
        return None

    @staticmethod
    def _summary(feed: Feed) -> dict[str, Any]:
        state = feed.state
        assert state is not None
        return {"status": state.state, "final_value": state.final_value, "completed_at": state.ended_at or None}

    async def _pump_until_done(
        self, request: HttpRequest, feed: Source, write: Callable[[WriteStall], Coroutine[Any, Any, None]]
    ) -> None:
        """Write the feed (or a multiplex of them) by ``write``, raced against the client going
        away (uvicorn's send() never says), and cut when its connection takes no bytes for
        ``write_stall_seconds``."""
        # A timer per connection, not a timeout per send: see WriteStall. Cancelling the pump
        # in uvicorn's send() is safe: it waits for the transport to drain before it writes
        # anything, so nothing is half-written, and the connection is aborted right after.
        stall = WriteStall(_transport(request), self.settings.write_stall_seconds)
        self.connections.add(stall)
        self.connections_opened += 1
        pump = asyncio.create_task(write(stall))
        stall.start(pump.cancel)
        watch = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stall.stop()
            pump.cancel()
            watch.cancel()
            closed = "stall" if stall.stalled else feed.listener.closed if feed.listener is not None else None
            by_bytes = closed == "overflow" and feed.listener is not None and feed.listener.over_bytes
            feed.close()
            self.connections.discard(stall)
            self._closed_bytes += stall.written
        if pump not in done:  # (once the pump wrote the end, uvicorn tells the watch "disconnect")
            self.hub.stats["client_left"] += 1
            return
        if not pump.cancelled() and pump.exception() is not None:
            if isinstance(pump.exception(), RedisError | OSError):  # a history page's read
                self.hub.stats["request_redis_errors"] += 1
            log.warning("stream of %s ended by an error: %s", feed.ref, pump.exception())
        self.hub.stats[f"closed_{closed}" if closed else "finished"] += 1
        if by_bytes:
            self.hub.stats["closed_overflow_bytes"] += 1  # the part of closed_overflow cut by bytes
        if closed in ("overflow", "stall"):
            abort_connection(request)
            return
        if feed.ended and not pump.cancelled() and pump.exception() is None:
            return  # the pump wrote the end, watched like every other write
        # Cut short (shutdown, an error): end the response cleanly if the client takes it at
        # once; a client that stopped reading cannot take even that.
        try:
            await asyncio.wait_for(request.send(b"", more=False), FINISH_TIMEOUT)
        except (TimeoutError, OSError):
            abort_connection(request)

    async def _pump(self, request: HttpRequest, feed: Feed, stall: WriteStall) -> None:
        # ``stall.written``: what the connection was handed, once each send returned.
        async for chunk in feed.history():
            await request.send(chunk)
            stall.written += len(chunk)
        # Live batches a waiting client is in step with are written by the hub's push itself
        # (streamcoord.direct); this loop writes the rest, and ends the response.
        listener = feed.listener
        if listener is not None:
            listener.direct = DirectWriter.of(request._send, feed, stall)
        try:
            while (live := await feed.next_chunk()) is not None:  # no generator: a hot path
                await request.send(live)
                stall.written += len(live)
        finally:
            if listener is not None:
                listener.direct = None
        if feed.ended:  # the terminal event is out: end the response, as slowly as the client reads
            await request.send(b"", more=False)


def decode_leniently(request: HttpRequest) -> None:
    """Decode the request's headers and query string as Latin-1, as HTTP defines bytes above
    0x7f in them (RFC 9110, obs-text), before anything reads them: asgineer decodes them as
    UTF-8 on first use and raises on any other byte (a 500 for ``X: \\xff``). What is read as
    Latin-1 here is then validated like any other input (ids, tokens, origins)."""
    scope = request.scope
    request._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    request._querylist = parse_qsl(scope["query_string"].decode("latin-1"))


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return None


def abort_connection(request: HttpRequest) -> None:
    """Drop a client that stopped reading, with whatever is still buffered for it.

    ASGI has no way to say this, and uvicorn, when a handler returns mid-response, calls
    ``transport.close()``, which waits to flush the buffer to a peer that may never read: the
    socket and its buffer would live on. So reach uvicorn's transport (its ``send`` is a bound
    method of the request cycle) and abort it; under another server, fall back to that close.
    """
    transport = _transport(request)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
    request._app_state = _request.DONE  # asgineer must not try to finish this response


async def _wait_disconnect(request: HttpRequest) -> None:
    """Return when the client disconnects. Reads the ASGI receive channel directly: asgineer's
    ``sleep_while_connected`` leaves its inner tasks running when cancelled (one hour-long
    sleep per finished stream)."""
    receive = request._receive
    while (await receive())["type"] != "http.disconnect":
        pass


def _transport(request: HttpRequest) -> Any:
    """uvicorn's transport of ``request``'s connection (its ``send`` is a bound method of the
    request cycle, which holds it), or None under another server."""
    cycle = getattr(request._send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    return transport if hasattr(transport, "get_write_buffer_size") else None
