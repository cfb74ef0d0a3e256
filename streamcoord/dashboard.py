"""The live dashboard on a gateway's admin listener: ``streamcoord status``, kept current over
Server-Sent Events.

Routes, on the admin listener only (:meth:`Gateway.handle_admin` hands them here; the public
listener never serves them)::

    GET /                                    the page (``dashboard.html``: no external assets)
    GET /dashboard/events                    SSE: ``status`` events, each one JSON snapshot
                                             ``{"status": Status.to_json(), "gateway": {...}}``
                                             or ``{"error": "...", "gateway": {...}}``
    GET /dashboard/link/{app}/{Model}/{id}   302 to the task's stream on the public listener,
                                             with a short-lived read token in token mode

One snapshot loop per gateway process, however many pages are open: :class:`Snapshots` collects
the status once a second while at least one page listens and hands every snapshot, encoded
once, to each page (fan-out in memory, as the hub does for task streams). The loop starts with
the first page and stops when the last one leaves. A snapshot goes out only when it changed:
an age that merely grew with the clock is no change (the page advances ages itself between
snapshots), a heartbeat, an event or anything else is. A page that reads slowly gets only the
latest snapshot, never a backlog: each snapshot replaces the one before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import weakref
from base64 import b64encode
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from asgineer import HttpRequest, _request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import sse
from .errors import InvalidTaskRef
from .eventlog import EventLog
from .hosts import is_loopback_client
from .hub import Hub
from .keys import KeySpace, TaskRef
from .ops.status import collect_status
from .settings import Settings
from .tokens import mint


class Gateway(Protocol):
    """What the dashboard takes from its gateway (:class:`streamcoord.gateway.Gateway`, which
    imports this module: a protocol here keeps the import one way)."""

    log: EventLog
    settings: Settings
    hub: Hub

log = logging.getLogger(__name__)

Response = tuple[int, dict[str, str], str | bytes]
#: Returns one snapshot (a JSON object); raises when it cannot.
Collect = Callable[[], Awaitable[dict[str, Any]]]
#: Waits the given number of seconds (``asyncio.sleep``; tests pass a clock of their own).
Tick = Callable[[float], Awaitable[None]]

#: How often the loop collects the status while a page listens.
INTERVAL_SECONDS = 1.0
#: A collection that takes longer is abandoned; the pages are told Redis does not answer.
COLLECT_TIMEOUT_SECONDS = 10.0
#: An age that differs from what the pages compute for it (the last sent age plus the time
#: since) by more than this is a change: pages are never off by more than this, or by a beat.
AGE_TOLERANCE_SECONDS = 1.5
#: Running tasks listed in a snapshot.
RUNNING_LIMIT = 50
#: Lifetime of the read token a task's link carries in token mode: long enough to open it and
#: watch the task for a while, short enough that a link copied from the page soon dies.
LINK_TOKEN_SECONDS = 15 * 60
#: The page's reconnect delay (``retry:``).
RETRY_MS = 2000
#: Whom the links' tokens name (``sub``: it shows in the gateways' logs).
LINK_SUBJECT = "streamcoord dashboard"

_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-store",
    "x-accel-buffering": "no",
}
_READ_METHODS = ("GET", "HEAD")
_LINK_PREFIX = "/dashboard/link/"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


# -- which snapshots are news ------------------------------------------------------------------


def is_age(key: str) -> bool:
    """Fields that grow with the clock: ``age_seconds``, ``heartbeat_age_seconds``, ..."""
    return key == "age_seconds" or key.endswith("_age_seconds")


def differs(sent: Any, new: Any, elapsed: float) -> bool:
    """Whether ``new`` tells the pages something that ``sent``, taken ``elapsed`` seconds
    earlier, does not: any value but the ``at`` stamps differs, or an age differs from the sent
    one grown by ``elapsed`` by more than :data:`AGE_TOLERANCE_SECONDS` (a heartbeat came)."""
    if isinstance(sent, dict) and isinstance(new, dict):
        if sent.keys() != new.keys():
            return True
        for key, value in new.items():
            if key == "at":
                continue
            if is_age(key) and _number(value) and _number(sent[key]):
                if abs(value - (sent[key] + elapsed)) > AGE_TOLERANCE_SECONDS:
                    return True
            elif differs(sent[key], value, elapsed):
                return True
        return False
    if isinstance(sent, list) and isinstance(new, list):
        return len(sent) != len(new) or any(differs(a, b, elapsed) for a, b in zip(sent, new, strict=True))
    return type(sent) is not type(new) or bool(sent != new)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def encode_snapshot(message: dict[str, Any]) -> bytes:
    """One ``status`` event, encoded once for every page."""
    return sse.encode_event(json.dumps(message, separators=(",", ":")).encode(), event=b"status")


# -- the fan-out -------------------------------------------------------------------------------


class Subscription:
    """One page's place in the fan-out: the latest snapshot it has not taken yet."""

    def __init__(self, frame: bytes | None) -> None:
        self._frame = frame
        self._ready = asyncio.Event()
        #: The fan-out was closed (the gateway stops): the page's stream ends.
        self.ended = False
        if frame is not None:
            self._ready.set()

    def offer(self, frame: bytes) -> None:
        """A new snapshot, which replaces one not taken yet."""
        self._frame = frame
        self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    async def next(self, within: float) -> bytes | None:
        """The latest snapshot not taken yet; None when none came ``within`` seconds (time for
        a heartbeat), or when the fan-out ended (see :attr:`ended`)."""
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), within)
            except TimeoutError:
                return None
        if self.ended:
            return None
        self._ready.clear()
        frame, self._frame = self._frame, None
        return frame


class Snapshots:
    """Collects snapshots while anyone subscribes, and offers each changed one to all."""

    def __init__(
        self, collect: Collect, *, interval: float = INTERVAL_SECONDS,
        timeout: float = COLLECT_TIMEOUT_SECONDS, tick: Tick = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._collect = collect
        self.interval = interval
        self.timeout = timeout
        self._tick = tick
        self._clock = clock
        self._subscribers: set[Subscription] = set()
        self._loop: asyncio.Task[None] | None = None
        #: The last snapshot sent, for a page that joins between two.
        self._latest: bytes | None = None
        #: Rounds run and snapshots sent since this process started (for tests and /stats).
        self.rounds = 0
        self.sent = 0
        self.closed = False

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        """A place in the fan-out; the loop starts with the first one. Pair with
        :meth:`unsubscribe`. After :meth:`close`, an ended one."""
        subscription = Subscription(self._latest)
        if self.closed:
            subscription.end()
            return subscription
        self._subscribers.add(subscription)
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="dashboard snapshots")
            self._loop.add_done_callback(_report_end)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Leave the fan-out; the loop stops with the last one to leave."""
        self._subscribers.discard(subscription)
        if not self._subscribers:
            self.stop()

    def stop(self) -> None:
        """Stop the loop (it starts again with the next subscriber, from a fresh snapshot)."""
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
        self._latest = None

    def close(self) -> None:
        """End every subscription and the loop, for good (the gateway stops: its pages'
        streams end at once, and the pages reconnect, to another gateway or this one back)."""
        self.closed = True
        for subscription in self._subscribers:
            subscription.end()
        self._subscribers.clear()
        self.stop()

    async def _run(self) -> None:
        sent: dict[str, Any] | None = None
        sent_at = 0.0
        while True:
            began = self._clock()
            message = await self._collect_safely()
            now = self._clock()
            self.rounds += 1
            if sent is None or differs(sent, message, now - sent_at):
                sent, sent_at = message, now
                self._publish(encode_snapshot(message))
            # At least three times the round's own length between rounds: a status that takes
            # long to read (many retained tasks) never takes more than a quarter of the loop.
            took = self._clock() - began
            await self._tick(max(self.interval - took, 3 * took))

    async def _collect_safely(self) -> dict[str, Any]:
        """A snapshot, or what keeps the pages from one (they keep showing the last)."""
        try:
            return await asyncio.wait_for(self._collect(), self.timeout)
        except TimeoutError:
            return {"error": f"Redis did not answer within {self.timeout:g} s"}
        except (RedisError, OSError) as exc:
            log.warning("dashboard: cannot read the status from Redis: %s", exc)
            return {"error": f"Redis is unavailable ({type(exc).__name__}); the dashboard retries every second"}
        except Exception:
            log.exception("dashboard: collecting the status failed")
            return {"error": "collecting the status failed (see the gateway's log)"}

    def _publish(self, frame: bytes) -> None:
        self._latest = frame
        self.sent += 1
        for subscription in self._subscribers:
            subscription.offer(frame)


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the dashboard's snapshot loop stopped: %r", task.exception())


# -- the routes --------------------------------------------------------------------------------


class Page:
    """``dashboard.html``, read once, with a Content-Security-Policy that admits its own inline
    script and style (by hash) and nothing from anywhere else."""

    def __init__(self, html: str) -> None:
        self.body = html.encode()
        hashes = {
            kind: " ".join(f"'sha256-{b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
                           for block in re.findall(rf"<{kind}>(.*?)</{kind}>", html, re.S))
            for kind in ("script", "style")
        }
        self.headers = {
            "content-type": "text/html; charset=utf-8",
            "cache-control": "no-store",
            "x-content-type-options": "nosniff",
            "x-frame-options": "DENY",
            "referrer-policy": "no-referrer",
            "content-security-policy": (
                f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            ),
        }

    @classmethod
    def load(cls) -> Page:
        return cls(resources.files("streamcoord").joinpath("dashboard.html").read_text(encoding="utf-8"))


_dashboards: weakref.WeakKeyDictionary[Gateway, Dashboard] = weakref.WeakKeyDictionary()


class Dashboard:
    """The dashboard of one gateway process: its page, its snapshot loop, its links."""

    def __init__(self, redis: Redis, keys: KeySpace, settings: Settings, gateway_id: str,
                 collect: Collect | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.gateway_id = gateway_id
        self.snapshots = Snapshots(collect or self._collect)
        #: This gateway's public address as its registry entry gives it (once a snapshot saw it).
        self.public_address = ""
        self._page: Page | None = None

    @staticmethod
    def serves(path: str) -> bool:
        """Whether ``path`` is one of the dashboard's routes."""
        return path == "/" or path.startswith("/dashboard/")

    @classmethod
    def of(cls, gateway: Gateway) -> Dashboard:
        """The dashboard of ``gateway``: one per process, made on first use."""
        dashboard = _dashboards.get(gateway)
        if dashboard is None:
            dashboard = _dashboards[gateway] = cls(
                gateway.log.redis, gateway.log.keys, gateway.settings, gateway.hub.gateway_id
            )
        return dashboard

    @classmethod
    def close_for(cls, gateway: Gateway) -> None:
        """End the dashboard streams of ``gateway`` at once (it stops), if it has a dashboard.
        Each page's stream ends with a 200 it reconnects after (``retry:``), where a stream
        cut off by the server's shutdown timeout would have left a traceback in the log."""
        dashboard = _dashboards.get(gateway)
        if dashboard is not None:
            dashboard.snapshots.close()

    @property
    def page(self) -> Page:
        if self._page is None:
            self._page = Page.load()
        return self._page

    async def handle(self, request: HttpRequest) -> Response | None:
        if request.method not in _READ_METHODS:
            return _text(405, "method not allowed: use GET or HEAD", {"allow": "GET, HEAD"})
        path = request.path
        if path == "/":
            return 200, self.page.headers, b"" if request.method == "HEAD" else self.page.body
        if path == "/dashboard/events":
            await self._events(request)
            return None
        if path.startswith(_LINK_PREFIX):
            return self._link(request, path.removeprefix(_LINK_PREFIX))
        return _text(404, "not found")

    # -- the snapshots

    async def _collect(self) -> dict[str, Any]:
        status = (await collect_status(self.redis, self.keys, running_limit=RUNNING_LIMIT)).to_json()
        own = self._own_entry(status.get("gateways") or [])
        if own is not None and isinstance(own.get("address"), str):
            self.public_address = own["address"]
        return {"status": status, "gateway": self._describe_self(own)}

    def _own_entry(self, gateways: list[dict[str, Any]]) -> dict[str, Any] | None:
        """This process's entry in the gateway registry: by id, else by host and pid."""
        host, pid = socket.gethostname(), os.getpid()
        for entry in gateways:
            if entry.get("id") == self.gateway_id or (entry.get("host") == host and entry.get("pid") == pid):
                return entry
        return None

    def _describe_self(self, own: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": own.get("id") if own else self.gateway_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "stream_auth": self.settings.stream_auth,
            "link_token_seconds": LINK_TOKEN_SECONDS if not self.settings.public_streams else None,
            # Heartbeats older than this show as late (three beats missed, by this process's
            # STREAMCOORD_WORKER_HEARTBEAT_SECONDS).
            "late_after_seconds": 3 * self.settings.worker_heartbeat_seconds,
        }

    async def _events(self, request: HttpRequest) -> None:
        """The page's stream of snapshots, until the page goes away (raced against the
        disconnect: uvicorn's send() never reports it)."""
        subscription = self.snapshots.subscribe()
        try:
            await request.accept(200, _SSE_HEADERS)
            if request.method == "HEAD":
                await request.send(b"", more=False)
                return
            await request.send(sse.OPEN_COMMENT + sse.encode_retry(RETRY_MS))
            writer = asyncio.create_task(self._write(request, subscription))
            watch = asyncio.create_task(_wait_disconnect(request))
            try:
                await asyncio.wait((writer, watch), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (writer, watch):
                    task.cancel()
                await asyncio.gather(writer, watch, return_exceptions=True)
        finally:
            self.snapshots.unsubscribe(subscription)

    async def _write(self, request: HttpRequest, subscription: Subscription) -> None:
        stall = self.settings.write_stall_seconds
        while True:
            frame = await subscription.next(self.settings.heartbeat_seconds)
            if subscription.ended:
                return  # the gateway stops: the response ends (asgineer finishes it)
            try:
                await asyncio.wait_for(request.send(frame or sse.HEARTBEAT), stall)
            except TimeoutError:
                # A page that takes no bytes for this long is cut (it reconnects by itself).
                log.info("dashboard: a page took nothing for %s s; cut", stall)
                _abort(request)
                return

    # -- the links

    def _link(self, request: HttpRequest, rest: str) -> Response:
        """Where a task's link leads: its stream on this gateway's public listener.

        In token mode the link carries a read token minted here, for this one task, for
        :data:`LINK_TOKEN_SECONDS`. The gateway holds the secret anyway (it checks every
        stream's token with it), and this listener is for operators only, who may watch every
        task: that is why the admin listener must never be reachable by clients."""
        parts = rest.strip("/").split("/")
        if len(parts) != 3:
            return _text(404, "not found: use /dashboard/link/<app>/<Model>/<id>")
        try:
            ref = TaskRef(*parts)
        except InvalidTaskRef as exc:
            return _text(400, str(exc))
        path = f"/stream/{ref.app_label}/{ref.model}/{quote(ref.pk)}"
        if not self.settings.public_streams:
            if not is_loopback_client(request.scope.get("client")):
                # Tokens only for operators on this machine (a tunnel, a unix socket): a
                # listener opened to a monitoring network for /metrics mints nothing there.
                return _text(200, (
                    f"The events of {ref} are at {path} on the gateways, with a stream token: "
                    "this listener mints one only for a client on this machine (open the "
                    "dashboard through kubectl port-forward or ssh -L), or make one with "
                    "manage.py create_task's stream_url or coordinator.stream_token.\n"
                ))
            token = mint(self.settings.secret, [ref], expires_in=LINK_TOKEN_SECONDS, subject=LINK_SUBJECT)
            path += f"?token={token}"
        base = self.public_base(request.headers.get("host", ""))
        if base is None:
            where = self.public_address or "this gateway's public socket (see its 'listening on' line)"
            return _text(200, (
                f"The events of {ref} are at\n\n    {path}\n\non {where}, which this page cannot "
                "link to: set STREAMCOORD_GATEWAY_URL to the gateways' public URL, or reach the "
                "path through whatever serves the gateways (e.g. curl --unix-socket).\n"
            ))
        return 302, {"location": base + path, "cache-control": "no-store", "referrer-policy": "no-referrer"}, b""

    def public_base(self, admin_host: str) -> str | None:
        """The public base URL of the links: ``gateway_url`` when set; else this gateway's own
        TCP address from its registry entry (a wildcard host replaced by the host the operator
        reached the admin listener by); None for a unix socket, or before any snapshot."""
        if self.settings.gateway_url:
            return self.settings.gateway_url.rstrip("/")
        address = urlsplit(self.public_address)
        if address.scheme not in ("http", "https") or address.port is None:
            return None
        host = address.hostname or ""
        if host in _WILDCARD_HOSTS:
            host = urlsplit(f"//{admin_host}").hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{address.scheme}://{host}:{address.port}"


# -- small HTTP pieces (gateway.py has their twins; it imports this module, not the reverse) --


def _text(status: int, body: str, headers: dict[str, str] | None = None) -> Response:
    base = {"content-type": "text/plain; charset=utf-8", "cache-control": "no-store", "x-content-type-options": "nosniff"}
    return status, {**base, **(headers or {})}, body


async def _wait_disconnect(request: HttpRequest) -> None:
    receive = request._receive
    while (await receive())["type"] != "http.disconnect":
        pass


def _abort(request: HttpRequest) -> None:
    """Drop a page that stopped reading (see ``gateway.abort_connection``)."""
    cycle = getattr(request._send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
    request._app_state = _request.DONE  # asgineer must not try to finish this response
