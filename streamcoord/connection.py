"""Redis clients, made at process start and passed down (never at import).

``Settings.redis_url`` names the Redis; with none set, the embedded default serves an in-process
stand-in (fakeredis) shared by every client this factory makes, for single-process demos.
"""

from __future__ import annotations

import os
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

from .errors import ConfigurationError
from .settings import Settings


class RedisFactory:
    """Makes the Redis clients of one process, each named in ``CLIENT LIST`` by its role."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._server: Any = None  # the embedded stand-in, made on first use

    def client(self, role: str, max_connections: int = 4) -> Redis:
        """A client with its own pool of at most ``max_connections`` (callers wait for a free one
        instead of opening more)."""
        name = f"streamcoord:{role}:{os.getpid()}"
        if self.settings.embedded:
            return self._embedded_client(name)
        pool = BlockingConnectionPool.from_url(
            self.settings.redis_url,
            max_connections=max_connections,
            timeout=self.settings.redis_socket_timeout,
            socket_timeout=self.settings.redis_socket_timeout,
            socket_connect_timeout=self.settings.redis_socket_timeout,
            health_check_interval=30,
            client_name=name,
        )
        return Redis(connection_pool=pool)

    def _embedded_client(self, name: str) -> Redis:
        try:
            import fakeredis  # optional: only the embedded default needs it
        except ImportError:
            raise ConfigurationError(
                "STREAMCOORD_REDIS_URL is not set and the embedded default needs fakeredis: "
                "pip install 'streamcoord[embedded]', or point STREAMCOORD_REDIS_URL at a Redis"
            ) from None
        if self._server is None:
            self._server = fakeredis.FakeServer()
        client: Redis = fakeredis.FakeAsyncRedis(server=self._server, client_name=name)
        return client
