"""A real ``Worker`` in this process, on the real Redis, around the edges of its runs' leases.

* A lease renewal that comes while a run is beginning leaves it alone: the record is not the
  run's yet, so there is nothing to renew (renewing would call the run lost).
* Two queue entries of one task claimed together: one run, never replaced; the second entry is
  dropped, and the run keeps its lease to its end.
* A task taken over while a run of it is still here (one whose ``begin`` is failing) starts
  once that run is gone, never beside it.
* A recovery round under way when the worker is told to stop may still launch a run: the worker
  waits for the round, gives that run the grace period too, and hands it back.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord.jobs import GROUP, JobQueue
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings

from .workerparts import FakeTask, Rows, Worker, settle
from .workloads import KEYS, state, stream, until

pytestmark = [pytest.mark.system, pytest.mark.timeout(30)]

REF = TaskRef("shop", "Job", "1")


@pytest.fixture
def rows(monkeypatch: pytest.MonkeyPatch) -> Rows:
    return Rows(monkeypatch)


@pytest.fixture
async def running() -> AsyncIterator[Any]:
    """Starts workers (``running(worker)``) and stops them after the test (at once: a second
    stop hands their runs back)."""
    started: list[tuple[Worker, asyncio.Task[None]]] = []

    def run(worker: Worker) -> asyncio.Task[None]:
        task = asyncio.create_task(worker.run())
        started.append((worker, task))
        return task

    yield run
    for worker, task in started:
        worker.stop()
        worker.stop()
        await asyncio.wait_for(task, 10)


def worker(settings: Settings, **changes: Any) -> Worker:
    return Worker(dataclasses.replace(settings, **changes), concurrency=4)


async def types(redis: Redis) -> list[str]:
    return [event.type.decode() for event in await stream(redis, REF)]


async def ended(redis: Redis) -> bool:
    return (await state(redis, REF)).get("state") in ("completed", "failed", "cancelled")


async def queue_is_empty(redis: Redis) -> bool:
    summary: Any = await redis.xpending(KEYS.jobs(), GROUP)
    return summary["pending"] == 0 and await redis.xlen(KEYS.jobs()) == 0


async def test_a_lease_renewal_while_the_run_begins_leaves_it_alone(
    redis: Redis, settings: Settings, rows: Rows, running: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows.add(REF, lambda task: asyncio.sleep(0, 1))
    w = worker(settings, lease_seconds=1.5)  # renewals every 0.5 s
    begin, renew = w.queue.begin, w._renew_leases
    beginning, renewed = asyncio.Event(), asyncio.Event()

    async def renew_and_tell() -> None:
        await renew()
        if beginning.is_set():
            renewed.set()

    async def slow_begin(*args: Any) -> int | None:
        beginning.set()
        await asyncio.wait_for(renewed.wait(), 10)  # a renewal round comes meanwhile
        return await begin(*args)

    monkeypatch.setattr(w, "_renew_leases", renew_and_tell)
    monkeypatch.setattr(w.queue, "begin", slow_begin)
    await JobQueue(redis, KEYS).start(REF)
    running(w)
    await until(lambda: ended(redis), 10, "the task to end")

    assert (await state(redis, REF))["state"] == "completed"
    assert rows.outcomes_of(REF) == [("completed", "")]
    assert await types(redis) == ["complete"]
    await until(lambda: queue_is_empty(redis), 5, "the job to be acknowledged")


async def test_two_queue_entries_of_one_task_claimed_together_make_one_run(
    redis: Redis, settings: Settings, rows: Rows, running: Any
) -> None:
    async def body(task: FakeTask) -> int:
        await task.send_event("start", {})
        await asyncio.sleep(3)  # past the lease: only renewals keep it
        await task.send_event("progress", {})
        return 1

    task = rows.add(REF, body)
    await JobQueue(redis, KEYS).start(REF)
    await redis.xadd(KEYS.jobs(), {"task": REF.label})  # a second entry of the same start
    running(worker(settings, lease_seconds=2))
    await until(lambda: ended(redis), 15, "the task to end")

    record = await state(redis, REF)
    assert (record["state"], record["attempt"]) == ("completed", "1")
    assert await types(redis) == ["start", "progress", "complete"]
    assert rows.outcomes_of(REF) == [("completed", "")]
    assert task.runs == 1
    await until(lambda: queue_is_empty(redis), 5, "both entries to be acknowledged")


async def test_a_task_taken_over_while_a_run_of_it_is_beginning_here_starts_after_that_run(
    redis: Redis, settings: Settings, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = rows.add(REF, lambda task: asyncio.sleep(0, 1))
    w = worker(settings)
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await queue.start(REF)
    await redis.xadd(KEYS.jobs(), {"task": REF.label})
    first, second = await queue.claim(w.id, 2, 100)
    begin, beginning, gate = w.queue.begin, asyncio.Event(), asyncio.Event()

    async def slow_begin(*args: Any) -> int | None:
        beginning.set()
        await gate.wait()
        return await begin(*args)

    monkeypatch.setattr(w.queue, "begin", slow_begin)
    try:
        await w._launch(first, "run-1", None)
        here = w.runs[REF.label]
        await beginning.wait()
        # Meanwhile this worker's recovery took the task over through the other entry (as
        # recover.lua does: running under the new run's token, attempt 2).
        await redis.hset(KEYS.state(REF), mapping={"state": "running", "run": "run-2", "worker": w.id, "attempt": 2})
        gate.set()  # the first run's begin goes on now, and finds the task taken
        await w._launch(second, "run-2", 2)
        assert here.task is not None and here.task.done()  # the first run ended before
        await settle(w.runs[REF.label].task)
    finally:
        for client in (w.redis, w._claim_redis, w._control_redis):
            await client.aclose()

    assert task.runs == 1
    assert (await state(redis, REF))["state"] == "completed"
    assert await types(redis) == ["attempt", "complete"]
    assert await queue_is_empty(redis)


async def test_a_run_launched_by_a_recovery_round_as_the_worker_stops_is_handed_back(
    redis: Redis, settings: Settings, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows.max_attempts = 3
    started = asyncio.Event()

    async def body(task: FakeTask) -> None:
        started.set()
        await asyncio.Event().wait()  # runs until stopped

    task = rows.add(REF, body)
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await queue.start(REF)
    [job] = await queue.claim("ghost", 1, 100)
    assert await queue.begin(REF, "ghost", "ghost-run", 1) == 1  # then the ghost died

    w = worker(settings, lease_seconds=1, shutdown_grace_seconds=60)
    recover, recovering, release = w.queue.recover, asyncio.Event(), asyncio.Event()

    async def held_recover(*args: Any) -> tuple[str, int]:
        verdict = await recover(*args)
        recovering.set()
        await release.wait()  # the round is under way when the worker is told to stop
        return verdict

    monkeypatch.setattr(w.queue, "recover", held_recover)
    runner = asyncio.create_task(w.run())
    await asyncio.wait_for(recovering.wait(), 10)
    w.stop()
    await asyncio.sleep(0.3)
    release.set()
    await asyncio.wait_for(started.wait(), 10)  # the late run got its grace period
    w.stop()  # a second stop hands back at once
    await asyncio.wait_for(runner, 10)

    assert task.runs == 1  # the late run got its grace period
    assert w.runs == {}
    record = await state(redis, REF)
    assert (record["state"], record["attempt"], record["lease_until"]) == ("running", "2", "0"), record  # handed back
    entries: Any = await redis.xpending_range(KEYS.jobs(), GROUP, "-", "+", 10)
    [entry] = entries
    assert entry["message_id"].decode() == job.entry_id and entry["time_since_delivered"] >= 10_000, entry
