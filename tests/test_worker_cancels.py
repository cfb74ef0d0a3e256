"""Cancels that meet a failure, in this process on the real Redis.

* A cancel cut off between ``cancel.lua`` and its ``cancelled`` event leaves the task
  ``cancelling``: the next cancel ends it, and so does a worker that finds it so (its ``begin``
  refused, or its entry abandoned), each writing ``cancelled`` once between them.
* A cancel asked while the task's worker is gone (the request went to the dead worker's control
  stream) ends the task at take-over, instead of running it again.
* A cancel asked while a run was beginning (it reached the worker before the run could be
  stopped, or was lost) cancels the run as soon as it has begun.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord.eventlog import EventLog
from streamcoord.jobs import GROUP, Job, JobQueue
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings

from .workerparts import (
    Executor,
    FakeTask,
    Recovery,
    Rows,
    Run,
    StopReason,
    TaskCoordinator,
    conf,
    outcomes,
    settle,
)
from .workloads import KEYS, state, stream

pytestmark = [pytest.mark.system, pytest.mark.timeout(20)]

REF = TaskRef("shop", "Job", "1")
BEFORE_START = ("cancelled", "cancelled before it started")


@pytest.fixture
def rows(monkeypatch: pytest.MonkeyPatch) -> Rows:
    rows = Rows(monkeypatch)

    async def never(task: FakeTask) -> None:
        raise AssertionError("a cancelled task ran")

    rows.add(REF, never)
    return rows


async def queue_of(redis: Redis) -> JobQueue:
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    return queue


async def types(redis: Redis) -> list[str]:
    return [event.type.decode() for event in await stream(redis, REF)]


async def queue_is_empty(redis: Redis) -> bool:
    summary: Any = await redis.xpending(KEYS.jobs(), GROUP)
    return summary["pending"] == 0 and await redis.xlen(KEYS.jobs()) == 0


class Row:
    """The coordinator's view of a task row."""

    stream_ref = REF

    def __init__(self) -> None:
        self.marked: list[tuple[str, str]] = []

    async def mark_failed(self, error: str, status: str) -> None:
        self.marked.append((str(status), error))


async def cut_off_cancel(redis: Redis) -> JobQueue:
    """A started task whose cancel got as far as ``cancel.lua`` only (its caller died, or its
    append failed): the task is ``cancelling``, with no ``cancelled`` event."""
    queue = await queue_of(redis)
    await queue.start(REF)
    assert await queue.request_cancel(REF) == ("queued", "")
    assert (await state(redis, REF))["state"] == "cancelling"
    return queue


# -- a task left cancelling --------------------------------------------------------------------


@pytest.mark.parametrize("race", [False, True], ids=["alone", "a worker writes it first"])
async def test_a_second_cancel_ends_a_task_left_cancelling(
    redis: Redis, settings: Settings, event_log: EventLog, rows: Rows, monkeypatch: pytest.MonkeyPatch, race: bool
) -> None:
    await cut_off_cancel(redis)
    if race:  # between the second cancel's cancel.lua and its append, a worker ends the task
        request_cancel = JobQueue.request_cancel

        async def then_a_worker(queue: JobQueue, ref: TaskRef) -> tuple[str, str]:
            answer = await request_cancel(queue, ref)
            # On the coordinator's Redis loop: a client of that loop (the queue's) stands in
            # for the worker's.
            assert await outcomes.end_cancelling(EventLog(queue.redis, settings), ref)
            return answer

        monkeypatch.setattr(JobQueue, "request_cancel", then_a_worker)
    monkeypatch.setattr(conf, "get_settings", lambda: settings)
    coordinator, row = TaskCoordinator(), Row()
    try:
        said = await coordinator.cancel_task(row)  # type: ignore[arg-type]
    finally:
        await coordinator.close()

    assert said.describe() == "cancelled before it started" and said.cancelled
    assert row.marked == [BEFORE_START]
    assert (await state(redis, REF))["state"] == "cancelled"
    assert await types(redis) == ["cancelled"]


@pytest.mark.parametrize("who", ["the worker that claims it", "a worker recovering its entry"])
async def test_a_worker_that_finds_a_task_left_cancelling_ends_it(
    redis: Redis, event_log: EventLog, rows: Rows, who: str
) -> None:
    queue = await cut_off_cancel(redis)
    if who == "the worker that claims it":
        [job] = await queue.claim("w1", 1, 100)
        await Executor("w1", queue, event_log, 30_000).run(Run(job, "run-1"), None)
    else:
        await queue.claim("ghost", 1, 100)  # claimed, then its worker died before begin
        await Recovery("w2", queue, event_log, 0, _no_launch, lambda label: False).recover_abandoned()

    assert (await state(redis, REF))["state"] == "cancelled"
    assert await types(redis) == ["cancelled"]
    assert rows.outcomes_of(REF) == [BEFORE_START]
    assert await queue_is_empty(redis)


async def _no_launch(job: Job, token: str, attempt: int | None) -> None:
    raise AssertionError(f"{job.ref} was launched")


# -- a cancel asked while its worker is gone ------------------------------------------------


async def test_a_cancel_asked_while_the_worker_is_gone_ends_the_task_at_take_over(
    redis: Redis, event_log: EventLog, rows: Rows
) -> None:
    rows.max_attempts = 3  # attempts left: without the cancel, the task would run again
    queue = await queue_of(redis)
    await queue.start(REF)
    await queue.claim("ghost", 1, 100)
    assert await queue.begin(REF, "ghost", "ghost-run", 1) == 1
    assert await queue.request_cancel(REF) == ("running", "ghost")  # to a control stream nobody reads
    await asyncio.sleep(0.01)  # the ghost's lease (1 ms) is over
    await Recovery("w2", queue, event_log, 1, _no_launch, lambda label: False).recover_abandoned()

    record = await state(redis, REF)
    assert (record["state"], record["attempt"]) == ("cancelled", "1")
    assert await types(redis) == ["cancelled"]
    assert rows.outcomes_of(REF) == [("cancelled", "cancelled")]
    assert await queue_is_empty(redis)


# -- a cancel asked while the run was beginning ------------------------------------------------


@pytest.mark.parametrize("delivered", [True, False], ids=["request reaches the run", "request lost"])
async def test_a_cancel_asked_while_the_run_was_beginning_cancels_it_once_begun(
    redis: Redis, event_log: EventLog, rows: Rows, monkeypatch: pytest.MonkeyPatch, delivered: bool
) -> None:
    queue = await queue_of(redis)
    await queue.start(REF)
    [job] = await queue.claim("w1", 1, 100)
    run = Run(job, "run-1")
    begin = queue.begin

    async def begin_then_cancel(*args: Any) -> int | None:
        attempt = await begin(*args)
        # The task is running now: a cancel goes to this worker's control stream, and its
        # reader hands it to the run (or the request is lost: delivered before the run existed).
        assert await queue.request_cancel(REF) == ("running", "w1")
        if delivered:
            run.stop(StopReason.CANCEL)
        return attempt

    monkeypatch.setattr(queue, "begin", begin_then_cancel)
    run.task = asyncio.create_task(Executor("w1", queue, event_log, 30_000).run(run, None))
    await settle(run.task)

    assert rows.tasks[REF.label].runs == 0
    assert (await state(redis, REF))["state"] == "cancelled"
    assert await types(redis) == ["cancelled"]
    assert rows.outcomes_of(REF) == [("cancelled", "cancelled")]
    assert await queue_is_empty(redis)
