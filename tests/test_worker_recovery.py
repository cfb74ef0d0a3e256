"""A real worker's recovery rounds are not stopped by what other workers left in the registry.

A worker (``ghost``) claimed a job, began its task and vanished without a trace but its stale
registry entry. Beside it in ``sc:workers`` lie malformed entries (not JSON, no heartbeat, a bad
date), and the entry of a live worker whose host clock is 25 years behind but whose heartbeat is
recent on the Redis clock. A fresh worker must take the task over and run it to its end, forget
the ghost, drop the malformed entries (each logged once, though one keeps coming back), and keep
the live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from django_app.worker.presence import redis_now_ms
from streamcoord.jobs import JobQueue
from streamcoord.keys import TaskRef

from .processes import Project
from .workloads import KEYS, create_tasks, row, state, stream, stream_problems, until

pytestmark = pytest.mark.system

#: A short lease: the ghost's job is abandoned a second after it began. Heartbeats of 5 s make a
#: worker gone after 15 s of silence, so a live entry is never forgotten by a slow round.
WORKER = {"lease_seconds": 2, "worker_heartbeat_seconds": 5}
MALFORMED: dict[str, str] = {
    "bogus": "notjson",
    "no-heartbeat": json.dumps({"host": "h", "pid": 1}),
    "bad-date": json.dumps({"host": "h", "pid": 2, "heartbeat_at": "yesterday"}),
}


async def abandon(redis: Redis, ref: TaskRef) -> None:
    """What a worker that died mid-run leaves: the job claimed (pending under ``ghost``), the
    task running under its run token, the lease expired."""
    ghost = JobQueue(redis, KEYS)
    await ghost.ensure_group()
    [job] = await ghost.claim("ghost", 1, 100)
    assert job.ref == ref
    assert await ghost.begin(ref, "ghost", "ghost-run", lease_ms=1) == 1


async def live_entries(redis: Redis) -> None:
    """Plays two processes until cancelled: a live worker on a host whose clock is far behind
    (its heartbeat_at says 2001; its heartbeat_ms is the Redis clock), and one that keeps writing
    a malformed entry."""
    while True:
        now = await redis_now_ms(redis)
        await redis.hset(KEYS.workers(), "alive-skewed", json.dumps(
            {"host": "far-behind", "pid": 3, "heartbeat_at": "2001-01-01T00:00:00+00:00", "heartbeat_ms": now}
        ))
        await redis.hset(KEYS.workers(), "bogus", MALFORMED["bogus"])
        await asyncio.sleep(0.2)


async def registry(redis: Redis) -> dict[str, Any]:
    raw: Any = await redis.hgetall(KEYS.workers())
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


@pytest.mark.timeout(90)
async def test_a_malformed_worker_entry_does_not_stop_the_recovery_of_an_abandoned_job(
    project: Project, redis: Redis
) -> None:
    [ref] = create_tasks(project, "RetryingProgressTask", 1, steps=2, delay=0)
    await abandon(redis, ref)
    stale = await redis_now_ms(redis) - 3_600_000
    entries: dict[Any, Any] = {
        **MALFORMED,
        # Silent for an hour on the Redis clock; its host's clock says it beat just now.
        "ghost": json.dumps({"host": "gone", "pid": 4, "heartbeat_at": "2099-01-01T00:00:00+00:00", "heartbeat_ms": stale}),
    }
    await redis.hset(KEYS.workers(), mapping=entries)
    await redis.sadd(KEYS.worker_running("ghost"), ref.label)
    writer = asyncio.create_task(live_entries(redis))
    try:
        worker = project.worker("w", concurrency=4, **WORKER)
        # The task is taken over and runs again, to its end.
        await until(lambda: _ended(redis, ref), 30, f"{ref} to be taken over and completed")
        final = await state(redis, ref)
        assert (final["state"], final["attempt"]) == ("completed", "2"), final
        events = await stream(redis, ref)
        assert [e.type.decode() for e in events] == ["attempt", "start", "progress", "progress", "complete"]
        assert stream_problems(events) == []
        await until(lambda: row(project, ref)[0] == "completed", 15, "the row to record the outcome")
        # The ghost is forgotten with its running set; the malformed entries are dropped.
        await until(lambda: _forgotten(redis), 15, "the ghost and the malformed entries to go")
        assert await redis.exists(KEYS.worker_running("ghost")) == 0
        # Another round, while "bogus" keeps coming back: it is logged once, not every round.
        # (A fresh malformed entry is dropped only by a round: once it is gone, one has run.)
        await redis.hset(KEYS.workers(), "probe", "notjson")
        await until(lambda: _gone(redis, "probe"), 20, "another forgetting round")
        left = await registry(redis)
        assert "alive-skewed" in left, left
        assert "ghost" not in left and "no-heartbeat" not in left and "bad-date" not in left, left
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    log = worker.log_text()
    assert "recovered examples.RetryingProgressTask:1 from a stopped worker: rerun (attempt 2)" in log, log
    assert "forgot worker ghost (silent for over 15.0s)" in log, log
    assert "alive-skewed" not in log, log
    for worker_id in MALFORMED:
        said = [line for line in log.splitlines() if f"malformed entry {worker_id!r}" in line]
        assert len(said) == 1, (worker_id, said, log)
    assert "Traceback" not in log, log


async def _gone(redis: Redis, worker_id: str) -> bool:
    return not await redis.hexists(KEYS.workers(), worker_id)


async def _ended(redis: Redis, ref: TaskRef) -> bool:
    return (await state(redis, ref)).get("state") in ("completed", "failed")


async def _forgotten(redis: Redis) -> bool:
    return not {"ghost", "no-heartbeat", "bad-date"} & set(await registry(redis))
