"""The naive design: one blocking XREAD per client (naiveapp.py), events XADDed by the suite.

Its Redis pool allows ``clients + 10`` connections, so it serves every client the scenario
opens; each open stream holds one of them, and Redis wakes every reader for every event.
"""

from __future__ import annotations

import os
from pathlib import Path

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import UnixDomainSocketConnection

from ..pacing import Due, event_count, paced, stamped_data
from ..procs import RedisServer, make_dir, python_argv
from . import Endpoint
from .naiveapp import stream_key
from .served import ServedApp

#: Publisher connections (streams publish concurrently; each XADD is awaited).
PUBLISH_CONNECTIONS = 16


class Naive:
    name = "naive (XREAD per client)"

    def __init__(self, clients: int = 1000) -> None:
        self.clients = clients
        self.redis_server: RedisServer | None = None
        self.app: ServedApp | None = None
        self.redis: Redis | None = None
        self.ids: dict[int, list[str]] = {}

    async def start(self, workdir: Path, streams: int) -> Endpoint:
        self.redis_server = await RedisServer(workdir / "redis").start()
        socket = make_dir(workdir) / "naive.sock"
        self.app = ServedApp("naive gateway", socket, python_argv(
            "tests.bench.contenders.naiveapp", "--socket", str(socket),
            "--redis-url", self.redis_server.url, "--max-connections", str(self.clients + 10),
        ))
        await self.app.start()
        pool = BlockingConnectionPool(
            connection_class=UnixDomainSocketConnection, path=str(self.redis_server.socket),
            max_connections=PUBLISH_CONNECTIONS, timeout=30, client_name=f"bench:{os.getpid()}",
        )
        self.redis = Redis(connection_pool=pool)
        self.ids = {n: [] for n in range(1, streams + 1)}
        return Endpoint(socket=socket, server_pids=[self.app.pid], redis_pid=self.redis_server.pid)

    def stream_path(self, stream: int) -> str:
        return f"/stream/{stream}"

    async def wait_for_clients(self, expected: int, within: float) -> None:
        assert self.app is not None
        await self.app.wait_for_listeners(expected, within)

    async def publish(self, stream: int, rate: float, seconds: float) -> int:
        assert self.redis is not None
        ids = self.ids.setdefault(stream, [])
        total = event_count(rate, seconds)
        key = stream_key(stream)
        async for n in paced(total, rate):
            entry_id = await self.redis.xadd(key, {"type": "progress", "data": stamped_data(stream, n)})
            ids.append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
        await self.redis.xadd(key, {"type": "complete", "data": stamped_data(stream, total + 1)})
        return total

    async def publish_due(self, due: list[Due]) -> None:
        """Many streams' events at once (see pacing.paced_rounds): one pipeline of XADDs."""
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        for stream, n, complete in due:
            pipe.xadd(stream_key(stream), {
                "type": "complete" if complete else "progress", "data": stamped_data(stream, n),
            })
        for (stream, _, complete), entry_id in zip(due, await pipe.execute(), strict=True):
            if not complete:
                self.ids[stream].append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)

    # -- beyond the Contender protocol: resume and Redis figures ---------------------------

    async def published(self, stream: int) -> int:
        return len(self.ids.get(stream, ()))

    def event_id(self, stream: int, n: int) -> str:
        return self.ids[stream][n - 1]

    async def redis_connections(self) -> int | None:
        """Connections the gateway process holds (named ``naive:<pid>``)."""
        assert self.redis is not None and self.app is not None
        clients = await self.redis.client_list()
        return sum(1 for c in clients if c.get("name") == f"naive:{self.app.pid}")

    async def stop(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        for part in (self.app, self.redis_server):  # the gateway first, then its Redis
            if part is not None:
                await part.stop()
