"""The predecessor's documented flows (django-streaming-coordinator 0.1.0 README), run as written.

Only the documented renames apply: ``streaming.models``/``streaming.coordinator`` became
``django_app.models``, ``django_app.examples.models`` and ``django_app.coordinator``, and
``poetry run python manage.py`` became ``python manage.py``. Every server binds port 0 or a unix
socket in the test's temporary directory; every process is stopped by the pid we started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from httpx_sse import aconnect_sse

from .processes import REPO, Gateway, Project, RedisServer

pytestmark = pytest.mark.system

CURL = shutil.which("curl")
_prefixes = itertools.count()

# The README's "Test it" lines, typed into `manage.py shell` (only the imports renamed).
TEST_IT_SHELL_LINES = """\
from django_app.examples.models import ExampleTask
from django_app.coordinator import coordinator
import asyncio
task = ExampleTask.objects.create(message="Test")
asyncio.run(coordinator.start_task(task, 'ExampleTask'))
"""

# What ExampleTask sends, as the README's "Example: ExampleTask" section shows it.
EXPECTED_EXAMPLE_EVENTS = [
    ("start", {"message": "Test", "total_steps": 3}),
    ("progress", {"step": 1, "total_steps": 3, "message": "Step 1 of 3"}),
    ("progress", {"step": 2, "total_steps": 3, "message": "Step 2 of 3"}),
    ("progress", {"step": 3, "total_steps": 3, "message": "Step 3 of 3"}),
    ("complete", {"message": "Task completed successfully"}),
]


@dataclasses.dataclass
class IsolatedProject(Project):
    """A Project whose keys in the session's shared Redis carry a prefix of this test's own, so
    tasks, job queues and workers of different tests never meet."""

    key_prefix: str = ""

    def env(self, **settings: Any) -> dict[str, str]:
        if self.key_prefix:
            settings.setdefault("key_prefix", self.key_prefix)
        return super().env(**settings)


@pytest.fixture
def started() -> Iterator[list[Gateway]]:
    """Background processes a test started; each is stopped (by its pid) afterwards."""
    handles: list[Gateway] = []
    yield handles
    for handle in handles:
        handle.stop()


@pytest.fixture
def embedded_project(tmp_path: Path) -> Project:
    """Nothing configured: no Redis URL at all (the embedded default)."""
    project = Project(tmp_path)
    project.manage("migrate", "--noinput", "-v", "0")
    return project


@pytest.fixture
def redis_project(tmp_path: Path, redis_server: RedisServer) -> IsolatedProject:
    """The session's real redis-server, under a key prefix of this test's own."""
    project = IsolatedProject(tmp_path, redis_server.url, key_prefix=f"pf{next(_prefixes)}")
    project.manage("migrate", "--noinput", "-v", "0")
    return project


def start(
    started: list[Gateway], project: Project, name: str, *args: str, ready: str, **settings: Any
) -> Gateway:
    handle = project.start(name, *args, ready=ready, **settings)
    started.append(handle)
    return handle


def announced_url(handle: Gateway) -> str:
    """The http://127.0.0.1:<port> that runserver_stream announced (it was started with --port 0)."""
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", handle.log_text())
    assert match, f"no 'listening on http://127.0.0.1:<port>' line in:\n{handle.log_text()}"
    assert not match.group(1).endswith(":0")
    return match.group(1)


def shell(project: Project, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python manage.py shell`` with ``code`` typed on its stdin (as in another terminal)."""
    result = subprocess.run(
        [sys.executable, "manage.py", "shell"], cwd=REPO, env=project.env(), input=code,
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert result.returncode == 0, f"manage.py shell failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    for bad in ("Traceback", "Error", "Warning", "could not record"):
        assert bad not in result.stderr, f"manage.py shell reported {bad!r}:\n{result.stderr}"
    return result


def last_json_line(output: str) -> Any:
    return json.loads(output.strip().splitlines()[-1])


@dataclasses.dataclass
class HTTPResponse:
    status: int
    headers: dict[str, str]
    body: str


def http_get(url: str, *, unix_socket: Path | None = None, timeout: float = 30) -> HTTPResponse:
    """GET like ``curl URL`` (a real curl when installed; else HTTP/1.0 over a raw socket)."""
    if CURL:
        command = [CURL, "-sS", "-i", "--noproxy", "*", "--max-time", str(timeout)]
        if unix_socket is not None:
            command += ["--unix-socket", str(unix_socket)]
        result = subprocess.run(
            [*command, url], capture_output=True, timeout=timeout + 10, check=False
        )
        assert result.returncode == 0, f"curl {url} failed ({result.returncode}): {result.stderr!r}"
        raw = result.stdout
    else:
        parts = urlsplit(url)
        if unix_socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(unix_socket))
        else:
            sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        with sock:
            sock.sendall(f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return HTTPResponse(int(status_line.split()[1]), headers, body.decode())


def parse_sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of an SSE body; comments, retry and id lines are left aside."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        event, data = "message", []
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        if data:
            events.append((event, json.loads("\n".join(data))))
    return events


def assert_example_task_events(events: list[tuple[str, dict[str, Any]]], task_id: int = 1) -> None:
    """The README's response format: each event's data plus _task_id, _model and _timestamp."""
    assert [e for e, _ in events] == [e for e, _ in EXPECTED_EXAMPLE_EVENTS], events
    for (event, data), (_, expected) in zip(events, EXPECTED_EXAMPLE_EVENTS, strict=True):
        assert data["_task_id"] == task_id, (event, data)
        assert data["_model"] == "ExampleTask", (event, data)
        datetime.fromisoformat(data["_timestamp"])  # a real timestamp
        own = {k: v for k, v in data.items() if not k.startswith("_")}
        assert own == expected, (event, data)


# -- 1. "Test it", on the embedded default (nothing configured) -----------------------------------


def test_readme_test_it_on_the_embedded_default(embedded_project: Project, started: list[Gateway]) -> None:
    # Start server (`python manage.py runserver_stream --port 8888`; port 0 here).
    server = start(started, embedded_project, "server", "runserver_stream", "--port", "0", ready="listening on")
    base = announced_url(server)
    assert (embedded_project.directory / "embedded.url").exists(), server.log_text()

    # In another terminal, create a task.
    shell(embedded_project, TEST_IT_SHELL_LINES)

    # Connect with curl.
    response = http_get(f"{base}/stream/ExampleTask/1")
    assert response.status == 200, response
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    events = parse_sse(response.body)
    assert_example_task_events(events)
    assert "event: start\ndata: {" in response.body  # the README's wire format, line for line

    health = http_get(f"{base}/health")
    assert (health.status, health.body.strip()) == (200, "OK"), health
    assert "task examples.ExampleTask:1 completed" in server.log_text(), server.log_text()


# -- 2. The same with a real Redis: a gateway, a worker, and the httpx-sse client ----------------


async def test_readme_flow_with_redis_gateway_worker_and_httpx_sse(
    redis_project: IsolatedProject, started: list[Gateway]
) -> None:
    gateway = start(started, redis_project, "gateway", "runserver_stream", "--host", "127.0.0.1", "--port", "0",
                    ready="listening on")
    start(started, redis_project, "worker", "runworker", ready="started")
    base = announced_url(gateway)
    shell(redis_project, TEST_IT_SHELL_LINES)

    # The README's httpx-sse snippet; only the URL differs.
    printed: list[str] = []
    received: list[tuple[str, dict[str, Any]]] = []

    async def readme_client() -> None:
        async with httpx.AsyncClient() as client, aconnect_sse(
            client, "GET", f"{base}/stream/ExampleTask/1"
        ) as event_source:
            async for event in event_source.aiter_sse():
                try:
                    data = json.loads(event.data)
                except json.JSONDecodeError:  # the snippet itself would raise here
                    snippet_failures.append(
                        f"json.loads({event.data!r}) raised on event={event.event!r} id={event.id!r} "
                        f"retry={event.retry!r}, after {printed}"
                    )
                    raise
                printed.append(f"{event.event}: {data}")
                received.append((event.event, data))

                if event.event == "complete":
                    break

    snippet_failures: list[str] = []
    try:
        await asyncio.wait_for(readme_client(), 30)
    except TimeoutError:
        pytest.fail(f"no complete event within 30 s; got {printed}\n{gateway.log_text()}")
    except json.JSONDecodeError:
        # Check the rest of the flow (gateway, worker, Redis) with curl before failing on this.
        events = parse_sse(http_get(f"{base}/stream/ExampleTask/1").body)
        assert_example_task_events(events)
        pytest.fail("the README's httpx-sse snippet crashed: " + snippet_failures[0])
    assert_example_task_events(received)
    assert printed[0].startswith("start: {'message': 'Test', 'total_steps': 3, ")

    # Once completed, a plain GET answers the final state (as the predecessor did).
    final = http_get(f"{base}/stream/ExampleTask/1")
    assert final.status == 200 and json.loads(final.body)["status"] == "completed", final
    health = http_get(f"{base}/health")
    assert (health.status, health.body.strip()) == (200, "OK"), health


async def test_httpx_sse_sees_only_events_with_data_even_across_heartbeats(
    redis_project: IsolatedProject, started: list[Gateway]
) -> None:
    """The README's snippet json.loads every event httpx-sse yields; httpx-sse yields a blank line
    after a data-less block as an event whenever a retry or an (earlier) id was seen. With
    heartbeats between ExampleTask's steps, every event it yields must still carry data."""
    gateway = start(started, redis_project, "gateway", "runserver_stream", "--host", "127.0.0.1", "--port", "0",
                    ready="listening on", heartbeat_seconds=0.5)
    start(started, redis_project, "worker", "runworker", ready="started")
    base = announced_url(gateway)
    shell(redis_project, TEST_IT_SHELL_LINES)

    seen: list[tuple[str, str, str, int | None]] = []

    async def collect() -> None:
        async with httpx.AsyncClient() as client, aconnect_sse(
            client, "GET", f"{base}/stream/ExampleTask/1"
        ) as event_source:
            async for event in event_source.aiter_sse():
                seen.append((event.event, event.data, event.id, event.retry))
                if event.event == "complete":
                    break

    await asyncio.wait_for(collect(), 30)
    with_data = [(e, json.loads(d)) for e, d, _, _ in seen if d]
    assert_example_task_events(with_data)
    empty = [(i, e, event_id, retry) for i, (e, d, event_id, retry) in enumerate(seen) if not d]
    assert not empty, (
        f"{len(empty)} of the {len(seen)} events httpx-sse yielded have no data (the README's "
        f"snippet crashes on each): (index, event, id, retry) = {empty}"
    )


# -- 3. Quick Start: the API the README documents on StreamTask and the coordinator ---------------

API_SHAPE_CODE = """\
import asyncio, inspect, json
from django.db import models
from django_app.models import StreamTask
from django_app.coordinator import coordinator
from django_app.examples.models import ExampleTask

report = {}
report["abstract"] = StreamTask._meta.abstract
report["fields"] = sorted(f.name for f in StreamTask._meta.local_fields)
report["coroutines"] = {
    name: inspect.iscoroutinefunction(getattr(StreamTask, name))
    for name in ("process", "send_event", "mark_completed")
}
report["send_event_params"] = list(inspect.signature(StreamTask.send_event).parameters)
report["coordinator_coroutines"] = {
    name: inspect.iscoroutinefunction(getattr(coordinator, name))
    for name in ("start_task", "get_task_instance", "is_task_running")
}

task = ExampleTask.objects.create(message="Hello, World!")
found = asyncio.run(coordinator.get_task_instance('ExampleTask', task.pk))
report["found"] = [type(found).__name__, found.pk, found.message, found.completed_at]
report["running"] = coordinator.is_task_running('ExampleTask', task.pk)

# The Quick Start's custom task, as written (it needs `from django.db import models`, which the
# README leaves out, and an app to belong to: no table, since it is never saved).
class MyCustomTask(StreamTask):
    # Add your custom fields
    title = models.CharField(max_length=255)

    class Meta:
        app_label = "examples"

    async def process(self):
        # Send start event
        await self.send_event('start', {
            'message': f'Starting task: {self.title}'
        })

        # Do your work and send events
        for i in range(10):
            await asyncio.sleep(1)
            await self.send_event('progress', {
                'step': i + 1,
                'total': 10,
                'message': f'Processing step {i + 1}'
            })

        # Send completion event
        await self.send_event('complete', {
            'message': 'Task completed successfully'
        })

real_sleep = asyncio.sleep
async def no_wait(delay, result=None):
    return await real_sleep(0, result)
asyncio.sleep = no_wait  # the README's ten seconds of "work", without the waiting
custom = MyCustomTask(pk=1, title="demo")
asyncio.run(custom.process())
asyncio.sleep = real_sleep
print(json.dumps(report, default=str))
"""


def test_readme_quick_start_api_shape(redis_project: IsolatedProject, redis_server: RedisServer) -> None:
    report = last_json_line(shell(redis_project, API_SHAPE_CODE).stdout)
    assert report["abstract"] is True
    assert {"created_at", "updated_at", "completed_at", "final_value"} <= set(report["fields"]), report
    assert report["coroutines"] == {"process": True, "send_event": True, "mark_completed": True}
    assert report["send_event_params"][:3] == ["self", "event_type", "data"], report
    assert report["coordinator_coroutines"] == {
        "start_task": True, "get_task_instance": True, "is_task_running": False,
    }
    assert report["found"] == ["ExampleTask", 1, "Hello, World!", None], report
    assert report["running"] is False

    # The custom task's process() sent its twelve events through send_event, outside any worker.
    client = redis.Redis(unix_socket_path=str(redis_server.socket))
    try:
        entries = client.xrange(f"{redis_project.key_prefix}:{{examples.MyCustomTask:1}}:events")
    finally:
        client.close()
    types = [fields[b"type"].decode() for _, fields in entries]
    assert types == ["start"] + ["progress"] * 10 + ["complete"], types
    first = json.loads(entries[0][1][b"data"])
    assert first["message"] == "Starting task: demo", first


# -- 4. --socket PATH, and the socket options on --help --------------------------------------------


def test_runserver_stream_socket_options(tmp_path: Path) -> None:
    project = Project(tmp_path)
    help_text = " ".join(project.manage("runserver_stream", "--help").split())
    for option in ("--socket", "--host", "--port", "/tmp/django-stream.sock"):
        assert option in help_text, help_text


@pytest.mark.parametrize("mode", ["embedded", "redis"])
def test_runserver_stream_on_a_unix_socket_answers_health(
    mode: str, tmp_path: Path, redis_server: RedisServer, started: list[Gateway]
) -> None:
    if mode == "embedded":
        project = Project(tmp_path)
    else:
        project = IsolatedProject(tmp_path, redis_server.url, key_prefix=f"pf{next(_prefixes)}")
    project.manage("migrate", "--noinput", "-v", "0")
    path = tmp_path / "my-stream.sock"
    server = start(started, project, "server", "runserver_stream", "--socket", str(path), ready="listening on")
    assert f"listening on unix:{path}" in server.log_text(), server.log_text()
    health = http_get("http://localhost/health", unix_socket=path)
    assert (health.status, health.body.strip()) == (200, "OK"), health


# -- 5. The forms of start_task ------------------------------------------------------------------

START_FORMS_CODE = """\
import asyncio, json
from django_app.examples.models import ExampleTask
from django_app.coordinator import coordinator

report = {"accepted": [], "refused": []}
for names in [("ExampleTask",), ("examples", "ExampleTask"), ()]:
    task = ExampleTask.objects.create(message="Test")
    outcome = asyncio.run(coordinator.start_task(task, *names))
    task.refresh_from_db()
    report["accepted"].append([list(names), bool(outcome), task.status])
for names in [("ProgressTask",), ("NoSuchTask",), ("other", "ExampleTask"), ("examples", "ProgressTask")]:
    task = ExampleTask.objects.create(message="Test")
    try:
        asyncio.run(coordinator.start_task(task, *names))
    except ValueError as exc:
        task.refresh_from_db()
        report["refused"].append([list(names), str(exc), task.status])
    else:
        report["refused"].append([list(names), None, None])
print(json.dumps(report))
"""


def test_start_task_forms(redis_project: IsolatedProject) -> None:
    report = last_json_line(shell(redis_project, START_FORMS_CODE).stdout)
    assert report["accepted"] == [
        [["ExampleTask"], True, "queued"],
        [["examples", "ExampleTask"], True, "queued"],
        [[], True, "queued"],
    ], report
    for names, error, status in report["refused"]:
        assert error is not None, f"start_task(task, {names}) did not raise ValueError"
        assert status == "pending", (names, status)  # a refused start leaves the task alone
