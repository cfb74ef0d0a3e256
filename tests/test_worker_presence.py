"""A worker's presence against a real redis-server: heartbeats stamped with the Redis clock, and
the registry's housekeeping (``Presence.forget_silent_workers``), in this process.

The housekeeping measures silence on the Redis server's clock, never on the clocks of the hosts
that wrote the entries, and a malformed entry is dropped (logged once) without stopping it.
The same round in a real worker process, with an abandoned job behind it, is in
``test_worker_recovery.py``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from redis.asyncio import Redis

from django_app.worker.presence import Presence, redis_now_ms
from streamcoord.keys import KeySpace
from streamcoord.settings import Settings

pytestmark = pytest.mark.system

KEYS = KeySpace("sc")
#: Silence past max(lease, 3 heartbeats) = 3 s makes a worker gone.
SETTINGS = Settings(lease_seconds=2, worker_heartbeat_seconds=1)
HOUR_MS = 3_600_000


def presence(redis: Redis, worker_id: str = "me") -> Presence:
    return Presence(redis, KEYS, worker_id, 7, SETTINGS, running_count=lambda: 3)


async def registry(redis: Redis) -> dict[str, bytes]:
    raw: Any = await redis.hgetall(KEYS.workers())
    return {k.decode(): v for k, v in raw.items()}


def other_keys(worker_id: str) -> list[str]:
    return [KEYS.worker_running(worker_id), KEYS.worker_control(worker_id)]


@pytest.mark.timeout(10)
async def test_a_heartbeat_is_stamped_with_the_redis_clock(redis: Redis) -> None:
    before = await redis_now_ms(redis)
    await presence(redis).heartbeat()
    after = await redis_now_ms(redis)
    entry = json.loads((await registry(redis))["me"])
    assert before <= entry["heartbeat_ms"] <= after, (before, entry, after)
    assert entry["heartbeat_at"].startswith("20") and entry["heartbeat_at"].endswith("+00:00"), entry
    assert entry["started_at"] == entry["heartbeat_at"], entry  # the first beat
    assert (entry["concurrency"], entry["running"]) == (7, 3), entry


@pytest.mark.timeout(10)
async def test_silence_is_measured_on_the_redis_clock_and_malformed_entries_are_dropped(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    now = await redis_now_ms(redis)
    entries = {
        # Alive by the Redis clock; its host's clock is 25 years behind.
        "alive-skewed": {"heartbeat_ms": now - 500, "heartbeat_at": "2001-01-01T00:00:00+00:00"},
        # Silent for an hour by the Redis clock; its host's clock says it beat just now.
        "dead-skewed": {"heartbeat_ms": now - HOUR_MS, "heartbeat_at": "2099-01-01T00:00:00+00:00"},
        # Written by a worker from before heartbeat_ms: read from heartbeat_at.
        "old-version-dead": {"heartbeat_at": "2001-01-01T00:00:00+00:00"},
        "no-heartbeat": {"host": "h", "pid": 1},
        "bad-date": {"heartbeat_at": "yesterday"},
        "bad-ms": {"heartbeat_ms": "soon"},
    }
    await redis.hset(KEYS.workers(), mapping={k: json.dumps(v) for k, v in entries.items()})
    await redis.hset(KEYS.workers(), "bogus", "notjson")
    for worker_id in ("dead-skewed", "alive-skewed", "bogus"):
        await redis.sadd(KEYS.worker_running(worker_id), "examples.ProgressTask:1")
        await redis.xadd(KEYS.worker_control(worker_id), {"cancel": "examples.ProgressTask:1"})
    me = presence(redis)

    with caplog.at_level(logging.INFO, logger="django_app.worker.presence"):
        await me.forget_silent_workers()
        assert set(await registry(redis)) == {"alive-skewed"}
        # The same bad entry again (a process that keeps writing it): dropped, not logged again.
        await redis.hset(KEYS.workers(), "bogus", "notjson")
        await me.forget_silent_workers()
        assert set(await registry(redis)) == {"alive-skewed"}

    assert await redis.exists(*other_keys("dead-skewed")) == 0  # a dead worker's keys go too
    assert await redis.exists(*other_keys("alive-skewed")) == 2
    # A malformed entry's keys stay: the worker behind it may be alive (a pending cancel).
    assert await redis.exists(*other_keys("bogus")) == 2
    dropped = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    for worker_id, problem in [
        ("bogus", "not JSON"), ("no-heartbeat", "no heartbeat_ms or heartbeat_at"),
        ("bad-date", "heartbeat_at is not an ISO 8601 time"), ("bad-ms", "heartbeat_ms is not a number"),
    ]:
        said = [line for line in dropped if f"entry {worker_id!r}" in line]
        assert len(said) == 1 and problem in said[0], (worker_id, dropped)
    assert len(dropped) == 4, dropped
    assert all(r.levelno == logging.WARNING for r in caplog.records if "malformed" in r.getMessage())
    forgot = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("forgot worker"))
    assert forgot == ["forgot worker dead-skewed (silent for over 3.0s)", "forgot worker old-version-dead (silent for over 3.0s)"]


@pytest.mark.timeout(10)
async def test_entries_whose_heartbeat_is_no_finite_number_are_dropped_without_stopping_the_round(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    now = await redis_now_ms(redis)
    bad = {"huge": b'{"heartbeat_ms": 1e400}', "infinite": b'{"heartbeat_ms": Infinity}', "nan": b'{"heartbeat_ms": NaN}'}
    await redis.hset(KEYS.workers(), mapping=bad)
    await redis.hset(KEYS.workers(), mapping={
        "alive": json.dumps({"heartbeat_ms": now}), "dead": json.dumps({"heartbeat_ms": now - HOUR_MS}),
    })
    with caplog.at_level(logging.INFO, logger="django_app.worker.presence"):
        await presence(redis).forget_silent_workers()
    assert set(await registry(redis)) == {"alive"}
    dropped = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert sorted(line.split("'")[1] for line in dropped) == sorted(bad), dropped
    assert all("heartbeat_ms is not a finite number" in line for line in dropped), dropped


@pytest.mark.timeout(10)
async def test_leaving_removes_only_this_workers_keys(redis: Redis) -> None:
    me, other = presence(redis, "me"), presence(redis, "other")
    await me.heartbeat()
    await other.heartbeat()
    await me.add_running("examples.ProgressTask:1")
    await other.add_running("examples.ProgressTask:2")
    await me.leave()
    assert set(await registry(redis)) == {"other"}
    assert await redis.exists(KEYS.worker_running("me")) == 0
    assert await redis.smembers(KEYS.worker_running("other")) == {b"examples.ProgressTask:2"}
