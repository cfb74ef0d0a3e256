"""Malformed entries in the job queue (``sc:jobs``): a hand edit, a producer of another version.

An entry without a ``task`` field, or whose task is no task label, could never run. Claiming it,
new or abandoned, drops it from the queue (acknowledged and deleted), lists it in the dead
letters, and logs it once; the jobs around it are claimed as usual, and a worker goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord.jobs import GROUP, JobQueue
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings

from .workerparts import Rows, Worker
from .workloads import KEYS, state, until

pytestmark = [pytest.mark.system, pytest.mark.timeout(20)]

GOOD = TaskRef("shop", "Job", "1")
MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"other": "field"}, "no task field"),
    ({"task": "not a label"}, "invalid task label 'not a label': expected app.Model:pk"),
    ({"task": "shop.Job:a b"}, "invalid task id 'a b'"),
    ({"task": b"\xff"}, "can't decode byte 0xff"),
]


async def queue_of(redis: Redis) -> JobQueue:
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    return queue


async def entries(redis: Redis) -> list[str]:
    found: Any = await redis.xrange(KEYS.jobs())
    return [entry_id.decode() for entry_id, _ in found]


async def pending(redis: Redis) -> list[str]:
    found: Any = await redis.xpending_range(KEYS.jobs(), GROUP, "-", "+", 100)
    return [p["message_id"].decode() for p in found]


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    found: Any = await redis.xrange(KEYS.dead_letters())
    return [{k.decode(): v.decode(errors="replace") for k, v in fields.items()} for _, fields in found]


def dropped(caplog: pytest.LogCaptureFixture, entry_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"malformed job {entry_id}" in r.getMessage()]


@pytest.mark.parametrize(("fields", "problem"), MALFORMED, ids=[p for _, p in MALFORMED])
async def test_a_claim_drops_a_malformed_entry_and_returns_the_others(
    redis: Redis, caplog: pytest.LogCaptureFixture, fields: dict[str, Any], problem: str
) -> None:
    queue = await queue_of(redis)
    bad = (await redis.xadd(KEYS.jobs(), fields)).decode()
    await queue.start(GOOD)
    good = (await entries(redis))[-1]
    with caplog.at_level(logging.WARNING, logger="streamcoord.jobs"):
        jobs = await queue.claim("w1", 10, 100)

    assert [(job.entry_id, job.ref) for job in jobs] == [(good, GOOD)]
    assert await entries(redis) == [good]
    assert await pending(redis) == [good]
    [letter] = await dead_letters(redis)
    assert letter["reason"].startswith(f"malformed job {bad}: ") and problem in letter["reason"], letter
    assert letter["attempts"] == "0"
    assert len(dropped(caplog, bad)) == 1


async def test_a_recovery_round_drops_malformed_entries_and_takes_the_others_over(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await queue_of(redis)
    bad = [(await redis.xadd(KEYS.jobs(), fields)).decode() for fields, _ in MALFORMED[:2]]
    await queue.start(GOOD)
    good = (await entries(redis))[-1]
    await redis.xreadgroup(GROUP, "ghost", {KEYS.jobs(): ">"}, count=10)  # then the ghost died

    with caplog.at_level(logging.WARNING, logger="streamcoord.jobs"):
        jobs = await queue.claim_abandoned("w2", 0)
        assert await queue.claim_abandoned("w2", 0) == [jobs[0]]  # the next round goes on

    assert [(job.entry_id, job.ref) for job in jobs] == [(good, GOOD)]
    assert await entries(redis) == [good]
    assert await pending(redis) == [good]
    assert len(await dead_letters(redis)) == 2
    assert [len(dropped(caplog, entry_id)) for entry_id in bad] == [1, 1]


async def test_a_worker_goes_on_past_a_malformed_entry(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    Rows(monkeypatch).add(GOOD, lambda task: asyncio.sleep(0, 1))
    queue = await queue_of(redis)
    await redis.xadd(KEYS.jobs(), {"task": "not a label"})
    await queue.start(GOOD)
    worker = Worker(dataclasses.replace(settings, lease_seconds=2), concurrency=4)
    runner = asyncio.create_task(worker.run())
    try:
        await until(lambda: _state_is(redis, "completed"), 10, "the good task to complete")
    finally:
        worker.stop()
        await asyncio.wait_for(runner, 10)
    assert await entries(redis) == []
    assert len(await dead_letters(redis)) == 1


async def _state_is(redis: Redis, expected: str) -> bool:
    return (await state(redis, GOOD)).get("state") == expected
