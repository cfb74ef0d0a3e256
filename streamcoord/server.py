"""Runs a gateway process: Redis clients, the hub, and uvicorn on a socket we bind ourselves.

Binding here (not in uvicorn) lets a unix socket get a mode that is not world-writable, lets
port 0 report the port the kernel picked, and keeps one code path for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from types import FrameType

import uvicorn

from .connection import RedisFactory
from .errors import ConfigurationError
from .eventlog import EventLog
from .gateway import ExtraRoutes, Gateway
from .hub import Hub
from .settings import Settings

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


class _IncompleteResponseFilter(logging.Filter):
    """A client cut for not reading ends without its last chunk; uvicorn reports that as an
    error, but here it is the intended way to close the connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


def bind(host: str | None, port: int | None, socket_path: str | None) -> socket.socket:
    """A listening socket: a unix socket at ``socket_path``, else TCP ``host:port``."""
    if socket_path:
        remove_stale_socket(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)  # never world-writable, not even for a moment
        try:
            sock.bind(socket_path)
        finally:
            os.umask(old_umask)
        os.chmod(socket_path, SOCKET_MODE)
    else:
        family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "127.0.0.1", port or 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def remove_stale_socket(path: str) -> None:
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
            f"--socket {path}: a {kind} is there, not a unix socket; refusing to replace it "
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
        f"--socket {path}: another server is listening there (or it cannot be checked); "
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
    settings: Settings, factory: RedisFactory | None = None, extra_routes: ExtraRoutes | None = None
) -> AsyncIterator[Gateway]:
    """A started gateway (hub running) and its Redis clients, closed on exit."""
    factory = factory or RedisFactory(settings)
    # The hub's blocking read holds one connection; history reads and the rest share three
    # more, waiting for a free one under load rather than opening more (or failing).
    redis = factory.client("gateway", max_connections=3, wait_seconds=30)
    reader = factory.client("gateway-reader", max_connections=1)
    await factory.ready(redis, reader)
    hub = Hub(reader, redis, settings, clustered=factory.clustered)
    await hub.start()
    try:
        yield Gateway(EventLog(redis, settings), hub, settings, extra_routes)
    finally:
        await hub.stop()
        await factory.close()
        await reader.aclose()
        await redis.aclose()


async def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    socket_path: str | None = None,
    factory: RedisFactory | None = None,
    extra_routes: ExtraRoutes | None = None,
    announce: str = "streamcoord gateway listening on {url}",
) -> None:
    """Serve until SIGTERM/SIGINT, then end open streams within the grace period."""
    sock = bind(host, port, socket_path)
    logging.getLogger("uvicorn.error").addFilter(_IncompleteResponseFilter())
    async with gateway_parts(settings, factory, extra_routes) as gateway:
        config = uvicorn.Config(
            gateway.asgi(),
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
            log_level="info",
        )
        server = _Server(config, gateway.hub)
        # A line tests and operators can wait for; the port is the real one even for port 0.
        print(announce.format(url=describe(sock)), file=sys.stderr, flush=True)
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()
            if socket_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)
