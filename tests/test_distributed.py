"""The distributed deployment end to end, with real processes only: the session's redis-server,
``runserver_stream`` gateways (stateless: STREAMCOORD_REDIS_URL is set), ``runworker``
processes, and ``manage.py`` commands run as separate processes that ran nothing themselves.

Every wait has a timeout; nothing asserts on wall-clock speed (measured times only appear in
assertion messages).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from streamcoord.taskstate import ENDED

from .processes import Gateway, Project
from .rawsse import RawSSE, SSEEvent
from .workloads import (
    assert_gap_free,
    create_tasks_streamed,
    logs,
    set_continue,
    shell,
    triples,
    worker_id,
)

pytestmark = pytest.mark.system

# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
async def r(redis: Redis) -> AsyncIterator[Redis]:
    """The session's Redis, emptied before the test (the ``redis`` fixture) and after it: the
    ``project`` fixture does not flush, and every test's fresh database numbers its tasks from
    1 again, so leftovers would collide with the next test's keys."""
    yield redis
    await redis.flushall()


def label(model: str, pk: Any) -> str:
    return f"examples.{model}:{pk}"


def state_key(model: str, pk: Any) -> str:
    return f"sc:{{{label(model, pk)}}}:state"


def events_key(model: str, pk: Any) -> str:
    return f"sc:{{{label(model, pk)}}}:events"


async def task_state(redis: Redis, model: str, pk: Any) -> dict[str, str]:
    raw = await redis.hgetall(state_key(model, pk))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def jobs_added(redis: Redis) -> int:
    """How many jobs were ever added to the queue (``sc:jobs``) since the test emptied Redis:
    workers delete finished jobs, but the stream counts every addition."""
    if not await redis.exists("sc:jobs"):
        return 0
    return int((await redis.xinfo_stream("sc:jobs"))["entries-added"])


async def wait_state(redis: Redis, model: str, pk: Any, states: set[str], within: float = 20) -> dict[str, str]:
    deadline = time.monotonic() + within
    while True:
        current = await task_state(redis, model, pk)
        if current.get("state") in states:
            return current
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label(model, pk)} never reached {states} within {within}s: {current}")
        await asyncio.sleep(0.05)


async def until_end(client: RawSSE, within: float = 30, what: str = "") -> list[SSEEvent]:
    try:
        return await asyncio.wait_for(client.events_until_end(), within)
    except TimeoutError:
        raise AssertionError(f"stream {what} did not end within {within}s") from None


def rows(project: Project, model: str) -> dict[int, dict[str, Any]]:
    """The task rows as a new process sees them in the database."""
    out = shell(project, (
        "import json\n"
        f"from django_app.examples.models import {model}\n"
        f"print(json.dumps(list({model}.objects.values('id', 'status', 'error', 'final_value'))))"
    ))
    return {row["id"]: row for row in json.loads(out)}


def http(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(gateway.socket)), base_url="http://gateway", timeout=10
    )


# -- 1-3: many tasks, two gateways, two workers ----------------------------------------------


async def test_twenty_tasks_two_gateways_two_workers_every_client_gets_everything_once(
    r: Redis, project: Project, sse: Any
) -> None:
    gw1, gw2 = project.gateway("gw1"), project.gateway("gw2")
    w1, w2 = project.worker("w1"), project.worker("w2")
    steps = 5
    watched: list[tuple[dict[str, Any], RawSSE, RawSSE]] = []
    async for created in create_tasks_streamed(project, 20, "ProgressTask", f"steps={steps}", "delay=0.1"):
        assert created["started"] is True, created
        watched.append((created, await sse(gw1.socket, created["stream"]), await sse(gw2.socket, created["stream"])))
    assert len({created["id"] for created, _, _ in watched}) == 20
    clients = [c for _, a, b in watched for c in (a, b)]
    assert all(c.status == 200 for c in clients), [c.status for c in clients]
    results = await asyncio.wait_for(
        asyncio.gather(*(c.events_until_end() for c in clients)), 40
    )
    assert all(c.ended for c in clients), "a response did not end after its terminal event"

    expected_types = ["start"] + ["progress"] * steps + ["complete"]
    for index, (created, _, _) in enumerate(watched):
        on_gw1, on_gw2 = results[2 * index], results[2 * index + 1]
        what = f"task {created['id']}"
        assert_gap_free(on_gw1, f"{what} on gw1")
        assert [e.event for e in on_gw1] == expected_types, what
        assert triples(on_gw1) == triples(on_gw2), f"{what}: gw1 and gw2 clients differ"
        assert {e.json()["_task_id"] for e in on_gw1} == {created["id"]}, what
        assert [e.json()["step"] for e in on_gw1[1:-1]] == list(range(1, steps + 1)), what
        assert on_gw1[-1].json()["final_value"] == {"steps": steps}, what

    # Each task ran exactly once, queued once, and both workers ran some of them.
    ids = [created["id"] for created, _, _ in watched]
    states = {pk: await task_state(r, "ProgressTask", pk) for pk in ids}
    for pk, state in states.items():
        assert state.get("state") == "completed" and state.get("attempt") == "1", (pk, state)
    assert await jobs_added(r) == len(ids)  # each task queued once
    ran_on = {state["worker"] for state in states.values()}
    assert ran_on == {worker_id(w1), worker_id(w2)}, (ran_on, logs(w1, w2))
    registered = {k.decode() for k in await r.hkeys("sc:workers")}
    assert ran_on <= registered, (ran_on, registered)
    both_logs = w1.log_text() + w2.log_text()
    for pk in ids:
        started = re.findall(rf"task {re.escape(label('ProgressTask', pk))} started \(attempt (\d+)\)", both_logs)
        assert started == ["1"], (pk, started)
    assert "Traceback" not in both_logs

    # 2. A late joiner after completion: the whole history, then the response ends.
    for gateway in (gw1, gw2):
        late = await sse(gateway.socket, watched[0][0]["stream"])
        assert triples(await until_end(late, 10, "late joiner")) == triples(results[0])
        assert late.ended

    # 3. Without text/event-stream in Accept, an ended task answers JSON.
    async with http(gw1) as client1, http(gw2) as client2:
        for created, _, _ in watched:
            for client in (client1, client2):
                response = await client.get(created["stream"])
                assert response.status_code == 200, response.text
                assert response.headers["content-type"].startswith("application/json")
                body = response.json()
                assert set(body) == {"status", "final_value", "completed_at"}, body
                assert body["status"] == "completed" and body["final_value"] == {"steps": steps}, body
                assert datetime.fromisoformat(body["completed_at"]), body

    # The database agrees.
    table = rows(project, "ProgressTask")
    for pk in ids:
        assert table[pk]["status"] == "completed" and table[pk]["final_value"] == {"steps": steps}, table[pk]


# -- 4 and 8: is_task_running and start_task from processes that run nothing -----------------


def is_running(project: Project, model: str, pk: int) -> str:
    return shell(project, (
        "from django_app.coordinator import coordinator\n"
        f"print(coordinator.is_task_running({model!r}, {pk}))"
    ))


def start_twice(project: Project, model: str, pk: int) -> list[Any]:
    out = shell(project, (
        "import json\n"
        "from django_app.coordinator import coordinator\n"
        f"from django_app.examples.models import {model}\n"
        f"task = {model}.objects.get(pk={pk})\n"
        "first = coordinator.start_task_sync(task)\n"
        "second = coordinator.start_task_sync(task)\n"
        "print(json.dumps([bool(first), first.state, bool(second), second.state, second.describe()]))"
    ))
    return json.loads(out)  # type: ignore[no-any-return]


async def test_is_task_running_is_true_while_a_worker_runs_it_then_false(r: Redis, project: Project) -> None:
    # A task that runs until told to stop (ContinueTask) rather than one that runs N seconds:
    # the questions below take a process start each, and must be asked while it still runs.
    worker = project.worker("w1")
    created = project.create_task("ContinueTask", start=True)
    pk = created["id"]
    await wait_state(r, "ContinueTask", pk, {"running"}, 20)
    assert is_running(project, "ContinueTask", pk) == "True", await task_state(r, "ContinueTask", pk)
    # 8. Starting it again while it runs: refused, and says why.
    again = start_twice(project, "ContinueTask", pk)
    assert again[0] is False and again[1] == "running", again
    assert again[2] is False and "running" in again[4], again
    assert await jobs_added(r) == 1
    set_continue(project, pk)
    await wait_state(r, "ContinueTask", pk, set(ENDED), 20)
    assert (await task_state(r, "ContinueTask", pk))["state"] == "completed", logs(worker)
    assert is_running(project, "ContinueTask", pk) == "False"
    # A pending task is not running either.
    pending = project.create_task("ProgressTask")["id"]
    assert is_running(project, "ProgressTask", pending) == "False"


async def test_start_task_twice_queues_once(r: Redis, project: Project) -> None:
    created = project.create_task("ProgressTask", "steps=3", "delay=0.1")  # no worker: stays queued
    pk = created["id"]
    assert (await task_state(r, "ProgressTask", pk)).get("state") == "pending"
    first_queued, first_state, second_queued, second_state, said = start_twice(project, "ProgressTask", pk)
    assert (first_queued, first_state) == (True, "pending")
    assert (second_queued, second_state) == (False, "queued"), said
    assert said == "not started: the task is already queued"
    assert await jobs_added(r) == 1
    assert (await task_state(r, "ProgressTask", pk))["state"] == "queued"
    assert rows(project, "ProgressTask")[pk]["status"] == "queued"


# -- 5: ContinueTask waits for another process ---------------------------------------------


async def test_continue_task_finishes_only_when_another_process_flips_its_field(
    r: Redis, project: Project, sse: Any
) -> None:
    gateway = project.gateway("gw1")
    project.worker("w1")
    created = project.create_task("ContinueTask", start=True)
    pk = created["id"]
    client = await sse(gateway.socket, created["stream"])
    first = await asyncio.wait_for(client.next_event(), 20)
    assert first is not None and first.event == "started" and first.json()["continue"] is False, first

    waiting = asyncio.create_task(client.next_event())
    done, _ = await asyncio.wait({waiting}, timeout=1.0)
    assert not done, f"an event arrived before the flag was set: {waiting.result()}"
    assert (await task_state(r, "ContinueTask", pk))["state"] == "running"

    set_continue(project, pk)
    second = await asyncio.wait_for(waiting, 20)
    rest = await until_end(client, 20, "ContinueTask")
    events = [first, second, *rest]
    assert [e.event for e in events] == ["started", "final", "complete"], triples(events)
    assert events[1].json()["continue"] is True
    assert_gap_free(events, "ContinueTask")
    assert (await task_state(r, "ContinueTask", pk))["state"] == "completed"
    assert rows(project, "ContinueTask")[pk]["status"] == "completed"


# -- 6: a failing task -------------------------------------------------------------------------


async def test_a_failing_task_ends_with_one_error_event_and_is_recorded_failed(
    r: Redis, project: Project, sse: Any
) -> None:
    gateway = project.gateway("gw1")
    worker = project.worker("w1")
    created = project.create_task("ProgressTask", "steps=5", "delay=0.05", "fail_at=3", start=True)
    pk = created["id"]
    client = await sse(gateway.socket, created["stream"])
    events = await until_end(client, 20, "failing task")
    assert [e.event for e in events] == ["start", "progress", "progress", "error"], triples(events)
    assert_gap_free(events, "failing task")
    error = events[-1].json()
    assert error["error_type"] == "TaskFailure", error
    assert "fail_at=3" in error["message"], error
    for event in events:
        assert "Traceback" not in event.data and 'File "' not in event.data, event.data
    assert client.ended

    row = rows(project, "ProgressTask")[pk]
    assert row["status"] == "failed" and "TaskFailure" in row["error"], row
    state = await task_state(r, "ProgressTask", pk)
    assert state["state"] == "failed" and state["attempt"] == "1", state
    assert "Traceback" in worker.log_text()  # the traceback stays in the worker's log


# -- 7: lazy start on connect --------------------------------------------------------------------


async def test_lazy_start_five_clients_on_two_gateways_start_a_pending_task_once(
    r: Redis, project: Project, sse: Any
) -> None:
    gw1, gw2 = project.gateway("gw1"), project.gateway("gw2")
    worker = project.worker("w1")
    created = project.create_task("ProgressTask", "steps=3", "delay=0.1")  # not started
    pk = created["id"]
    assert (await task_state(r, "ProgressTask", pk)).get("state") == "pending"
    assert await jobs_added(r) == 0

    sockets = [gw1.socket, gw2.socket, gw1.socket, gw2.socket, gw1.socket]
    clients = await asyncio.gather(*(sse(s, created["stream"]) for s in sockets))
    assert [c.status for c in clients] == [200] * 5
    try:
        results = await asyncio.wait_for(asyncio.gather(*(c.events_until_end() for c in clients)), 15)
    except TimeoutError:
        state = await task_state(r, "ProgressTask", pk)
        jobs = await jobs_added(r)
        raise AssertionError(
            f"connecting to a pending task did not run it within 15 s: state {state}, "
            f"{jobs} job entries\n{logs(gw1, gw2, worker)}"
        ) from None
    for result in results:
        assert [e.event for e in result] == ["start", "progress", "progress", "progress", "complete"]
        assert_gap_free(result, "lazily started task")
        assert triples(result) == triples(results[0])
    state = await task_state(r, "ProgressTask", pk)
    assert state["state"] == "completed" and state["attempt"] == "1", state
    assert await jobs_added(r) == 1


async def test_with_lazy_start_off_connecting_does_not_start_a_pending_task(
    r: Redis, project: Project, sse: Any
) -> None:
    gateway = project.gateway("gw3", lazy_start=0)
    project.worker("w1")
    created = project.create_task("ProgressTask", "steps=3", "delay=0.1")
    pk = created["id"]
    client = await sse(gateway.socket, created["stream"])
    assert client.status == 200
    waiting = asyncio.create_task(client.next_event())
    done, _ = await asyncio.wait({waiting}, timeout=1.0)
    assert not done, f"an event arrived for a task nobody started: {waiting.result()}"
    assert (await task_state(r, "ProgressTask", pk))["state"] == "pending"
    assert await jobs_added(r) == 0
    waiting.cancel()


# -- 9: cancel_task ------------------------------------------------------------------------------


async def test_cancel_task_queued_running_and_completed(r: Redis, project: Project, sse: Any) -> None:
    gateway = project.gateway("gw1")

    # A queued task (no worker yet): one `cancelled` event, and it never runs.
    queued = project.create_task("ProgressTask", "steps=3", "delay=0.1", start=True)
    assert queued["started"] is True
    qpk = queued["id"]
    client = await sse(gateway.socket, queued["stream"])
    said = project.manage("cancel_task", "ProgressTask", str(qpk)).strip()
    assert said == "cancelled before it started", said
    events = await until_end(client, 10, "cancelled queued task")
    assert [e.event for e in events] == ["cancelled"], triples(events)
    assert_gap_free(events, "cancelled queued task")

    worker = project.worker("w1")  # it takes the queued job and must skip it
    deadline = time.monotonic() + 15
    while f"task {label('ProgressTask', qpk)} is no longer queued; skipped" not in worker.log_text():
        assert time.monotonic() < deadline, f"the worker never skipped the cancelled job\n{logs(worker)}"
        await asyncio.sleep(0.05)
    state = await task_state(r, "ProgressTask", qpk)
    assert state["state"] == "cancelled" and "attempt" not in state, state
    assert await r.xlen(events_key("ProgressTask", qpk)) == 1
    assert rows(project, "ProgressTask")[qpk]["status"] == "cancelled"

    # A running task: its worker stops it and sends `cancelled`.
    running = project.create_task("ContinueTask", start=True)
    rpk = running["id"]
    client = await sse(gateway.socket, running["stream"])
    first = await asyncio.wait_for(client.next_event(), 20)
    assert first is not None and first.event == "started", first
    asked = time.monotonic()
    said = await asyncio.to_thread(project.manage, "cancel_task", "ContinueTask", str(rpk))
    returned = time.monotonic()
    assert said.strip() == f"cancellation sent to worker {worker_id(worker)}", said
    rest = await until_end(client, 15, "cancelled running task")
    arrived = time.monotonic()
    measured = (
        f"cancelled arrived {arrived - returned:.2f}s after cancel_task returned "
        f"({arrived - asked:.2f}s after it was launched)"
    )
    assert [e.event for e in rest] == ["cancelled"], (triples(rest), measured)
    assert_gap_free([first, *rest], "cancelled running task")
    assert client.ended, measured
    assert rows(project, "ContinueTask")[rpk]["status"] == "cancelled", measured
    assert (await task_state(r, "ContinueTask", rpk))["state"] == "cancelled", measured

    # A completed task: nothing to cancel, nothing appended.
    done = project.create_task("ProgressTask", "steps=1", "delay=0", start=True)
    dpk = done["id"]
    await wait_state(r, "ProgressTask", dpk, {"completed"}, 20)
    said = project.manage("cancel_task", "ProgressTask", str(dpk)).strip()
    assert said.startswith("nothing to cancel") and "completed" in said, said
    assert await r.xlen(events_key("ProgressTask", dpk)) == 3
    assert (await task_state(r, "ProgressTask", dpk))["state"] == "completed"
    assert rows(project, "ProgressTask")[dpk]["status"] == "completed"


# -- 10: cleanup_old_tasks ---------------------------------------------------------------------


async def test_cleanup_old_tasks_dry_run_lists_then_the_real_run_deletes_rows_and_keys(
    r: Redis, project: Project
) -> None:
    project.worker("w1")
    ended = [project.create_task("ProgressTask", "steps=1", "delay=0", start=True)["id"] for _ in range(2)]
    failed = project.create_task("ProgressTask", "steps=2", "delay=0", "fail_at=1", start=True)["id"]
    pending = project.create_task("ProgressTask", "steps=1", "delay=0")["id"]  # never started: stuck
    running = project.create_task("ContinueTask", start=True)["id"]  # a worker runs it: stays
    for pk in ended:
        await wait_state(r, "ProgressTask", pk, {"completed"})
    await wait_state(r, "ProgressTask", failed, {"failed"})
    await wait_state(r, "ContinueTask", running, {"running"})
    gone = [*ended, failed, pending]

    async def keys_of(pk: int) -> int:
        return int(await r.exists(events_key("ProgressTask", pk))) + int(await r.exists(state_key("ProgressTask", pk)))

    out = project.manage("cleanup_old_tasks", "--hours", "0", "--dry-run")
    assert "examples.ProgressTask: would delete 4 tasks (3 ended, 1 stuck pending or queued)" in out, out
    assert "would delete 4 tasks in all" in out, out
    assert set(rows(project, "ProgressTask")) == set(gone)
    for pk in [*ended, failed]:
        assert await keys_of(pk) == 2, pk

    out = project.manage("cleanup_old_tasks", "--hours", "0")
    assert "deleted 4 tasks in all" in out, out
    assert set(rows(project, "ProgressTask")) == set()
    for pk in gone:
        assert await keys_of(pk) == 0, (pk, await r.keys(f"*ProgressTask:{pk}*"))
    assert set(rows(project, "ContinueTask")) == {running}
    assert (await task_state(r, "ContinueTask", running))["state"] == "running"
