"""How a run ends when something gets in its way, in this process on the real Redis.

* A run another worker took over (its lease ran out while it paused) never acknowledges the
  job: XACK is not per consumer, so it would drop the entry the new owner holds, and a new owner
  that then dies leaves a task nobody can find. The same for a take-over that is itself taken
  over before it writes, and for a run whose ``begin`` came after another worker took its
  entry over.
* A stop (cancel, hand back, lost lease) that comes after ``process()`` returned or raised does
  not cut the end off: the row is recorded and the job acknowledged.
* A task that sent its own ``complete`` is recorded completed, whatever came after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord.eventlog import EventLog
from streamcoord.jobs import GROUP, Job, JobQueue, Verdict
from streamcoord.keys import TaskRef

from .workerparts import (
    Executor,
    FakeTask,
    Outcome,
    Recovery,
    Rows,
    Run,
    StopReason,
    outcomes,
    settle,
)
from .workloads import KEYS, state, stream, until

pytestmark = [pytest.mark.system, pytest.mark.timeout(20)]

REF = TaskRef("shop", "Job", "1")


@pytest.fixture
def rows(monkeypatch: pytest.MonkeyPatch) -> Rows:
    return Rows(monkeypatch)


async def queue_of(redis: Redis) -> JobQueue:
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    return queue


async def pending(redis: Redis) -> list[tuple[str, str]]:
    """The queue's pending entries: (entry id, consumer)."""
    found: Any = await redis.xpending_range(KEYS.jobs(), GROUP, "-", "+", 10)
    return [(p["message_id"].decode(), p["consumer"].decode()) for p in found]


async def types(redis: Redis) -> list[str]:
    return [event.type.decode() for event in await stream(redis, REF)]


async def started(redis: Redis, event_log: EventLog, rows: Rows, body: Any, lease_ms: int = 30_000,
                  **fields: Any) -> tuple[Run, FakeTask, JobQueue]:
    """The task started, claimed by ``w1`` and running in an Executor."""
    task = rows.add(REF, body, **fields)
    queue = await queue_of(redis)
    await queue.start(REF)
    [job] = await queue.claim("w1", 1, 100)
    run = Run(job, "run-1")
    run.task = asyncio.create_task(Executor("w1", queue, event_log, lease_ms).run(run, None))
    return run, task, queue


# -- a run fenced off never acknowledges the new owner's job ------------------------------


@pytest.mark.parametrize("then", ["sends an event", "returns", "raises"])
async def test_a_run_taken_over_while_it_paused_leaves_the_job_to_the_new_owner(
    redis: Redis, event_log: EventLog, rows: Rows, then: str
) -> None:
    resumed = asyncio.Event()

    async def body(task: FakeTask) -> int:
        await task.send_event("start", {})
        await resumed.wait()  # the worker pauses past its lease here
        if then == "sends an event":
            await task.send_event("progress", {})
        if then == "raises":
            raise RuntimeError("too late")
        return 1

    # A lease of 1 ms: expired by the time another worker looks.
    run, _, queue = await started(redis, event_log, rows, body, lease_ms=1)
    await until(lambda: types(redis), 5, "the start event")
    [taken] = await queue.claim_abandoned("w2", 0)
    assert await queue.recover(taken, "w2", "run-2", 30_000, 2) == (Verdict.RERUN, 2)
    resumed.set()
    await settle(run.task)

    assert await pending(redis) == [(taken.entry_id, "w2")]  # still the new owner's
    assert await redis.xlen(KEYS.jobs()) == 1
    assert await types(redis) == ["start"]
    assert rows.recorded == {}  # the outcome is the new owner's to record
    assert (await state(redis, REF))["run"] == "run-2"


@pytest.mark.parametrize("verdict", [Verdict.EXHAUSTED, Verdict.CANCEL, "ended before Redis lost it"])
async def test_a_take_over_taken_over_before_it_wrote_leaves_the_job_to_the_last_one(
    redis: Redis, event_log: EventLog, rows: Rows, monkeypatch: pytest.MonkeyPatch, verdict: str
) -> None:
    """w2 takes over a dead worker's task to end it (give up, cancel, or write the row's end
    again), then pauses past its own lease; w3 takes the task over before w2 writes."""
    rows.add(REF, lambda task: asyncio.sleep(0))
    if verdict == "ended before Redis lost it":
        rows.max_attempts = 3
        rows.ended[REF.label] = Outcome.completed(5)
    queue = await queue_of(redis)
    await queue.start(REF)
    [ghost_job] = await queue.claim("ghost", 1, 100)
    assert await queue.begin(REF, "ghost", "ghost-run", 1) == 1
    if verdict == Verdict.CANCEL:
        await queue.request_cancel(REF)
    await asyncio.sleep(0.01)

    w2 = await queue_of(redis)
    recover = w2.recover

    async def recover_then_pause(job: Job, consumer: str, run: str, lease_ms: int, max_attempts: int) -> tuple[str, int]:
        answer = await recover(job, consumer, run, 1, max_attempts)  # w2's lease: 1 ms
        await asyncio.sleep(0.01)
        w3 = await queue_of(redis)
        [taken] = await w3.claim_abandoned("w3", 0)
        assert (await w3.recover(taken, "w3", "run-3", 30_000, 9))[0] in (Verdict.RERUN, Verdict.CANCEL)
        return answer

    monkeypatch.setattr(w2, "recover", recover_then_pause)
    launched: list[Job] = []

    async def launch(job: Job, token: str, attempt: int | None) -> None:
        launched.append(job)

    await Recovery("w2", w2, event_log, 1, launch, lambda label: False).recover_abandoned()

    assert launched == []
    assert await pending(redis) == [(ghost_job.entry_id, "w3")]
    assert await redis.xlen(KEYS.jobs()) == 1
    assert await redis.xlen(KEYS.dead_letters()) == 0
    assert rows.recorded == {}
    assert await types(redis) == []
    assert (await state(redis, REF))["run"] == "run-3"


async def test_a_run_whose_begin_came_after_another_worker_took_its_entry_leaves_it_alone(
    redis: Redis, event_log: EventLog, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """w1's begin stalls past a lease; w2 takes the idle entry over and begins the task from
    it. w1's begin is refused, and the entry it would acknowledge is w2's now."""
    rows.add(REF, lambda task: asyncio.sleep(0))
    queue = await queue_of(redis)
    await queue.start(REF)
    [job] = await queue.claim("w1", 1, 100)
    begin = queue.begin

    async def stalled_begin(*args: Any) -> int | None:
        w2 = await queue_of(redis)
        [taken] = await w2.claim_abandoned("w2", 0)
        assert await w2.recover(taken, "w2", "run-2", 30_000, 1) == (Verdict.QUEUED, 0)
        assert await w2.begin(REF, "w2", "run-2", 30_000) == 1
        return await begin(*args)

    monkeypatch.setattr(queue, "begin", stalled_begin)
    await Executor("w1", queue, event_log, 30_000).run(Run(job, "run-1"), None)

    assert await pending(redis) == [(job.entry_id, "w2")]
    assert (await state(redis, REF))["run"] == "run-2"


# -- a stop that comes while the run writes its end -----------------------------------------


@pytest.mark.parametrize("reason", list(StopReason))
@pytest.mark.parametrize("ending", ["returns", "raises"])
async def test_a_stop_that_comes_after_process_ended_does_not_cut_the_end_off(
    redis: Redis, event_log: EventLog, rows: Rows, reason: StopReason, ending: str
) -> None:
    recording, release = asyncio.Event(), asyncio.Event()

    async def slow_database() -> None:
        recording.set()
        await release.wait()

    async def body(task: FakeTask) -> int:
        await task.send_event("start", {})
        if ending == "raises":
            raise ValueError("boom")
        return 42

    rows.before_record = slow_database
    run, _, _ = await started(redis, event_log, rows, body)
    await asyncio.wait_for(recording.wait(), 5)  # the terminal event is written; the row is next
    stopped = run.stop(reason)
    release.set()
    await settle(run.task)  # no CancelledError out of the run

    expected = ("completed", "") if ending == "returns" else ("failed", "ValueError: boom")
    assert rows.outcomes_of(REF) == [expected]
    assert await types(redis) == ["start", "complete" if ending == "returns" else "error"]
    assert await redis.xlen(KEYS.jobs()) == 0
    assert await pending(redis) == []
    assert not stopped


async def test_a_cancel_while_the_row_loads_ends_the_run_cancelled(
    redis: Redis, event_log: EventLog, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    loading, release = asyncio.Event(), asyncio.Event()
    load = outcomes.load_task

    async def slow_load(ref: TaskRef) -> Any:
        loading.set()
        await release.wait()
        return await load(ref)

    monkeypatch.setattr(outcomes, "load_task", slow_load)
    run, task, _ = await started(redis, event_log, rows, lambda task: asyncio.sleep(0))
    await asyncio.wait_for(loading.wait(), 5)
    assert run.stop(StopReason.CANCEL) is True
    await settle(run.task)

    assert task.runs == 0
    assert rows.outcomes_of(REF) == [("cancelled", "cancelled")]
    assert await types(redis) == ["cancelled"]
    assert await redis.xlen(KEYS.jobs()) == 0


# -- a task's own complete is its outcome ------------------------------------------------------


@pytest.mark.parametrize("then", ["raises", "runs out of time", "is cancelled"])
async def test_a_task_that_sent_its_own_complete_is_recorded_completed_whatever_came_after(
    redis: Redis, event_log: EventLog, rows: Rows, then: str
) -> None:
    async def body(task: FakeTask) -> None:
        await task.send_event("complete", {"final_value": 7})
        if then == "raises":
            raise ValueError("after the end")
        await asyncio.sleep(30)

    limit = 0.2 if then == "runs out of time" else None
    run, _, _ = await started(redis, event_log, rows, body, time_limit=limit)
    if then == "is cancelled":
        await until(lambda: types(redis), 5, "the complete event")
        assert run.stop(StopReason.CANCEL) is True
    await settle(run.task)

    assert rows.outcomes_of(REF) == [("completed", "")]
    assert await types(redis) == ["complete"]
    assert (await state(redis, REF))["state"] == "completed"
    assert await redis.xlen(KEYS.jobs()) == 0
    assert await pending(redis) == []
