"""The embedded default: a Redis stand-in (fakeredis) inside this process, for trying things out.

It listens on a unix socket in a private temporary directory (mode 0700: only this user can
reach it; a loopback TCP port would let any local user read and write every task), so
everything talks to it through a Redis URL like to a real Redis, and this user's other processes
can use it too: the server writes its URL to a file (``Settings.embedded_url_file``, mode 0600)
that they read. That file also carries the stream-token secret of the run (a new random one each
time, unless ``STREAMCOORD_SECRET`` is set), so the project's commands mint tokens the serving
process accepts. It keeps nothing on disk, and is no substitute for Redis in production.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import socket
import socketserver
import tempfile
import threading
from pathlib import Path
from typing import Any, NamedTuple

import redis

from .errors import ConfigurationError


class Announcement(NamedTuple):
    """What a serving process tells the project's other processes in the URL file."""

    url: str
    #: The stream-token secret the serving process checks tokens with.
    secret: str


class EmbeddedRedis:
    """A fakeredis server on a unix socket in a private directory, served by a daemon thread."""

    def __init__(self, url_file: str = "", secret: str = "") -> None:
        self._directory = tempfile.mkdtemp(prefix="streamcoord-embedded-")  # mode 0700
        try:
            self._server = _unix_fake_server(os.path.join(self._directory, "redis.sock"))
        except BaseException:
            shutil.rmtree(self._directory, ignore_errors=True)
            raise
        self.url = f"unix://{self._server.server_address}?db=0"
        #: Signs and checks this run's stream tokens (the configured secret, else a random one).
        self.secret = secret or secrets.token_urlsafe(48)
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-redis", daemon=True)
        self._thread.start()
        self.url_file = Path(url_file) if url_file else None
        if self.url_file is not None:
            _write_private(self.url_file, f"{self.url}\n{os.getpid()}\n{self.secret}\n")

    def close(self) -> None:
        if self.url_file is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.url_file.read_text().split()[0] == self.url:
                    self.url_file.unlink()
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._directory, ignore_errors=True)


def _unix_fake_server(path: str) -> Any:
    """fakeredis's RESP server (``TcpFakeServer``'s request handler and state) on a unix socket."""
    try:  # optional: only the embedded default needs it
        from fakeredis import FakeServer
        from fakeredis._clients._tcp_server import TCPFakeRequestHandler
    except ImportError:
        raise ConfigurationError(
            "STREAMCOORD_REDIS_URL is not set and the embedded default needs fakeredis: "
            "pip install 'streamcoord[embedded]', or point STREAMCOORD_REDIS_URL at a Redis"
        ) from None

    class UnixFakeServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def __init__(self) -> None:
            # What TCPFakeRequestHandler expects of TcpFakeServer.
            self._shutdown_event = threading.Event()
            self.fake_server = FakeServer(server_type="redis", version=(8, 0))
            self.client_ids = itertools.count(0)
            self.clients: dict[Any, Any] = {}
            self._numbers = itertools.count(1)
            super().__init__(path, TCPFakeRequestHandler)

        def get_request(self) -> tuple[socket.socket, Any]:
            # The handler keys its connections by client address, and every unix-socket peer
            # has the same one (''): number them instead.
            connection, _ = self.socket.accept()
            return connection, ("unix", next(self._numbers))

        def shutdown(self) -> None:
            self._shutdown_event.set()
            super().shutdown()

    return UnixFakeServer()


def _write_private(path: Path, content: str) -> None:
    """Write ``path`` as a new file of mode 0600 (created so, never widened for a moment), in
    one step for readers: a file of that name written before is replaced, whatever its mode."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(content)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def discover(url_file: str) -> Announcement | None:
    """What an embedded server another local process announced, if it still answers."""
    if not url_file:
        return None
    try:
        url, _pid, secret = Path(url_file).read_text().split()[:3]
    except (OSError, ValueError):
        return None
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError:
        return None
    return Announcement(url, secret)
