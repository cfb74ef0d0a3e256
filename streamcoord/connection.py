"""Redis clients, made at process start and passed down (never at import).

``STREAMCOORD_REDIS_URL`` names the Redis, in one of these forms:

    redis://[:password@]host:port/db      one Redis (also rediss:// for TLS)
    unix:///path/to/redis.sock?db=0       one Redis on a unix socket
    redis+sentinel://[:password@]host:port,host:port/service[/db]
                                          the master of a Sentinel-managed group; after a
                                          failover clients reconnect to the new master
    redis+cluster://[:password@]host:port,host:port
                                          a Redis Cluster (the startup nodes); every key of one
                                          task shares one hash slot
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from .errors import ConfigurationError
from .settings import Settings


@dataclasses.dataclass(frozen=True)
class Topology:
    """What a Redis URL names."""

    kind: str  # "single", "sentinel" or "cluster"
    url: str = ""  # the URL itself, for "single"
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or the cluster's startup nodes
    service: str = ""  # the Sentinel service (master group) name
    db: int = 0
    password: str | None = None


def parse_redis_url(url: str) -> Topology:
    """Read a ``STREAMCOORD_REDIS_URL``; raise :class:`ConfigurationError` with the forms."""
    scheme = url.partition("://")[0]
    if scheme in ("redis", "rediss", "unix"):
        return Topology("single", url=url)
    if scheme not in ("redis+sentinel", "redis+cluster"):
        raise ConfigurationError(
            f"STREAMCOORD_REDIS_URL {url!r}: use redis://, rediss://, unix://, "
            "redis+sentinel://host:port,.../service[/db] or redis+cluster://host:port,..."
        )
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    password = unquote(parts.password) if parts.password else None
    try:
        nodes = tuple((host, int(port)) for host, _, port in (n.rpartition(":") for n in hosts.split(",")))
    except ValueError:
        raise ConfigurationError(f"STREAMCOORD_REDIS_URL {url!r}: nodes must be host:port") from None
    path = [p for p in parts.path.split("/") if p]
    if scheme == "redis+cluster":
        return Topology("cluster", nodes=nodes, password=password)
    if not path:
        raise ConfigurationError(f"STREAMCOORD_REDIS_URL {url!r}: name the Sentinel service after the hosts")
    db = int(path[1]) if len(path) > 1 else 0
    return Topology("sentinel", nodes=nodes, service=path[0], db=db, password=password)


def is_cluster_url(url: str) -> bool:
    return url.startswith("redis+cluster://")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (it finds the current master) that waits for a free connection."""


class _GatedCluster(RedisCluster):
    """A cluster client whose callers wait for a free slot: redis-py's cluster pools raise
    MaxConnectionsError when full. A command holds one connection, a pipeline at most one per
    node, so ``concurrency`` slots never need more than ``concurrency`` connections per node."""

    def __init__(self, *, concurrency: int, **kwargs: Any) -> None:
        kwargs["max_connections"] = concurrency
        super().__init__(**kwargs)
        self._gate = asyncio.Semaphore(concurrency)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._gate:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def gated_execute(*args: Any, **kwargs: Any) -> Any:
            async with self._gate:
                return await execute(*args, **kwargs)

        pipe.execute = gated_execute  # type: ignore[method-assign]
        return pipe


class RedisFactory:
    """Makes the Redis clients of one process, each named in ``CLIENT LIST`` by role and pid."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ConfigurationError(
                "no Redis URL: set STREAMCOORD_REDIS_URL, or start the embedded default first"
            )
        self.settings = settings
        self.topology = parse_redis_url(settings.redis_url)
        self._sentinel: Sentinel | None = None  # one per process: master_for makes a pool per call

    @property
    def clustered(self) -> bool:
        return self.topology.kind == "cluster"

    async def ready(self, *clients: Redis) -> None:
        """Connect now, at process start: a cluster client learns its slots here (lazily, a
        burst of first requests would race to set up connections), and an unreachable Redis is
        a clear error at start rather than on the first request."""
        for client in clients:
            if self.clustered:
                await cast(RedisCluster, client).initialize()
            await client.ping()

    def client(self, role: str, max_connections: int = 4, wait_seconds: float | None = None) -> Redis:
        """A client with at most ``max_connections`` (per node, in a cluster): callers wait for a
        free one (up to ``wait_seconds``, default the socket timeout) instead of opening more."""
        settings, topology = self.settings, self.topology
        common: dict[str, Any] = {
            "socket_timeout": settings.redis_socket_timeout,
            "socket_connect_timeout": settings.redis_socket_timeout,
            "client_name": f"streamcoord:{role}:{os.getpid()}",
        }
        if topology.kind == "cluster":
            cluster = _GatedCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
                password=topology.password,
                concurrency=max_connections,
                **common,
            )
            return cast(Redis, cluster)  # the same commands; redis-py types them apart
        if topology.kind == "sentinel":
            if self._sentinel is None:
                self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                    list(topology.nodes),
                    sentinel_kwargs={"socket_timeout": settings.redis_socket_timeout},
                    password=topology.password,
                )
            master: Redis = self._sentinel.master_for(
                topology.service,
                connection_pool_class=_BlockingSentinelPool,
                db=topology.db,
                max_connections=max_connections,
                timeout=wait_seconds or settings.redis_socket_timeout,
                health_check_interval=30,
                **common,
            )
            return master
        pool = BlockingConnectionPool.from_url(
            topology.url,
            max_connections=max_connections,
            timeout=wait_seconds or settings.redis_socket_timeout,
            health_check_interval=30,
            **common,
        )
        return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections
