"""Redis clients, made at process start and passed down (never at import).

``STREAMCOORD_REDIS_URL`` names the Redis, in one of these forms:

    redis://[user:password@]host:port/db  one Redis (also rediss:// for TLS)
    unix:///path/to/redis.sock?db=0       one Redis on a unix socket
    redis+sentinel://[user:password@]host:port,host:port/service[/db]
                                          the master of a Sentinel-managed group; after a
                                          failover clients reconnect to the new master
    redis+cluster://[user:password@]host:port,host:port
                                          a Redis Cluster (the startup nodes); every key of one
                                          task shares one hash slot
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .errors import ConfigurationError
from .settings import Settings

log = logging.getLogger(__name__)

#: How often a process asks the sentinels where the master is.
MASTER_CHECK_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Topology:
    """What a Redis URL names."""

    kind: str  # "single", "sentinel" or "cluster"
    url: str = ""  # the URL itself, for "single"
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or the cluster's startup nodes
    service: str = ""  # the Sentinel service (master group) name
    db: int = 0
    password: str | None = None
    #: The ACL user (``deploy/users.acl`` has one per role); None logs in as ``default``.
    username: str | None = None


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    return url.replace(f"{user}:{parts.password}@", f"{user}:***@", 1)


def parse_redis_url(url: str) -> Topology:
    """Read a ``STREAMCOORD_REDIS_URL``; raise :class:`ConfigurationError` with the forms."""
    scheme = url.partition("://")[0]
    if scheme in ("redis", "rediss", "unix"):
        return Topology("single", url=url)
    if scheme not in ("redis+sentinel", "redis+cluster"):
        raise ConfigurationError(
            f"STREAMCOORD_REDIS_URL {redacted(url)!r}: use redis://, rediss://, unix://, "
            "redis+sentinel://host:port,.../service[/db] or redis+cluster://host:port,..."
        )
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    try:
        nodes = tuple((host, int(port)) for host, _, port in (n.rpartition(":") for n in hosts.split(",")))
    except ValueError:
        raise ConfigurationError(f"STREAMCOORD_REDIS_URL {redacted(url)!r}: nodes must be host:port") from None
    path = [p for p in parts.path.split("/") if p]
    if scheme == "redis+cluster":
        return Topology("cluster", nodes=nodes, password=password, username=username)
    if not path:
        raise ConfigurationError(f"STREAMCOORD_REDIS_URL {redacted(url)!r}: name the Sentinel service after the hosts")
    db = int(path[1]) if len(path) > 1 else 0
    return Topology("sentinel", nodes=nodes, service=path[0], db=db, password=password, username=username)


def is_cluster_url(url: str) -> bool:
    return url.startswith("redis+cluster://")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (it finds the current master) that waits for a free connection."""


#: Set while a task holds a slot of a gated cluster client (see _GatedCluster).
_holding_gate: contextvars.ContextVar[bool] = contextvars.ContextVar("holding_gate", default=False)


#: Where redis-py, asyncio and uvloop tear a connection down. An AttributeError or TypeError
#: raised in them is a connection closed under a command (redis-py 8.1, issue
#: redis/redis-py#4287: a concurrent disconnect leaves ``_writer`` None mid-connect, seen in slot
#: migrations), and so is uvloop's RuntimeError "unable to perform operation on <transport>;
#: the handler is closed" (the same race, under uvloop's transports): not bugs of ours. They are
#: re-raised as the ConnectionError every retry in streamcoord handles.
_TRANSPORT_FILES = (
    "redis/asyncio/connection.py", "asyncio/streams.py", "asyncio/selector_events.py",
    "uvloop/handles/handle.pyx",
)
_TRANSPORT_ERRORS = (AttributeError, TypeError, RuntimeError)


def torn_down(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's, asyncio's or uvloop's internal error for a connection
    closed under a command (the innermost frame is in their transport code)."""
    if not isinstance(exc, _TRANSPORT_ERRORS) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(_TRANSPORT_FILES)


@contextlib.contextmanager
def _connection_errors() -> Iterator[None]:
    try:
        yield
    except _TRANSPORT_ERRORS as exc:
        if torn_down(exc):
            raise RedisConnectionError(f"connection closed under a command: {exc}") from exc
        raise


class _GatedCluster(RedisCluster):
    """A cluster client whose callers wait for a free slot: redis-py's cluster pools raise
    MaxConnectionsError when full. A command holds one connection, a pipeline at most one per
    node, so ``concurrency`` slots never need more than ``concurrency`` connections per node.
    A pipeline whose commands are redirected (MOVED, ASK) re-sends them through
    execute_command inside its slot: that call must not wait for a second slot."""

    def __init__(self, *, concurrency: int, **kwargs: Any) -> None:
        kwargs["max_connections"] = concurrency
        super().__init__(**kwargs)
        self._gate = asyncio.Semaphore(concurrency)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if _holding_gate.get():
            with _connection_errors():
                return await super().execute_command(*args, **kwargs)
        async with self._gate:
            token = _holding_gate.set(True)
            try:
                with _connection_errors():
                    return await super().execute_command(*args, **kwargs)
            finally:
                _holding_gate.reset(token)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def gated_execute(*args: Any, **kwargs: Any) -> Any:
            async with self._gate:
                token = _holding_gate.set(True)
                try:
                    with _connection_errors():
                        return await execute(*args, **kwargs)
                finally:
                    _holding_gate.reset(token)

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
        self._clients: list[Redis] = []
        self._watcher: asyncio.Task[None] | None = None

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
        if self._sentinel is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._follow_master(), name="streamcoord-sentinel")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _follow_master(self) -> None:
        """Sentinel pools look the master up only when they open a connection, so after a
        failover open connections would go on writing to the old master (until Sentinel demotes
        it, seconds later, losing those writes). Ask the sentinels twice a second instead, and
        drop every connection when the master moved: the next command finds the new one."""
        assert self._sentinel is not None
        known: Any = None
        while True:
            await asyncio.sleep(MASTER_CHECK_SECONDS)
            try:
                master = await self._sentinel.discover_master(self.topology.service)
            except (RedisError, OSError) as exc:
                log.warning("asking the sentinels for the master failed: %s", exc)
                continue
            if known is not None and master != known:
                log.warning("Redis master moved from %s to %s: reconnecting", known, master)
                for client in self._clients:
                    await client.connection_pool.disconnect()
            known = master

    def client(
        self, role: str, max_connections: int = 4, wait_seconds: float | None = None, protocol: int | None = None
    ) -> Redis:
        """A client with at most ``max_connections`` (per node, in a cluster): callers wait for a
        free one (up to ``wait_seconds``, default the socket timeout) instead of opening more.
        ``protocol``: RESP version, when not redis-py's default."""
        settings, topology = self.settings, self.topology
        common: dict[str, Any] = {
            "socket_timeout": settings.redis_socket_timeout,
            "socket_connect_timeout": settings.redis_socket_timeout,
            "client_name": f"streamcoord:{role}:{os.getpid()}",
        }
        if protocol is not None:
            common["protocol"] = protocol
        if topology.kind == "cluster":
            cluster = _GatedCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
                username=topology.username,
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
                    username=topology.username,
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
            self._clients.append(master)
            return master
        pool = BlockingConnectionPool.from_url(
            topology.url,
            max_connections=max_connections,
            timeout=wait_seconds or settings.redis_socket_timeout,
            health_check_interval=30,
            **common,
        )
        return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def sync_client(settings: Settings, role: str) -> Any:
    """A blocking redis-py client for ``settings.redis_url``, whatever its topology: one Redis,
    Sentinel's current master, or a cluster. For the few sync callers (``is_task_running``,
    ``cleanup_old_tasks``): ``redis.Redis.from_url`` knows none of the ``redis+`` schemes."""
    import redis
    import redis.cluster
    import redis.sentinel

    topology = parse_redis_url(settings.redis_url)
    common: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
        "client_name": f"streamcoord:{role}:{os.getpid()}",
    }
    if topology.kind == "cluster":
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in topology.nodes],  # type: ignore[no-untyped-call]
            username=topology.username, password=topology.password, **common,
        )
    if topology.kind == "sentinel":
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(topology.nodes), sentinel_kwargs={"socket_timeout": settings.redis_socket_timeout},
            username=topology.username, password=topology.password,
        )
        return sentinel.master_for(topology.service, db=topology.db, **common)  # type: ignore[no-untyped-call]
    return redis.Redis.from_url(topology.url, **common)
