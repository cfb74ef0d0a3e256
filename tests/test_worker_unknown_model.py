"""A job that names a model the worker does not have: one added to the project after the worker
started. The worker cannot load new code, so it leaves the job to a worker that has the model:
the task stays queued (no attempt counted, no event, no failure), the job stays in the queue,
and it comes back to the workers only after a lease (no hot loop), with a warning that says to
restart or deploy the workers. A worker that has the model then runs it as usual."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord.eventlog import EventLog
from streamcoord.jobs import GROUP, JobQueue, Verdict
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings

from .workerparts import Executor, Rows, Run, Worker
from .workloads import KEYS, state, until

pytestmark = [pytest.mark.system, pytest.mark.timeout(20)]

#: A model the job names and this process's Django lacks (the test settings install none).
NEW = TaskRef("shop", "Report", "1")
LEASE_MS = 500


async def queue_of(redis: Redis) -> JobQueue:
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    return queue


async def pending(redis: Redis) -> list[str]:
    found: Any = await redis.xpending_range(KEYS.jobs(), GROUP, "-", "+", 100)
    return [p["message_id"].decode() for p in found]


def unknown_model_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "has no model" in r.getMessage()]


async def test_the_task_stays_queued_and_its_job_waits_a_lease_for_a_worker_that_has_the_model(
    redis: Redis, event_log: EventLog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await queue_of(redis)
    assert await queue.start(NEW)
    [job] = await queue.claim("w-old", 10, 100)
    with caplog.at_level(logging.WARNING, logger="django_app.worker"):
        await asyncio.wait_for(Executor("w-old", queue, event_log, LEASE_MS).run(Run(job, "run-1"), None), 5)

    record = await state(redis, NEW)
    assert record["state"] == "queued" and "attempt" not in record, record
    assert await redis.xlen(KEYS.events(NEW)) == 0  # no error event: the task did not fail
    assert await pending(redis) == [job.entry_id]  # still in the queue, unacknowledged
    [warning] = unknown_model_warnings(caplog)
    assert "shop.Report" in warning and "Restart or deploy the workers" in warning, warning
    # The back-off: no worker takes the job again before it has been idle for a lease.
    assert await queue.claim_abandoned("w-new", LEASE_MS) == []

    # A worker deployed with the model takes it over after that lease and runs it: attempt 1.
    Rows(monkeypatch).add(NEW, lambda task: asyncio.sleep(0, {"rows": 3}))
    await asyncio.sleep(LEASE_MS / 1000 + 0.1)
    [again] = await queue.claim_abandoned("w-new", LEASE_MS)
    verdict, _attempt = await queue.recover(again, "w-new", "run-2", LEASE_MS, 1)
    assert verdict == Verdict.QUEUED
    await asyncio.wait_for(Executor("w-new", queue, event_log, LEASE_MS).run(Run(again, "run-2"), None), 5)
    record = await state(redis, NEW)
    assert (record["state"], record["attempt"]) == ("completed", "1"), record
    assert await pending(redis) == []


async def test_a_job_whose_task_is_gone_is_dropped_even_by_a_worker_without_the_model(
    redis: Redis, event_log: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    """cleanup_old_tasks deletes a stuck task's keys but cannot touch the queue: the worker
    that meets its job finds nothing to run and drops it, model or no model."""
    queue = await queue_of(redis)
    await queue.start(NEW)
    await redis.delete(KEYS.state(NEW))
    [job] = await queue.claim("w-old", 10, 100)
    with caplog.at_level(logging.WARNING, logger="django_app.worker"):
        await asyncio.wait_for(Executor("w-old", queue, event_log, LEASE_MS).run(Run(job, "run-1"), None), 5)
    assert await pending(redis) == [] and await redis.xlen(KEYS.jobs()) == 0
    assert unknown_model_warnings(caplog) == []


async def test_a_worker_meets_the_job_once_a_lease_not_in_a_loop(
    redis: Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await queue_of(redis)
    await queue.start(NEW)
    worker = Worker(dataclasses.replace(settings, lease_seconds=1.5), concurrency=4)
    with caplog.at_level(logging.WARNING, logger="django_app.worker"):
        runner = asyncio.create_task(worker.run())
        try:
            await until(lambda: unknown_model_warnings(caplog), 5, "the first warning")
            await asyncio.sleep(3.5)  # a little over two leases more
        finally:
            worker.stop()
            await asyncio.wait_for(runner, 10)
    warnings = unknown_model_warnings(caplog)
    assert 2 <= len(warnings) <= 4, warnings  # the first claim, then about once a lease
    record = await state(redis, NEW)
    assert record["state"] == "queued" and "attempt" not in record, record
    assert await redis.xlen(KEYS.events(NEW)) == 0
    assert len(await pending(redis)) == 1
