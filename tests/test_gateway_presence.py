"""Gateways in Redis (issue 14): each gateway process keeps its entry in ``sc:gateways``,
refreshed every heartbeat (``STREAMCOORD_WORKER_HEARTBEAT_SECONDS``), removed when it stops
cleanly, and forgotten by the other gateways once it is silent for three heartbeats.

Real redis-server and real gateway subprocesses; the heartbeat is short (0.3 s) so that
forgetting takes about a second. Silence is judged on the Redis server's clock, so the checks
read that clock too, never the test's.
"""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.presence import SILENT_BEATS, redis_now_ms

from .processes import Gateway
from .rawsse import RawSSE
from .workloads import KEYS, gateway_stats, until

pytestmark = pytest.mark.system

HEARTBEAT = 0.3
SILENT_MS = int(1000 * SILENT_BEATS * HEARTBEAT)
FIELDS = {
    "host", "pid", "address", "admin", "started_at", "heartbeat_ms", "heartbeat_at",
    "listeners", "streams", "deliveries",
}
JOBS = [TaskRef("shop", "Job", "1"), TaskRef("shop", "Job", "2")]


async def entries(redis: Redis) -> dict[str, dict[str, Any]]:
    raw: Any = await redis.hgetall(KEYS.gateways())
    return {k.decode(): json.loads(v) for k, v in raw.items()}


async def gateway_id(gateway: Gateway) -> str:
    return str((await gateway_stats(gateway))["gateway_id"])


def start(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory(worker_heartbeat_seconds=HEARTBEAT)
    return gateway


@pytest.mark.timeout(60)
async def test_each_gateway_keeps_its_entry_with_the_contracts_fields_and_live_counts(
    redis: Redis, gateway_factory: Any, event_log: EventLog
) -> None:
    first, second = start(gateway_factory), start(gateway_factory)
    ids = {await gateway_id(first): first, await gateway_id(second): second}
    # Written before the gateway announced itself: there at once.
    registry = await entries(redis)
    assert set(registry) == set(ids), (registry, ids)
    now = await redis_now_ms(redis)
    for gid, gateway in ids.items():
        entry = registry[gid]
        assert set(entry) == FIELDS, entry
        assert entry["pid"] == gateway.pid and entry["host"]
        assert entry["address"] == f"unix:{gateway.socket}"
        assert entry["admin"] == f"unix:{gateway.admin_socket}"
        assert (entry["listeners"], entry["streams"], entry["deliveries"]) == (0, 0, 0)
        assert 0 <= now - entry["heartbeat_ms"] <= 10_000, (now, entry)
        beat = datetime.fromisoformat(entry["heartbeat_at"])
        assert int(beat.timestamp() * 1000) == entry["heartbeat_ms"], entry
        assert datetime.fromisoformat(entry["started_at"]) <= beat

    # Refreshed every heartbeat, started_at kept.
    gid = await gateway_id(first)
    before = registry[gid]
    await until(
        lambda: _entry_moved_on(redis, gid, before["heartbeat_ms"]), 10, "a later heartbeat of the first gateway"
    )
    assert (await entries(redis))[gid]["started_at"] == before["started_at"]

    # Clients: three of one task and one of another, on the first gateway.
    for job in JOBS:
        await event_log.declare(job)
    clients = [await RawSSE.open(first.socket, "/stream/Job/1") for _ in range(3)]
    clients.append(await RawSSE.open(first.socket, "/stream/Job/2"))
    try:
        for client in clients:
            await asyncio.wait_for(client.read_head(), 10)
        await until(lambda: _counts(redis, gid, listeners=4, streams=2), 10, "4 listeners on 2 streams in the entry")
        assert (await entries(redis))[await gateway_id(second)]["listeners"] == 0
        for job in JOBS:
            writer = event_log.writer(job)
            for n in range(5):
                await writer.append("progress", {"n": n})
            await writer.append("complete", {})
        received = await asyncio.wait_for(asyncio.gather(*(c.events_until_end() for c in clients)), 20)
        assert [len(events) for events in received] == [6, 6, 6, 6]
    finally:
        for client in clients:
            client.close()
    await until(lambda: _counts(redis, gid, listeners=0, streams=0), 10, "the clients gone from the entry")
    assert (await entries(redis))[gid]["deliveries"] == 4 * 6


@pytest.mark.timeout(60)
async def test_a_gateway_stopped_cleanly_removes_its_entry(redis: Redis, gateway_factory: Any) -> None:
    leaving, staying = start(gateway_factory), start(gateway_factory)
    leaving_id, staying_id = await gateway_id(leaving), await gateway_id(staying)
    assert set(await entries(redis)) == {leaving_id, staying_id}
    assert leaving.stop(signal.SIGTERM) == 0
    # Gone the moment the process is (it removed its entry on the way out), not a heartbeat later.
    assert set(await entries(redis)) == {staying_id}


@pytest.mark.timeout(60)
async def test_a_killed_gateway_is_forgotten_by_another_after_three_silent_heartbeats(
    redis: Redis, gateway_factory: Any
) -> None:
    killed, survivor = start(gateway_factory), start(gateway_factory)
    killed_id = await gateway_id(killed)
    killed.stop(signal.SIGKILL)
    last_beat = (await entries(redis))[killed_id]["heartbeat_ms"]  # left behind: nobody removed it
    await until(lambda: _gone(redis, killed_id), 15, "the killed gateway's entry to be forgotten")
    # Not before it was silent for three heartbeats, on the Redis clock.
    assert await redis_now_ms(redis) - last_beat > SILENT_MS
    assert set(await entries(redis)) == {await gateway_id(survivor)}
    await until(lambda: f"forgot gateway {killed_id}" in survivor.log_text(), 5, "the survivor to log it")


@pytest.mark.timeout(60)
async def test_a_malformed_entry_is_dropped_and_reported_once(redis: Redis, gateway_factory: Any) -> None:
    gateway = start(gateway_factory)
    for _ in range(2):  # written again after it was dropped: dropped again, not reported again
        await redis.hset(KEYS.gateways(), "bogus", "notjson")
        await until(lambda: _gone(redis, "bogus"), 10, "the malformed entry to be dropped")
    text = gateway.log_text()
    assert text.count("dropped the malformed entry 'bogus'") == 1, text
    assert "(not JSON)" in text
    assert set(await entries(redis)) == {await gateway_id(gateway)}


async def _entry_moved_on(redis: Redis, gid: str, beat_ms: int) -> bool:
    return bool((await entries(redis))[gid]["heartbeat_ms"] > beat_ms)


async def _counts(redis: Redis, gid: str, *, listeners: int, streams: int) -> bool:
    entry = (await entries(redis))[gid]
    return bool(entry["listeners"] == listeners and entry["streams"] == streams)


async def _gone(redis: Redis, member: str) -> bool:
    return not await redis.hexists(KEYS.gateways(), member)
