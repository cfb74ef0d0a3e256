"""Redis clients, made at process start and passed down (never at import)."""

from __future__ import annotations

import os

from redis.asyncio import BlockingConnectionPool, Redis

from .errors import ConfigurationError
from .settings import Settings


class RedisFactory:
    """Makes the Redis clients of one process, each named in ``CLIENT LIST`` by role and pid."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ConfigurationError(
                "no Redis URL: set STREAMCOORD_REDIS_URL, or start the embedded default first"
            )
        self.settings = settings

    def client(self, role: str, max_connections: int = 4, wait_seconds: float | None = None) -> Redis:
        """A client with its own pool of at most ``max_connections``: callers wait for a free
        one (up to ``wait_seconds``, default the socket timeout) instead of opening more."""
        settings = self.settings
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=max_connections,
            timeout=wait_seconds or settings.redis_socket_timeout,
            socket_timeout=settings.redis_socket_timeout,
            socket_connect_timeout=settings.redis_socket_timeout,
            health_check_interval=30,
            client_name=f"streamcoord:{role}:{os.getpid()}",
        )
        return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections
