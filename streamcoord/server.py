"""Runs a gateway process: Redis clients, the hub, and uvicorn on a socket we bind ourselves.

Binding here (not in uvicorn) lets a unix socket get a mode that is not world-writable, lets
port 0 report the port the kernel picked, and keeps one code path for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import stat
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import cast

import uvicorn
from redis.asyncio.cluster import RedisCluster

from .connection import RedisFactory
from .dashboard import Dashboard
from .errors import ConfigurationError
from .eventlog import EventLog
from .gateway import ExtraRoutes, Gateway
from .guard import guarded_protocol
from .hub import Hub
from .metrics import deliveries
from .presence import GatewayPresence
from .settings import Settings
from .subscriber import ClusterConnector, Connector, PoolConnector

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
#: Seconds the admin listener gets to stop once the public one is done (its requests are short).
ADMIN_STOP_SECONDS = 5.0


class _IncompleteResponseFilter(logging.Filter):
    """A client cut for not reading ends without its last chunk; uvicorn reports that as an
    error, but here it is the intended way to close the connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


def bind(
    host: str | None, port: int | None, socket_path: str | None, option: str = "--socket"
) -> socket.socket:
    """A listening socket: a unix socket at ``socket_path``, else TCP ``host:port``. ``option``
    names the socket's command-line option in errors, which are ConfigurationErrors (a port in
    use or out of range, a directory that does not exist: a message, not a traceback)."""
    try:
        return _bind(host, port, socket_path, option)
    except (OSError, OverflowError) as exc:
        where = socket_path or f"{host or '127.0.0.1'}:{port or 0}"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"cannot listen on {where}: {reason}") from None


def _bind(host: str | None, port: int | None, socket_path: str | None, option: str) -> socket.socket:
    if socket_path:
        remove_stale_socket(socket_path, option)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if host and ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if socket_path:
            old_umask = os.umask(0o117)  # never world-writable, not even for a moment
            try:
                sock.bind(socket_path)
            finally:
                os.umask(old_umask)
            os.chmod(socket_path, SOCKET_MODE)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host or "127.0.0.1", port or 0))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


#: File descriptors a gateway needs besides its clients' (Redis, listeners, logs, the runtime).
FD_MARGIN = 64


def ensure_fd_room(max_connections: int) -> None:
    """Raise the soft open-files limit to the hard one, and warn when ``max_connections`` still
    does not fit: past the limit, accept() fails and clients see resets, not the 503 of the
    connection cap (systemd's default soft limit is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and max_connections + FD_MARGIN > soft:
        log.warning(
            "STREAMCOORD_MAX_CONNECTIONS (%d) does not fit the open-files limit (%d): lower it to "
            "%d or raise the limit (LimitNOFILE= in systemd, ulimit -n), or clients beyond the "
            "limit get connection resets instead of 503", max_connections, soft, max(1, soft - FD_MARGIN),
        )


def remove_stale_socket(path: str, option: str = "--socket") -> None:
    """Clear ``path`` for a new unix socket: remove a socket nobody listens on any more (left by
    a server that died), and refuse anything else, so a mistyped ``--socket`` never deletes a
    file, and a second server never steals a live one's socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        kind = "directory" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file"
        raise ConfigurationError(
            f"{option} {path}: a {kind} is there, not a unix socket; refusing to replace it "
            "(choose another path, or remove it yourself)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
        return
    except OSError:
        pass  # cannot tell (no permission, a full backlog): leave it alone
    finally:
        probe.close()
    raise ConfigurationError(
        f"{option} {path}: another server is listening there (or it cannot be checked); "
        "refusing to replace it (stop that server, or choose another path)"
    )


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
    return f"http://{host}:{address[1]}"


class _Server(uvicorn.Server):
    """uvicorn's server with our shutdown: the first SIGTERM/SIGINT tells the hub to end open
    streams at once (uvicorn would wait for them until its graceful timeout), a second one stops
    at once, and a gateway that drained exits 0 (uvicorn would re-raise the signal)."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self._hub = hub
        self._loop = asyncio.get_running_loop()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self.should_exit = True
        self._loop.call_soon_threadsafe(self._hub.close_all, "shutdown")


@contextlib.asynccontextmanager
async def gateway_parts(
    settings: Settings, factory: RedisFactory | None = None, extra_routes: ExtraRoutes | None = None,
    *, address: str = "", admin: str = "",
) -> AsyncIterator[Gateway]:
    """A started gateway (hub running) and its Redis clients, closed on exit. Its entry in the
    registry of gateways (``sc:gateways``: :class:`~streamcoord.presence.GatewayPresence`) is
    there from the start, kept current, and removed on exit; ``address`` and ``admin`` are
    its listeners' URLs (:func:`describe`; "" when unknown, as inside another ASGI server)."""
    factory = factory or RedisFactory(settings)
    # History and catch-up reads and the rest share three connections, waiting for a free one
    # under load rather than opening more (or failing); live events come on the subscriber's
    # own connection (one per node in a cluster), which speaks RESP2: one parse per message.
    redis = factory.client("gateway", max_connections=3, wait_seconds=30)
    subscriber = factory.client("gateway-subscriber", max_connections=1, protocol=2)
    await factory.ready(redis, subscriber)
    connector: Connector = (
        ClusterConnector(cast(RedisCluster, subscriber)) if factory.clustered
        else PoolConnector(subscriber.connection_pool)
    )
    hub = Hub(connector, redis, settings)
    await hub.start()
    events = EventLog(redis, settings)
    presence = GatewayPresence(
        redis, events.keys, hub.gateway_id, settings, address=address, admin=admin, stats=hub.stats,
        counts=lambda: {
            "listeners": hub.listener_count, "streams": hub.stream_count, "deliveries": deliveries(hub.stats),
        },
    )
    try:
        await presence.start()
        yield Gateway(events, hub, settings, extra_routes)
    finally:
        await presence.stop()
        await hub.stop()
        await factory.close()
        await subscriber.aclose()
        await redis.aclose()


class _AdminServer(uvicorn.Server):
    """The admin listener's server. It leaves the signals to the public server's, and stops
    when :func:`serve` tells it to (after the public one)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(
    sockets: contextlib.ExitStack, host: str | None, port: int | None, socket_path: str | None, option: str
) -> socket.socket:
    """``bind``, and close the socket (and remove a unix socket's file) when ``sockets`` closes."""
    sock = bind(host, port, socket_path, option)

    def close() -> None:
        sock.close()
        if socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)

    sockets.callback(close)
    return sock


@contextlib.asynccontextmanager
async def _admin_listener(
    admin: _AdminServer | None, sock: socket.socket | None, public: _Server
) -> AsyncIterator[None]:
    """Runs the admin server beside the public one, and stops it once the public one is done.
    If it stops by itself (it failed), it stops the gateway too: an operator relies on it."""
    if admin is None or sock is None:
        yield
        return

    def ended(task: asyncio.Task[None]) -> None:
        if not public.should_exit:
            error = None if task.cancelled() else task.exception()
            log.error("the admin listener stopped (%r); stopping the gateway", error)
            public.handle_exit(signal.SIGTERM, None)

    task = asyncio.create_task(admin.serve(sockets=[sock]), name="admin listener")
    task.add_done_callback(ended)
    try:
        yield
    finally:
        admin.should_exit, admin.force_exit = True, public.force_exit
        try:
            await asyncio.wait_for(task, timeout=ADMIN_STOP_SECONDS)
        except TimeoutError:
            log.warning("the admin listener did not stop within %s s; cancelled", ADMIN_STOP_SECONDS)
        except Exception:
            log.exception("the admin listener failed")


async def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    socket_path: str | None = None,
    admin_host: str | None = None,
    admin_port: int | None = None,
    admin_socket_path: str | None = None,
    factory: RedisFactory | None = None,
    extra_routes: ExtraRoutes | None = None,
    announce: str = "streamcoord gateway listening on {url}",
    admin_announce: str = "streamcoord admin on {url}",
) -> None:
    """Serve until SIGTERM/SIGINT, then end open streams within the grace period.

    With ``admin_socket_path`` (or ``admin_port``: TCP on ``admin_host``, default 127.0.0.1)
    a second listener serves the internal routes (``/stats``), which the public one never
    does; without, there is none."""
    ensure_fd_room(settings.max_connections)
    with contextlib.ExitStack() as sockets:
        sock = _listen(sockets, host, port, socket_path, "--socket")
        admin_sock = None
        if admin_socket_path or admin_port is not None:
            admin_sock = _listen(sockets, admin_host, admin_port, admin_socket_path, "--admin-socket")
        logging.getLogger("uvicorn.error").addFilter(_IncompleteResponseFilter())
        address = describe(sock)
        admin_address = describe(admin_sock) if admin_sock is not None else ""
        async with gateway_parts(settings, factory, extra_routes, address=address, admin=admin_address) as gateway:
            # Limits on request heads and connections (streamcoord.guard), on the same
            # httptools parser uvicorn would pick.
            protocol = guarded_protocol(settings)
            config = uvicorn.Config(
                gateway.asgi(),
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
                log_level="info",
                http=protocol,
                # No websockets: an upgrade request is served as the plain GET it also is
                # (with them, uvicorn hands our HTTP handler a websocket scope: tracebacks).
                ws="none",
            )
            server = _Server(config, gateway.hub)
            admin = None
            if admin_sock is not None:
                admin = _AdminServer(uvicorn.Config(
                    gateway.admin_asgi(), lifespan="off", access_log=False,
                    timeout_graceful_shutdown=1, log_level="info", http=protocol, ws="none",
                ))
                print(admin_announce.format(url=admin_address), file=sys.stderr, flush=True)
            # A line tests and operators can wait for (last: both listeners are bound by then);
            # the port is the real one even for port 0.
            print(announce.format(url=address), file=sys.stderr, flush=True)
            async with _admin_listener(admin, admin_sock, server):
                try:
                    await server.serve(sockets=[sock])
                finally:
                    Dashboard.close_for(gateway)  # open dashboards end now, not at the admin's timeout
