from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from streamcoord.eventlog import EventLog
from streamcoord.keys import KeySpace
from streamcoord.registry import register_models
from streamcoord.settings import Settings

from .support import Gateway, Project, RawSSE, RedisServer, start_gateway

MODELS = [("shop", "Job"), ("shop", "Report"), ("other", "Report")]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session, on a unix socket of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis(unix_socket_path=str(redis_server.socket))
    await client.flushall()
    await register_models(client, KeySpace("sc"), MODELS)
    yield client
    await client.aclose()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return Settings(redis_url=redis_server.url)


@pytest.fixture
def event_log(redis: Redis, settings: Settings) -> EventLog:
    return EventLog(redis, settings)


@pytest.fixture
def gateway_factory(tmp_path: Path, redis_server: RedisServer) -> Iterator[object]:
    """Starts gateway subprocesses (``factory(**settings)``) and stops them by pid afterwards."""
    started: list[Gateway] = []
    counter = itertools.count()

    def factory(**settings: object) -> Gateway:
        gateway = start_gateway(tmp_path, redis_server.url, f"gw{next(counter)}", **settings)
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(gateway_factory: object) -> Gateway:
    return gateway_factory()  # type: ignore[operator, no-any-return]


@pytest.fixture
async def sse() -> AsyncIterator[object]:
    """Opens raw SSE clients (``await sse(socket, path, headers)``) and closes them after the test."""
    opened: list[RawSSE] = []

    async def open_client(
        socket: Path, path: str, headers: dict[str, str] | None = None, *,
        rcvbuf: int | None = None, read_head: bool = True,
    ) -> RawSSE:
        client = await RawSSE.open(socket, path, headers, rcvbuf=rcvbuf)
        opened.append(client)
        if read_head:
            await client.read_head()
        return client

    yield open_client
    for client in opened:
        client.close()
    for client in opened:
        with contextlib.suppress(OSError):
            await client.writer.wait_closed()


@pytest.fixture
def project(tmp_path: Path, redis_server: RedisServer, redis: Redis) -> Iterator[Project]:
    """The example Django project, migrated into a fresh SQLite file, on the session's Redis
    (emptied first by ``redis``: every test's database numbers its tasks from 1 again).
    Processes started with ``project.start``/``gateway``/``worker`` are stopped afterwards."""
    setup = Project(tmp_path, redis_server.url)
    setup.manage("migrate", "--noinput", "-v", "0")
    yield setup
    setup.stop_all()
