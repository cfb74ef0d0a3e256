"""A worker's Prometheus metrics (``runworker --metrics-port``) count exactly what it did.

The system tests run real ``manage.py runworker --metrics-port 0`` processes of the example
project on the real redis-server, read the URL the worker logs, and parse ``GET /metrics`` with
prometheus_client's own parser: tasks that complete, fail and are cancelled; a malformed queue
entry (a dead letter); jobs that wait behind a busy worker (the queue lag); and runs taken over
from a SIGKILLed worker, one re-run and one given up (a dead letter). The dead letters' gauge is
``XLEN sc:dead`` each time.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from django_app.worker.metrics import MetricsServer, WorkerMetrics, entry_ms
from streamcoord.keys import TaskRef

from .processes import REPO, Gateway, Project, RedisServer, stop_process, wait_for
from .workloads import KEYS, create_tasks, state, stream, until

#: The contract: every family a worker exposes, by the name its samples carry.
FAMILIES = {
    "streamcoord_worker_tasks_started": "counter",
    "streamcoord_worker_tasks_ended": "counter",
    "streamcoord_worker_task_duration_seconds": "histogram",
    "streamcoord_worker_queue_lag_seconds": "gauge",
    "streamcoord_worker_queue_wait_seconds": "histogram",
    "streamcoord_worker_send_event_seconds": "histogram",
    "streamcoord_worker_lease_takeovers": "counter",
    "streamcoord_worker_dead_letters": "counter",
    "streamcoord_worker_dead_letter_entries": "gauge",
    "streamcoord_worker_running_tasks": "gauge",
    "streamcoord_worker_concurrency": "gauge",
    "streamcoord_worker_redis_errors": "counter",
}
PROGRESS, RETRYING = "examples.ProgressTask", "examples.RetryingProgressTask"

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One ``/metrics`` page, parsed: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; KeyError when the page has no such series (absent is not 0)."""
        return self.samples[(name, tuple(sorted(labels.items())))]

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def nonzero(self, name: str) -> dict[Labels, float]:
        return {labels: value for labels, value in self.series(name).items() if value}

    def total(self, name: str) -> float:
        return sum(self.series(name).values())


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return Scrape(response.text)


def metrics_url(log: str) -> str:
    found = re.search(r"metrics on (http://\S+)", log)
    assert found is not None, log
    return found.group(1)


def start_worker(project: Project, name: str, concurrency: int, **settings: object) -> tuple[Gateway, str]:
    """``runworker --metrics-port 0``; the handle and its metrics URL (from its log)."""
    worker = project.start(
        name, "runworker", "--concurrency", str(concurrency), "--metrics-port", "0", ready="started", **settings
    )
    return worker, metrics_url(worker.log_text())


async def events_written(redis: Redis, refs: list[TaskRef]) -> int:
    return sum([await redis.xlen(KEYS.events(ref)) for ref in refs])


# -- without Redis ----------------------------------------------------------------------------


def test_entry_ids_carry_their_milliseconds() -> None:
    assert entry_ms("1700000000123-4") == 1700000000123
    assert entry_ms("0-0") == 0


async def test_the_server_serves_every_family_of_the_contract_on_a_kernel_picked_port() -> None:
    metrics = WorkerMetrics()
    metrics.declare_models([PROGRESS])
    metrics.concurrency.set(7)
    metrics.watch_running(lambda: 3)
    server = MetricsServer.start(metrics.registry, "127.0.0.1", 0)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", server.url), server.url
        page = await scrape(server.url)
    finally:
        server.stop()
    assert {name: page.types[name] for name in FAMILIES} == FAMILIES
    assert page.value("streamcoord_worker_concurrency") == 7
    assert page.value("streamcoord_worker_running_tasks") == 3
    # Declared models show zeros before their first run: rate() sees the first increment.
    assert page.value("streamcoord_worker_tasks_started_total", model=PROGRESS) == 0
    for outcome in ("completed", "failed", "cancelled"):
        assert page.value("streamcoord_worker_tasks_ended_total", model=PROGRESS, outcome=outcome) == 0
    assert page.value("streamcoord_worker_task_duration_seconds_count", model=PROGRESS) == 0
    # Unknown until measured: a 0 first would read as dead letters growing at the first look.
    assert math.isnan(page.value("streamcoord_worker_dead_letter_entries"))
    assert server.httpd.socket.fileno() == -1  # stopped: the socket is closed


def test_two_workers_in_one_process_count_apart() -> None:
    """A registry of their own: never prometheus_client's global one, never each other's."""
    first, second = WorkerMetrics(), WorkerMetrics()
    first.dead_letters.inc()
    assert first.registry.get_sample_value("streamcoord_worker_dead_letters_total") == 1
    assert second.registry.get_sample_value("streamcoord_worker_dead_letters_total") == 0


# -- real workers -----------------------------------------------------------------------------


@pytest.mark.system
@pytest.mark.timeout(150)
async def test_counters_and_histograms_match_what_the_worker_did(project: Project, redis: Redis) -> None:
    # One slot, so jobs wait behind the long task (the queue lag), and a heartbeat a second,
    # so the lag is looked at every second.
    worker, url = start_worker(project, "w", 1, worker_heartbeat_seconds=1)
    page = await scrape(url)
    assert page.value("streamcoord_worker_concurrency") == 1
    assert page.value("streamcoord_worker_running_tasks") == 0
    assert page.value("streamcoord_worker_queue_lag_seconds") == 0
    # Measured before the start line, as the lag is.
    assert page.value("streamcoord_worker_dead_letter_entries") == 0 == await redis.xlen(KEYS.dead_letters())
    assert page.nonzero("streamcoord_worker_tasks_started_total") == {}

    [long] = create_tasks(project, "ProgressTask", 1, steps=600, delay=0.1)
    await until(lambda: _running(redis, long), 30, "the long task to run")
    completing = create_tasks(project, "ProgressTask", 3, steps=2, delay=0)
    failing = create_tasks(project, "ProgressTask", 2, steps=3, delay=0, fail_at=2)
    await redis.xadd(KEYS.jobs(), {"bogus": "no task field"})  # dropped into the dead letters
    # The slot is taken: those jobs are not delivered, and they age.
    await until(lambda: _lag_over_zero(url), 30, "the queue lag to show the waiting jobs")
    assert (await scrape(url)).value("streamcoord_worker_running_tasks") == 1

    project.manage("cancel_task", "ProgressTask", long.pk)
    await until(lambda: _ended_total(url, 6), 60, "six runs to end")
    await until(lambda: _settled(url), 30, "no run left and no job waiting")
    # The malformed entry went to sc:dead when it was claimed; the next look counts it.
    await until(lambda: _dead_letter_entries(url, redis, 1), 10, "the gauge to count the dead letter")

    page = await scrape(url)
    assert page.nonzero("streamcoord_worker_tasks_started_total") == {(("model", PROGRESS),): 6}
    assert page.nonzero("streamcoord_worker_tasks_ended_total") == {
        (("model", PROGRESS), ("outcome", "completed")): 3,
        (("model", PROGRESS), ("outcome", "failed")): 2,
        (("model", PROGRESS), ("outcome", "cancelled")): 1,
    }
    assert page.nonzero("streamcoord_worker_task_duration_seconds_count") == {(("model", PROGRESS),): 6}
    assert page.value("streamcoord_worker_queue_wait_seconds_count") == 6  # the malformed entry is no job
    # Every event in the six streams was appended by a run on this worker, and timed once.
    refs = [long, *completing, *failing]
    assert page.value("streamcoord_worker_send_event_seconds_count") == await events_written(redis, refs)
    assert page.value("streamcoord_worker_dead_letters_total") == 1 == await redis.xlen(KEYS.dead_letters())
    assert page.value("streamcoord_worker_lease_takeovers_total") == 0
    assert page.value("streamcoord_worker_redis_errors_total") == 0
    # Labels name models and outcomes, never a task.
    labels = {label for _name, labels in page.samples for label in labels if label[0] != "le"}
    assert {key for key, _value in labels} == {"model", "outcome"}, labels
    models = {value for key, value in labels if key == "model"}
    assert PROGRESS in models and all(re.fullmatch(r"[a-z_]+\.[A-Z]\w*", model) for model in models), models
    assert [(await state(redis, ref))["state"] for ref in refs] == ["cancelled", *["completed"] * 3, *["failed"] * 2]
    assert stop_process(worker.process) == 0, worker.log_text()
    assert "queue lag" not in worker.log_text(), worker.log_text()  # measured every time


@pytest.mark.system
@pytest.mark.timeout(150)
async def test_a_worker_counts_the_runs_it_took_over_from_a_killed_one(project: Project, redis: Redis) -> None:
    """Worker a is SIGKILLed mid-run with two tasks; worker b takes both over: it re-runs the
    one that has attempts left and gives up the other (a dead letter)."""
    lease = {"lease_seconds": 2}
    first, _ = start_worker(project, "a", 4, **lease)
    [retrying] = create_tasks(project, "RetryingProgressTask", 1, steps=10, delay=0.5)
    [lost] = create_tasks(project, "ProgressTask", 1, steps=10, delay=0.5)
    for ref in (retrying, lost):
        await until(lambda ref=ref: redis.xlen(KEYS.events(ref)), 30, f"{ref} to send its first event")
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(10)

    second, url = start_worker(project, "b", 4, worker_heartbeat_seconds=1, **lease)
    await until(lambda: _ended_total(url, 2), 60, "b to end both tasks")
    await until(lambda: _settled(url), 30, "no run left on b")
    await until(lambda: _dead_letter_entries(url, redis, 1), 10, "the gauge to count the given-up task")

    page = await scrape(url)
    assert page.value("streamcoord_worker_lease_takeovers_total") == 2
    assert page.value("streamcoord_worker_dead_letters_total") == 1
    assert page.nonzero("streamcoord_worker_tasks_started_total") == {(("model", RETRYING),): 1}
    assert page.nonzero("streamcoord_worker_tasks_ended_total") == {
        (("model", RETRYING), ("outcome", "completed")): 1,
        (("model", PROGRESS), ("outcome", "failed")): 1,  # WorkerLost: ended, never run here
    }
    assert page.nonzero("streamcoord_worker_task_duration_seconds_count") == {(("model", RETRYING),): 1}
    assert page.value("streamcoord_worker_queue_wait_seconds_count") == 0  # b claimed no new job
    # b's run wrote the re-run's events, from its `attempt` on; recovery's give-up is no run.
    events = [event.type.decode() for event in await stream(redis, retrying)]
    assert events.count("attempt") == 1, events
    assert page.value("streamcoord_worker_send_event_seconds_count") == len(events) - events.index("attempt")
    assert page.value("streamcoord_worker_redis_errors_total") == 0
    assert ((await state(redis, retrying))["state"], (await state(redis, lost))["state"]) == ("completed", "failed")
    assert stop_process(second.process) == 0, second.log_text()
    assert "queue lag" not in second.log_text(), second.log_text()


@pytest.mark.system
@pytest.mark.timeout(90)
async def test_a_redis_user_without_xinfo_or_xlen_leaves_those_metrics_unknown_and_said_once(
    project: Project, redis: Redis, redis_server: RedisServer
) -> None:
    """deploy/users.acl's worker may lack XINFO: the lag is NaN (unknown, not 0), the warning
    comes once though every round tries again, and everything else is counted as usual (the
    dead letters' count too, a command of its own). Refused XLEN as well (the ACL changed
    live), that count is NaN, said once too. A worker whose metrics nobody serves never asks
    (its user, started first, is never refused)."""
    password = secrets.token_hex(16)
    urls = {}
    for user in ("plain-no-xinfo", "metrics-no-xinfo"):
        await redis.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all", "-xinfo")
        urls[user] = f"unix://{user}:{password}@{redis_server.socket}"
    try:
        plain = project.start(
            "plain", "runworker", "--concurrency", "1", ready="started", worker_heartbeat_seconds=1,
            redis_url=urls["plain-no-xinfo"],
        )
        worker, url = start_worker(project, "w", 2, worker_heartbeat_seconds=1, redis_url=urls["metrics-no-xinfo"])
        await until(lambda: _refusals(redis, "metrics-no-xinfo", 3), 30, "three rounds refused XINFO")
        # A worker that measured would have been refused before its start line, and since.
        assert await _refusals(redis, "plain-no-xinfo", 0, exactly=True)
        assert stop_process(plain.process) == 0, plain.log_text()
        assert "queue lag" not in plain.log_text(), plain.log_text()
        create_tasks(project, "ProgressTask", 1, steps=1, delay=0)
        await until(lambda: _ended_total(url, 1), 30, "the task to end")
        page = await scrape(url)
        assert math.isnan(page.value("streamcoord_worker_queue_lag_seconds"))
        assert page.value("streamcoord_worker_dead_letter_entries") == 0 == await redis.xlen(KEYS.dead_letters())
        assert page.value("streamcoord_worker_redis_errors_total") == 0  # a permission is no outage
        assert page.value("streamcoord_worker_tasks_ended_total", model=PROGRESS, outcome="completed") == 1
        await redis.execute_command("ACL", "SETUSER", "metrics-no-xinfo", "-xlen")
        await until(lambda: _refusals(redis, "metrics-no-xinfo", 3, command="xlen"), 30, "three rounds refused XLEN")
        page = await scrape(url)
        assert math.isnan(page.value("streamcoord_worker_dead_letter_entries"))
        assert page.value("streamcoord_worker_redis_errors_total") == 0
        assert stop_process(worker.process) == 0, worker.log_text()
        assert worker.log_text().count("the queue lag metric is unavailable") == 1, worker.log_text()
        assert worker.log_text().count("the dead letters gauge is unavailable") == 1, worker.log_text()
    finally:
        for user in urls:
            await redis.execute_command("ACL", "DELUSER", user)
        await redis.execute_command("ACL", "LOG", "RESET")


@pytest.mark.system
@pytest.mark.timeout(90)
def test_runworker_refuses_metrics_options_it_cannot_serve(project: Project) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = _manage_fails(project, "runworker", "--metrics-port", str(port))
    assert f"cannot serve metrics on 127.0.0.1:{port}" in failed, failed
    assert "--metrics-host needs --metrics-port" in _manage_fails(project, "runworker", "--metrics-host", "0.0.0.0")
    assert "not a port" in _manage_fails(project, "runworker", "--metrics-port", "70000")


@pytest.mark.system
@pytest.mark.timeout(120)
def test_runworker_reload_serves_the_metrics_from_its_child(project: Project, tmp_path: Path) -> None:
    """``--reload`` hands ``--metrics-port`` to the worker it runs: the child serves them."""
    env = _watching_an_empty_directory(project, tmp_path)
    log = tmp_path / "reload.log"
    with open(log, "wb") as out:
        parent = subprocess.Popen(
            [sys.executable, "manage.py", "runworker", "--reload", "--concurrency", "3", "--metrics-port", "0"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: re.search(r"worker \S+ started", log.read_text()) is not None, 60, "the child worker to start")
        text = log.read_text()
        assert text.count("metrics on") == 1, text  # the child's, not the parent's too
        page = httpx.get(metrics_url(text), timeout=10)
        assert page.status_code == 200
        assert "streamcoord_worker_concurrency 3.0" in page.text, page.text
    finally:
        assert stop_process(parent, signal.SIGTERM, timeout=20) == 0, log.read_text()


# -- helpers ----------------------------------------------------------------------------------


async def _running(redis: Redis, ref: TaskRef) -> bool:
    return (await state(redis, ref)).get("state") == "running"


async def _refusals(redis: Redis, user: str, count: int, *, exactly: bool = False, command: str = "xinfo|groups") -> bool:
    """Redis refused ``user`` ``command`` at least (or ``exactly``) ``count`` times (ACL LOG)."""
    raw: Any = await redis.execute_command("ACL", "LOG")
    entries = [{_text(key): _text(value) for key, value in entry.items()} for entry in raw]
    refused = sum(int(e["count"]) for e in entries if e.get("username") == user and e.get("object") == command)
    return refused == count if exactly else refused >= count


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _lag_over_zero(url: str) -> bool:
    return (await scrape(url)).value("streamcoord_worker_queue_lag_seconds") > 0


async def _ended_total(url: str, count: int) -> bool:
    ended = (await scrape(url)).total("streamcoord_worker_tasks_ended_total")
    assert ended <= count, f"{ended} runs ended, more than the {count} expected"
    return ended == count


async def _dead_letter_entries(url: str, redis: Redis, count: int) -> bool:
    """The dead letters' gauge shows ``count``, and so does ``XLEN sc:dead``."""
    gauge = (await scrape(url)).value("streamcoord_worker_dead_letter_entries")
    length = await redis.xlen(KEYS.dead_letters())
    assert length <= count and gauge <= count, f"gauge {gauge}, XLEN {length}: more than the {count} expected"
    return gauge == length == count


async def _settled(url: str) -> bool:
    page = await scrape(url)
    return page.value("streamcoord_worker_running_tasks") == 0 and page.value("streamcoord_worker_queue_lag_seconds") == 0


def _manage_fails(project: Project, *args: str) -> str:
    """Run ``manage.py <args>``, which must fail; its output."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=project.env(), capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode != 0, result
    return result.stdout + result.stderr


def _watching_an_empty_directory(project: Project, tmp_path: Path) -> dict[str, str]:
    """The project's environment with settings whose BASE_DIR is an empty directory: --reload
    watches that, not the repository others are editing."""
    watched = tmp_path / "watched"
    watched.mkdir()
    (tmp_path / "metrics_reload_settings.py").write_text(
        f"from django_app.project.settings import *  # noqa: F403\nBASE_DIR = __import__('pathlib').Path({str(watched)!r})\n"
    )
    env = project.env()
    env["DJANGO_SETTINGS_MODULE"] = "metrics_reload_settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH", "")]))
    return env
