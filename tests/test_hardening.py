"""Issue 11's hardening: what the gateway, its socket, the demo and the embedded default refuse.

Each test here failed on the code before the fix it guards, except the ones that say they
guard what already worked (a worker's bad return value, the demo's own requests).
"""

from __future__ import annotations

import asyncio
import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.errors import ConfigurationError, PayloadNotSerializable, PayloadTooLarge
from streamcoord.jobs import JobQueue
from streamcoord.server import bind
from streamcoord.settings import Settings

from .processes import REPO, Project
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
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "STREAMCOORD_REDIS_URL": "redis://127.0.0.1:1/0"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "not a unix socket" in result.stderr and "Traceback" not in result.stderr
    assert precious.read_text() == "keep me\n"


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
