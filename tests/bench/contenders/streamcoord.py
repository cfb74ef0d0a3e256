"""streamcoord: its own redis-server, one ``python -m streamcoord gateway --socket`` process, and
events appended from the suite's process through EventLog / TaskWriter (the worker's path).

Streams 1..N are tasks ``bench.Job:<n>``, declared ``running`` before clients connect (so no
lazy start queues a job nobody takes). The gateway's queue bound, ``STREAMCOORD_CLIENT_QUEUE_SIZE``,
is a parameter.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import UnixDomainSocketConnection

from streamcoord import scripts
from streamcoord.eventlog import EventLog, TaskWriter
from streamcoord.ids import EventId
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.registry import register_models
from streamcoord.settings import Settings
from streamcoord.taskstate import State
from streamcoord.tokens import mint

from ..pacing import APP, MODEL, Due, event_count, paced, stamped_data
from ..procs import RedisServer, clean_env, make_dir, python_argv
from . import Endpoint
from .served import ServedApp

DEFAULT_QUEUE_SIZE = 10_000
#: The suite's own connections to Redis, for publishing.
PUBLISH_CONNECTIONS = 16
#: The gateway runs the default access mode: each client's path carries a token for its stream.
SECRET = "bench-secret-" + "b" * 40
TOKEN_SECONDS = 3600


class GatewayApp(ServedApp):
    """The gateway as a served app. Its ``/stats`` (what ``wait_for_listeners`` and
    ``server_counters`` read) is on its admin listener only, so the suite's GETs go there."""

    def __init__(self, socket: Path, admin_socket: Path, argv: list[str]) -> None:
        super().__init__("streamcoord gateway", socket, argv)
        self.admin_socket = admin_socket
        self._admin: httpx.AsyncClient | None = None

    async def start(self, env: dict[str, str] | None = None) -> None:
        await super().start(env)
        transport = httpx.AsyncHTTPTransport(uds=str(self.admin_socket))
        self._admin = httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=30)

    async def get(self, path: str) -> dict[str, Any]:
        assert self._admin is not None
        response = await self._admin.get(path)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def stop(self) -> None:
        if self._admin is not None:
            await self._admin.aclose()
            self._admin = None
        await super().stop()


class Streamcoord:
    name = "streamcoord"

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self.redis_server: RedisServer | None = None
        self.gateway: GatewayApp | None = None
        self.redis: Redis | None = None
        self.log: EventLog | None = None
        self.writers: dict[int, TaskWriter] = {}
        self.counts: dict[int, int] = {}
        self.settings = Settings()
        self.keyspace = KeySpace(self.settings.key_prefix)
        self._sha: str | None = None

    async def start(self, workdir: Path, streams: int) -> Endpoint:
        self.redis_server = await RedisServer(workdir / "redis").start()
        # Many streams open their writers at once: wait for a connection rather than fail.
        self.redis = Redis(connection_pool=BlockingConnectionPool(
            connection_class=UnixDomainSocketConnection, path=str(self.redis_server.socket),
            max_connections=PUBLISH_CONNECTIONS, timeout=30,
        ))
        return await self.serve(workdir, streams, self.redis_server.url, self.redis_server.pid)

    async def serve(self, workdir: Path, streams: int, url: str, redis_pid: int) -> Endpoint:
        """Start the gateway on ``url`` and declare streams 1..streams (``self.redis`` set)."""
        assert self.redis is not None
        socket = make_dir(workdir) / "gw.sock"
        admin = socket.with_name("gw.admin.sock")
        self.gateway = GatewayApp(socket, admin, python_argv(
            "streamcoord", "gateway", "--socket", str(socket), "--admin-socket", str(admin)
        ))
        await self.gateway.start(clean_env(
            STREAMCOORD_REDIS_URL=url, STREAMCOORD_CLIENT_QUEUE_SIZE=str(self.queue_size),
            STREAMCOORD_LAZY_START="0",
            STREAMCOORD_SECRET=SECRET,  # the default mode: every client carries a stream token
        ))
        settings = self.settings = Settings(redis_url=url)
        self.log = EventLog(self.redis, settings)
        await register_models(self.redis, KeySpace(settings.key_prefix), [(APP, MODEL)])
        for first in range(1, streams + 1, 500):
            await asyncio.gather(*(
                self.log.declare(self.ref(n), state=State.RUNNING)
                for n in range(first, min(streams, first + 499) + 1)
            ))
        return Endpoint(socket=self.gateway.socket, server_pids=[self.gateway.pid], redis_pid=redis_pid)

    async def publish_due(self, due: list[Due]) -> None:
        """Many streams' events at once (see pacing.paced_rounds): one call of the append
        script for all of them (the script takes several tasks' events on one Redis), with the
        arguments a TaskWriter sends, so Redis and the gateway do what they do for workers'
        events; the writer's own cost is the publish scenario's."""
        assert self.redis is not None
        if self._sha is None:
            self._sha = await self.redis.script_load(scripts.source("append"))
        keys: list[str] = []
        args: list[Any] = [
            self.settings.max_stream_length, self.settings.stream_ttl_seconds,
            self.settings.state_ttl_seconds, datetime.now(UTC).isoformat(),
        ]
        for stream, n, complete in due:
            ref = self.ref(stream)
            keys += [self.keyspace.events(ref), self.keyspace.state(ref)]
            args += [
                self.epoch(stream), n, "complete" if complete else "progress",
                stamped_data(stream, n), "completed" if complete else "", "", "bench-writer", "",
            ]
        replies = await self.append(keys, args)
        for (stream, n, complete), (status, *_) in zip(due, replies, strict=True):
            if status != b"ok":
                raise RuntimeError(f"append of event {n} of stream {stream}: {status!r}")
            if not complete:
                self.counts[stream] = n

    async def append(self, keys: list[str], args: list[Any]) -> list[Any]:
        """One call of the append script (its events are in ``keys`` pairs and ``args``)."""
        assert self.redis is not None and self._sha is not None
        replies: list[Any] = await self.redis.evalsha(self._sha, len(keys), *keys, *args)
        return replies

    @staticmethod
    def epoch(stream: int) -> str:
        return f"bench{stream}"

    @staticmethod
    def ref(stream: int) -> TaskRef:
        return TaskRef(APP, MODEL, str(stream))

    def stream_path(self, stream: int) -> str:
        token = mint(SECRET, [self.ref(stream)], expires_in=TOKEN_SECONDS)
        return f"/stream/{APP}/{MODEL}/{stream}?token={token}"

    async def wait_for_clients(self, expected: int, within: float) -> None:
        assert self.gateway is not None
        await self.gateway.wait_for_listeners(expected, within)

    async def publish(self, stream: int, rate: float, seconds: float) -> int:
        """Appends after the first are not awaited one by one (the writer numbers them when
        they are submitted and its publisher pipelines them), so a slow round trip does not
        lower the rate offered."""
        assert self.log is not None
        writer = self.writers[stream] = self.log.writer(self.ref(stream))
        self.counts[stream] = 0
        total = event_count(rate, seconds)
        pending: list[asyncio.Task[EventId]] = []

        def counted(task: asyncio.Task[EventId]) -> None:
            if not task.cancelled() and task.exception() is None:
                self.counts[stream] += 1

        async for n in paced(total, rate):
            if n == 1:  # opens the stream's epoch
                await writer.append("progress", {"t": time.time(), "n": 1})
                self.counts[stream] = 1
                continue
            task = asyncio.create_task(writer.append("progress", {"t": time.time(), "n": n}))
            task.add_done_callback(counted)
            pending.append(task)
        await asyncio.gather(*pending)
        await writer.append("complete", {"t": time.time(), "n": total + 1})
        return total

    # -- beyond the Contender protocol: resume and Redis figures ---------------------------

    async def published(self, stream: int) -> int:
        """Events appended so far (contiguous from 1: appends complete in order)."""
        return self.counts.get(stream, 0)

    def event_id(self, stream: int, n: int) -> str:
        writer = self.writers.get(stream)
        return f"{writer.epoch if writer is not None else self.epoch(stream)}-{n}"

    async def redis_connections(self) -> int | None:
        """Connections the gateway process holds (streamcoord names them ``...:<pid>``)."""
        assert self.redis is not None and self.gateway is not None
        clients: list[dict[str, Any]] = await self.redis.client_list()
        return sum(1 for c in clients if str(c.get("name", "")).endswith(f":{self.gateway.pid}"))

    async def server_counters(self) -> dict[str, int]:
        """The gateway's hub counters (``reads``: catch-up rounds, ``link_drops``: subscriber
        connections lost)."""
        assert self.gateway is not None
        stats = await self.gateway.get("/stats")
        return {k: v for k, v in stats.items() if k in ("reads", "link_drops")}

    async def stop(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        for part in (self.gateway, self.redis_server):  # the gateway first, then its Redis
            if part is not None:
                await part.stop()
