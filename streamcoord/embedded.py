"""The embedded default: a Redis stand-in (fakeredis) inside this process, for trying things out.

It listens on a loopback port the kernel picks, so everything talks to it through a Redis URL
like to a real Redis, and other processes on this machine can use it too: the server writes its
URL to a file (``Settings.embedded_url_file``) that they read. It keeps nothing on disk, and is
no substitute for Redis in production.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import redis

from .errors import ConfigurationError


class EmbeddedRedis:
    """A fakeredis server on 127.0.0.1:<free port>, served by a daemon thread."""

    def __init__(self, url_file: str = "") -> None:
        try:
            from fakeredis import TcpFakeServer  # optional: only the embedded default needs it
        except ImportError:
            raise ConfigurationError(
                "STREAMCOORD_REDIS_URL is not set and the embedded default needs fakeredis: "
                "pip install 'streamcoord[embedded]', or point STREAMCOORD_REDIS_URL at a Redis"
            ) from None
        self._server: Any = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
        address: Any = self._server.server_address
        self.url = f"redis://{address[0]}:{address[1]}/0"
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-redis", daemon=True)
        self._thread.start()
        self.url_file = Path(url_file) if url_file else None
        if self.url_file is not None:
            self.url_file.write_text(f"{self.url}\n{os.getpid()}\n")

    def close(self) -> None:
        if self.url_file is not None:
            with contextlib.suppress(FileNotFoundError):
                if self.url_file.read_text().split()[0] == self.url:
                    self.url_file.unlink()
        self._server.shutdown()
        self._server.server_close()


def discover(url_file: str) -> str | None:
    """The URL of an embedded server another local process announced, if it still answers."""
    if not url_file:
        return None
    try:
        url = Path(url_file).read_text().split()[0]
    except (OSError, IndexError):
        return None
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError:
        return None
    return url
