"""Issue 11's hardening: what the gateway, its socket, the demo and the embedded default refuse.

Each test here failed on the code before the fix it guards, except the ones that say they
guard what already worked (a worker's bad return value, the demo's own requests).
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.embedded import EmbeddedRedis, discover
from streamcoord.errors import ConfigurationError, PayloadNotSerializable, PayloadTooLarge
from streamcoord.jobs import JobQueue
from streamcoord.server import bind
from streamcoord.settings import Settings

from .processes import REPO, Gateway, Project
from .workerparts import Executor, FakeTask, Rows, Run, settle
from .workloads import KEYS, state, stream

pytestmark = pytest.mark.system

JOB = TaskRef("shop", "Job", "1")

# -- a. --socket PATH removes only a stale unix socket ----------------------------------------


def test_bind_refuses_a_regular_file_and_leaves_it_alone(tmp_path: Path) -> None:
    precious = tmp_path / "settings.py"
    precious.write_text("keep me\n")
    with pytest.raises(ConfigurationError, match="not a unix socket"):
        bind(None, None, str(precious))
    assert precious.read_text() == "keep me\n"


def test_bind_refuses_a_directory_and_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("dir", "link"):
        with pytest.raises(ConfigurationError, match="not a unix socket"):
            bind(None, None, str(tmp_path / name))
    assert (tmp_path / "dir").is_dir() and (tmp_path / "target").read_text() == "x"


def test_bind_replaces_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    path = str(tmp_path / "gw.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a server that died
    sock = bind(None, None, path)
    try:
        with pytest.raises(ConfigurationError, match="another server is listening"):
            bind(None, None, path)  # sock listens there now
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)  # still the first one's
    finally:
        sock.close()


def test_gateway_command_refuses_a_file_at_its_socket_path(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me\n")
    result = subprocess.run(
        [sys.executable, "-m", "streamcoord", "gateway", "--socket", str(precious)],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "STREAMCOORD_REDIS_URL": "redis://127.0.0.1:1/0",
                          "STREAMCOORD_STREAM_AUTH": "public"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "not a unix socket" in result.stderr and "Traceback" not in result.stderr
    assert precious.read_text() == "keep me\n"


def test_a_port_that_cannot_be_bound_is_a_message_not_a_traceback() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(ConfigurationError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            bind("127.0.0.1", taken.getsockname()[1], None)
    finally:
        taken.close()
    with pytest.raises(ConfigurationError, match=r"cannot listen on 127\.0\.0\.1:99999"):
        bind("127.0.0.1", 99999, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--socket", "gw.sock", "--port", "0"], "--socket and --host/--port exclude each other"),
        (["--port", "0", "--admin-socket", "a.sock", "--admin-port", "0"], "--admin-socket and --admin-port/--admin-host"),
        (["--port", "99999"], "cannot listen on 127.0.0.1:99999"),
    ],
)
def test_gateway_command_refuses_listeners_it_cannot_honour(tmp_path: Path, options: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamcoord", "gateway", *options],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "STREAMCOORD_STREAM_AUTH": "public",
                           "STREAMCOORD_REDIS_URL": "redis://127.0.0.1:1/0"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_create_task_refuses_a_value_its_field_cannot_take(project: Project) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "create_task", "ProgressTask", "--set", "steps=abc"],
        cwd=REPO, env=project.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "cannot create ProgressTask" in result.stderr and "Traceback" not in result.stderr
    assert project.create_task("ProgressTask", "steps=1")["started"] is False


def test_runserver_stream_refuses_a_file_at_its_socket_path(project: Project) -> None:
    precious = project.directory / "notes.txt"
    precious.write_text("keep me\n")
    result = subprocess.run(
        [sys.executable, "manage.py", "runserver_stream", "--socket", str(precious)],
        cwd=REPO, env=project.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "not a unix socket" in result.stderr
    assert precious.read_text() == "keep me\n"


# -- b./c. the gateway's answers: headers, methods, echoes -----------------------------------


def _http(gateway: Gateway) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(gateway.socket))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10)


async def test_ended_task_json_answer_is_not_cached_nor_sniffed(gateway: Gateway, event_log: EventLog) -> None:
    writer = event_log.writer(JOB)
    await writer.append("progress", {"step": 1})
    await writer.append("complete", {"message": "done"}, final_value={"total": 1})
    async with _http(gateway) as client:
        answer = await client.get("/stream/shop/Job/1")
    assert answer.status_code == 200 and answer.json()["final_value"] == {"total": 1}
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["vary"] == "Accept"
    assert answer.headers["x-content-type-options"] == "nosniff"


async def test_plain_text_errors_are_not_sniffed(gateway: Gateway) -> None:
    async with _http(gateway) as client:
        for path in ("/nope", "/stream/shop/Nope/1", "/stream/shop/Job/bad!id"):
            answer = await client.get(path)
            assert answer.status_code in (400, 404), path
            assert answer.headers["x-content-type-options"] == "nosniff", path


@pytest.mark.parametrize("path", ["/health", "/ready", "/stream/shop/Job/1"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_read_only_routes_answer_405_with_allow(gateway: Gateway, path: str, method: str) -> None:
    async with _http(gateway) as client:
        answer = await client.request(method, path)
    assert answer.status_code == 405, answer.text
    # A stream also answers CORS preflights.
    assert answer.headers["allow"] == ("GET, HEAD, OPTIONS" if path.startswith("/stream/") else "GET, HEAD")
    assert answer.headers["x-content-type-options"] == "nosniff"


async def test_read_only_routes_still_serve_get_and_head(gateway: Gateway) -> None:
    async with _http(gateway) as client:
        for path in ("/health", "/ready"):
            assert (await client.get(path)).status_code == 200
            assert (await client.head(path)).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/stream/shop/Job/" + "9" * 5000,
        "/stream/shop/" + "J" * 5000 + "/1",
        "/stream/" + "a" * 5000 + "/Job/1",
        "/stream/" + "Z" * 5000 + "/1",
        "/stream/shop/Job/" + "!" * 5000,
    ],
)
async def test_error_bodies_echo_only_an_excerpt_of_the_path(gateway: Gateway, path: str) -> None:
    async with _http(gateway) as client:
        answer = await client.get(path)
    assert answer.status_code in (400, 404)
    assert len(answer.text) < 250, answer.text


# -- d. a final value is held to the payloads' rules ------------------------------------------

TOO_LARGE = "x" * (Settings().max_payload_bytes + 1)


@pytest.mark.parametrize(
    ("value", "error"),
    [(math.nan, PayloadNotSerializable), (math.inf, PayloadNotSerializable),
     ("\ud800", PayloadNotSerializable), (TOO_LARGE, PayloadTooLarge)],
)
async def test_complete_with_a_bad_final_value_writes_nothing(
    redis: Redis, event_log: EventLog, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await event_log.writer(JOB).append("complete", {"message": "done"}, final_value=value)
    assert await redis.exists(KEYS.events(JOB), KEYS.state(JOB)) == 0


@pytest.mark.parametrize(
    ("value", "error"), [(math.nan, PayloadNotSerializable), (TOO_LARGE, PayloadTooLarge)]
)
async def test_set_final_value_refuses_a_bad_value(
    redis: Redis, event_log: EventLog, value: Any, error: type[Exception]
) -> None:
    await event_log.writer(JOB).append("complete", {"message": "done"})
    with pytest.raises(error):
        await event_log.set_final_value(JOB, value)
    assert (await state(redis, JOB)).get("final_value") is None


@pytest.fixture
def rows(monkeypatch: pytest.MonkeyPatch) -> Rows:
    return Rows(monkeypatch)


async def run_task(redis: Redis, event_log: EventLog, rows: Rows, body: Any) -> None:
    rows.add(JOB, body)
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await queue.start(JOB)
    [job] = await queue.claim("w1", 1, 100)
    run = Run(job, "run-1")
    run.task = asyncio.create_task(Executor("w1", queue, event_log, 30_000).run(run, None))
    await settle(run.task)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("value", [math.nan, TOO_LARGE], ids=["nan", "too-large"])
async def test_a_task_returning_a_bad_value_ends_with_one_error(
    redis: Redis, event_log: EventLog, rows: Rows, value: Any
) -> None:
    """Already so before (the ``complete`` payload carries the value): kept as a guard."""
    async def body(task: FakeTask) -> Any:
        await task.send_event("progress", {"step": 1})
        return value

    await run_task(redis, event_log, rows, body)
    assert [e.type.decode() for e in await stream(redis, JOB)] == ["progress", "error"]
    assert [status for status, _ in rows.outcomes_of(JOB)] == ["failed"]
    assert "final_value" not in await state(redis, JOB)


@pytest.mark.timeout(20)
async def test_a_task_that_sent_its_own_complete_and_returns_nan_keeps_no_nan(
    redis: Redis, event_log: EventLog, rows: Rows
) -> None:
    async def body(task: FakeTask) -> Any:
        await task.send_event("complete", {"message": "done"})
        return math.nan

    await run_task(redis, event_log, rows, body)
    assert [e.type.decode() for e in await stream(redis, JOB)] == ["complete"]
    assert [status for status, _ in rows.outcomes_of(JOB)] == ["completed"]
    assert "final_value" not in await state(redis, JOB)


# -- e. the demo starts tasks only for its own page -------------------------------------------


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded default as ``./run demo --port 0`` starts it."""
    project = Project(tmp_path_factory.mktemp("demo"))
    project.manage("migrate", "--noinput", "-v", "0")
    server = project.start("demo", "runserver_stream", "--host", "127.0.0.1", "--port", "0", ready="listening on")
    try:
        found = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", server.log_text())
        assert found, server.log_text()
        yield found[0]
    finally:
        server.stop()


def _start(demo_url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{demo_url}/demo/start?kind=example", headers=headers, timeout=10)


def test_demo_start_refuses_a_foreign_origin(demo_url: str) -> None:
    for origin in ("http://evil.example", "null", demo_url.replace("http:", "https:"), demo_url + "1"):
        answer = _start(demo_url, origin=origin)
        assert answer.status_code == 403, origin
        assert answer.headers["content-type"].startswith("text/plain") and "cross-origin" in answer.text


def test_demo_start_refuses_a_cross_site_fetch(demo_url: str) -> None:
    answer = _start(demo_url, **{"sec-fetch-site": "cross-site"})
    assert answer.status_code == 403 and "cross-site" in answer.text


def test_demo_start_refuses_a_host_that_is_not_loopback(demo_url: str) -> None:
    port = demo_url.rpartition(":")[2]
    for host in (f"evil.example:{port}", f"10.0.0.1:{port}", "localhost.evil.example"):
        # A DNS-rebound page is same-origin with itself: only its Host gives it away.
        answer = _start(demo_url, host=host, origin=f"http://{host}")
        assert answer.status_code == 403, host
        assert "loopback" in answer.text


def test_demo_start_serves_its_own_page_and_local_tools(demo_url: str) -> None:
    port = demo_url.rpartition(":")[2]
    cases = [
        {},  # curl: no Origin
        {"origin": demo_url, "sec-fetch-site": "same-origin"},  # the demo page's fetch
        {"host": f"localhost:{port}", "origin": f"http://localhost:{port}"},
        {"host": f"[::1]:{port}", "origin": f"http://[::1]:{port}"},
    ]
    for headers in cases:
        answer = _start(demo_url, **headers)
        assert answer.status_code == 200, (headers, answer.text)
        assert answer.json()["model"] == "ExampleTask"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1:8000", True), ("127.8.9.1", True), ("localhost", True), ("LOCALHOST:1", True),
     ("app.localhost:80", True), ("[::1]:8000", True), ("", False), ("evil.example", False),
     ("127.0.0.1.evil.example", False), ("[::2]:80", False), ("0.0.0.0:80", False)],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    from django_app.examples.demo import is_loopback_host  # after .workerparts set Django up

    assert is_loopback_host(host) is loopback


# -- f. the embedded stand-in is private to this user -----------------------------------------


def test_embedded_redis_listens_on_a_private_unix_socket(tmp_path: Path) -> None:
    url_file = tmp_path / "embedded.url"
    url_file.write_text("redis://127.0.0.1:1/0\n1\n")  # left by an earlier run
    url_file.chmod(0o644)
    embedded = EmbeddedRedis(str(url_file))
    try:
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        assert url_file.read_text().split()[0] == embedded.url
        assert embedded.url.startswith("unix://")
        sock_path = Path(embedded.url.removeprefix("unix://").partition("?")[0])
        assert stat.S_ISSOCK(sock_path.stat().st_mode)
        assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
        announced = discover(str(url_file))
        assert announced is not None and announced.url == embedded.url and announced.secret == embedded.secret
        first, second = (redis_sync.Redis.from_url(embedded.url) for _ in range(2))
        try:
            first.set("k", "v")
            assert second.get("k") == b"v"  # one server, two connections of their own
            first.xadd("s", {"a": "1"})
            assert [fields for _, fields in second.xrange("s")] == [{b"a": b"1"}]
        finally:
            first.close()
            second.close()
    finally:
        embedded.close()
    assert not url_file.exists() and not sock_path.parent.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left behind


def test_embedded_url_file_is_created_private(tmp_path: Path) -> None:
    url_file = tmp_path / "embedded.url"
    embedded = EmbeddedRedis(str(url_file))
    try:
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
    finally:
        embedded.close()
