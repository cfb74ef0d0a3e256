"""Fixtures of the suite, and the guard that keeps the unit tier free of real processes.

The fixtures here that start real parts (a redis-server, gateway subprocesses, a Django project
on the real Redis) say so with ``@starts(...)``, and may only serve tests marked ``system``,
``cluster`` or ``browser``: a test that uses one, directly or through another fixture, without
such a marker fails collection (``pytest_make_collect_report``). So a mislabelled test cannot
slip into the unit tier, ``./run test-fast`` (``-m "not system and not browser and not cluster
and not slow"``), which runs with no redis-server at all.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from streamcoord.eventlog import EventLog
from streamcoord.keys import KeySpace
from streamcoord.registry import register_models
from streamcoord.settings import Settings

from .processes import Gateway, Project, RedisServer, start_gateway
from .rawsse import RawSSE

MODELS = [("shop", "Job"), ("shop", "Report"), ("other", "Report")]

_Function = TypeVar("_Function", bound=Callable[..., object])

#: A test that uses a fixture marked with ``starts`` needs one of these markers (pyproject.toml
#: says what each means).
REAL_TIERS = ("system", "cluster", "browser")


def starts(what: str) -> Callable[[_Function], _Function]:
    """Marks a fixture function as one that starts real parts (``what``, for the guard's message).
    Put it under ``@pytest.fixture``."""

    def mark(func: _Function) -> _Function:
        setattr(func, "starts_real_parts", what)  # noqa: B010 (mypy refuses the plain assignment)
        return func

    return mark


def real_parts(item: pytest.Function) -> list[str]:
    """The fixtures ``item`` resolves that start real parts, as ``name (what)``: those it reaches
    through others (a module's ``r(redis)``) too, but not a module's own fixture of the same name
    (``test_feed_logic``'s fakeredis ``redis``). Reads ``item._fixtureinfo``: private, but the
    only record of which definition of a name a test got."""
    found = []
    for name in item.fixturenames:
        # The last definition is the one used; it reaches the one before when it requests its
        # own name (an override built on the fixture it overrides).
        for fixturedef in reversed(item._fixtureinfo.name2fixturedefs.get(name, ())):
            what = getattr(fixturedef.func, "starts_real_parts", None)
            if what:
                found.append(f"{name} ({what})")
                break
            if name not in fixturedef.argnames:
                break
    return found


def mislabelled(item: pytest.Function) -> str | None:
    """Why ``item`` may not run in the unit tier although nothing marks it out of it, or None."""
    if any(item.get_closest_marker(tier) for tier in REAL_TIERS):
        return None
    parts = real_parts(item)
    return f"{item.nodeid} uses {', '.join(parts)} but is not marked system" if parts else None


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """Fails the collection of a module (or class) holding a test that uses real parts without a
    ``system``/``cluster``/``browser`` marker. Done here, not by raising in
    ``pytest_collection_modifyitems`` (an internal error under xdist): a failed collect report
    is a plain collection error, with this message, in one process and under ``-n`` alike."""
    report = yield
    if report.passed:
        problems = [p for item in report.result if isinstance(item, pytest.Function) and (p := mislabelled(item))]
        if problems:
            report.outcome = "failed"
            report.longrepr = (
                "tests that start real parts must be marked out of the unit tier:\n  "
                + "\n  ".join(problems)
                + "\nAdd `pytestmark = pytest.mark.system` at the top of the module (a list when"
                " several markers apply), or mark the test itself."
            )
            report.result = []
    return report


@pytest.fixture(scope="session")
@starts("a real redis-server")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session, on a unix socket of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
@starts("a client of the real redis-server")
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis(unix_socket_path=str(redis_server.socket))
    await client.flushall()
    await register_models(client, KeySpace("sc"), MODELS)
    yield client
    await client.aclose()


@pytest.fixture
@starts("Settings pointing at the real redis-server")
def settings(redis_server: RedisServer) -> Settings:
    return Settings(redis_url=redis_server.url)


@pytest.fixture
@starts("an EventLog on the real redis-server")
def event_log(redis: Redis, settings: Settings) -> EventLog:
    return EventLog(redis, settings)


@pytest.fixture
@starts("gateway subprocesses")
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
@starts("a gateway subprocess")
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
@starts("the example Django project, on the real redis-server")
def project(tmp_path: Path, redis_server: RedisServer, redis: Redis) -> Iterator[Project]:
    """The example Django project, migrated into a fresh SQLite file, on the session's Redis
    (emptied first by ``redis``: every test's database numbers its tasks from 1 again).
    Processes started with ``project.start``/``gateway``/``worker`` are stopped afterwards."""
    setup = Project(tmp_path, redis_server.url)
    setup.manage("migrate", "--noinput", "-v", "0")
    yield setup
    setup.stop_all()
