"""The job queue against a real redis-server: starts that survive a failed XADD, and recovery
of abandoned jobs behind any number of live ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from streamcoord.jobs import GROUP, START_GRACE_MS, JobQueue, Verdict
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.taskstate import State

from .faultproxy import FaultProxy
from .processes import RedisServer, start_gateway
from .workloads import until

pytestmark = pytest.mark.system

KEYS = KeySpace("sc")
REF = TaskRef("shop", "Job", "1")


def job_xadd(command: bytes) -> bool:
    return b"XADD" in command and KEYS.jobs().encode() in command


def no_retries(socket: Path) -> Redis:
    """A client that reports a cut connection instead of re-sending (as one whose retries ran
    out while Redis was unreachable would)."""
    return Redis(unix_socket_path=str(socket), retry=Retry(NoBackoff(), 0))


@pytest.mark.parametrize("lazy", [False, True], ids=["start", "lazy start"])
async def test_a_start_whose_job_xadd_failed_is_completed_by_the_next_start(
    tmp_path: Path, redis_server: RedisServer, redis: Redis, lazy: bool
) -> None:
    await redis.hset(KEYS.state(REF), "state", State.PENDING)
    async with FaultProxy(tmp_path / "proxy.sock", redis_server.socket).running() as proxy:
        client = no_retries(proxy.path)
        queue = JobQueue(client, KEYS)
        await queue.ensure_group()
        proxy.cut_command(job_xadd)
        with pytest.raises(RedisConnectionError):
            await queue.start(REF, lazy=lazy)
        assert proxy.faults == 1
        assert await redis.hget(KEYS.state(REF), "state") == b"queued"  # flipped, but no job
        assert await redis.xlen(KEYS.jobs()) == 0

        outcome = await queue.start(REF, lazy=lazy)  # the caller's retry, a client's reconnect
        assert outcome.queued, outcome.describe()
        [(entry_id, fields)] = await redis.xrange(KEYS.jobs())
        assert fields == {b"task": REF.label.encode()}
        assert await redis.hget(KEYS.state(REF), "job") == entry_id

        again = await queue.start(REF, lazy=lazy)  # now the job exists: nothing more to do
        assert not again.queued and again.describe() == "not started: the task is already queued"
        assert await redis.xlen(KEYS.jobs()) == 1
        await client.aclose()

    worker = JobQueue(redis, KEYS)
    [job] = await worker.claim("w1", 10, 100)
    assert job.ref == REF
    assert await worker.begin(REF, "w1", "run-1", 30_000) == 1


async def test_a_gateway_lazy_start_cut_off_is_completed_when_the_client_comes_back(
    tmp_path: Path, redis_server: RedisServer, redis: Redis
) -> None:
    """The first client of a pending task gets 503 when the job cannot be queued; its reconnect,
    to any gateway, starts the task instead of finding it 'queued' forever."""
    await redis.hset(KEYS.state(REF), "state", State.PENDING)
    async with FaultProxy(tmp_path / "proxy.sock", redis_server.socket).running() as proxy:
        gateway = await asyncio.to_thread(start_gateway, tmp_path, f"unix://{proxy.path}")
        try:
            transport = httpx.AsyncHTTPTransport(uds=str(gateway.socket))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as http:
                proxy.cut_command(job_xadd, times=100)  # outlasts redis-py's own retries
                first = await http.get("/stream/shop/Job/1", headers={"accept": "text/event-stream"})
                assert first.status_code == 503, first.text
                assert proxy.faults > 0 and await redis.xlen(KEYS.jobs()) == 0
                proxy.clear()
                async with http.stream(
                    "GET", "/stream/shop/Job/1", headers={"accept": "text/event-stream"}
                ) as again:
                    assert again.status_code == 200
            [(entry_id, _)] = await redis.xrange(KEYS.jobs())
            assert await redis.hget(KEYS.state(REF), "job") == entry_id
        finally:
            await asyncio.to_thread(gateway.stop)


async def test_a_head_request_never_starts_a_task(tmp_path: Path, redis_server: RedisServer, redis: Redis) -> None:
    """``curl -I`` (or a prefetching proxy) asks about a stream; only a GET may start its task."""
    await redis.hset(KEYS.state(REF), "state", State.PENDING)
    gateway = await asyncio.to_thread(start_gateway, tmp_path, redis_server.url)
    try:
        transport = httpx.AsyncHTTPTransport(uds=str(gateway.socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as http:
            head = await http.head("/stream/shop/Job/1", headers={"accept": "text/event-stream"})
            assert head.status_code == 200
        assert await redis.hget(KEYS.state(REF), "state") == b"pending"
        assert await redis.xlen(KEYS.jobs()) == 0
    finally:
        await asyncio.to_thread(gateway.stop)


async def test_a_client_waiting_on_a_start_cut_off_sees_the_task_start_after_the_grace(
    tmp_path: Path, redis_server: RedisServer, redis: Redis
) -> None:
    """A starter flipped the task to queued and died before its XADD. A client that connects
    within that start's grace stays connected (it will not come back to start the task), so
    the gateway starts it once the grace is over."""
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await redis.hset(KEYS.state(REF), "state", State.PENDING)
    gateway = await asyncio.to_thread(start_gateway, tmp_path, redis_server.url)
    # Flipped just before the client connects (a gateway that is slow to start on a busy
    # machine must not outlast the grace), then it died.
    await queue._start(keys=[KEYS.state(REF)], args=["now", "start", 3_000])
    try:
        transport = httpx.AsyncHTTPTransport(uds=str(gateway.socket))
        headers = {"accept": "text/event-stream"}
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as http,
            http.stream("GET", "/stream/shop/Job/1", headers=headers) as response,
        ):
            assert response.status_code == 200
            assert await redis.xlen(KEYS.jobs()) == 0  # within the grace: left to the starter
            await until(lambda: redis.xlen(KEYS.jobs()), START_GRACE_MS / 1000 + 10, "the job")
        [(entry_id, _)] = await redis.xrange(KEYS.jobs())
        assert await redis.hget(KEYS.state(REF), "job") == entry_id
    finally:
        await asyncio.to_thread(gateway.stop)


@pytest.mark.parametrize("lazy", [False, True], ids=["start", "lazy start"])
async def test_racing_starts_add_one_job(redis: Redis, lazy: bool) -> None:
    """Twenty starts at once (views, gateways' lazy starts) of one pending task: one job."""
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await redis.hset(KEYS.state(REF), "state", State.PENDING)
    outcomes = await asyncio.gather(*(queue.start(REF, lazy=lazy) for _ in range(20)))
    assert sum(outcome.queued for outcome in outcomes) == 1
    assert await redis.xlen(KEYS.jobs()) == 1
    # The race itself, step by step: a second start lands between the first one's flip and
    # its XADD, and must leave the job to it.
    other = TaskRef("shop", "Job", "2")
    await redis.hset(KEYS.state(other), "state", State.PENDING)
    mode = "lazy" if lazy else "start"
    first = await queue._start(keys=[KEYS.state(other)], args=["now", mode, START_GRACE_MS])
    second = await queue._start(keys=[KEYS.state(other)], args=["now", mode, START_GRACE_MS])
    assert (first[0], second[0]) == (1, 0)


async def test_a_start_cut_off_without_a_word_is_completed_after_the_grace(redis: Redis) -> None:
    """A starter that died between its flip and its XADD (so it never said it failed): other
    starts leave the job to it for START_GRACE_MS, then one of them adds it."""
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await redis.hset(KEYS.state(REF), mapping={"state": State.PENDING})
    await queue._start(keys=[KEYS.state(REF)], args=["now", "start", 60_000])  # flipped, then died
    assert not (await queue.start(REF)).queued  # still within its grace
    assert await redis.xlen(KEYS.jobs()) == 0
    await redis.hset(KEYS.state(REF), "starting_until", 0)  # as if the grace ran out
    assert (await queue.start(REF)).queued
    assert await redis.xlen(KEYS.jobs()) == 1


async def test_a_second_job_of_one_start_is_never_run_twice(redis: Redis) -> None:
    """Should two jobs exist for one start (a starter that outlived its grace), one worker takes
    the task and the other job is dropped."""
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await redis.hset(KEYS.state(REF), mapping={"state": State.QUEUED})  # a start with no job
    assert (await queue.start(REF)).queued
    await redis.hdel(KEYS.state(REF), "job")  # as if the two had raced past the grace
    assert (await queue.start(REF)).queued
    jobs = await queue.claim("w1", 10, 100)
    assert len(jobs) == 2
    assert await queue.begin(REF, "w1", "run-1", 30_000) == 1
    assert await queue.begin(REF, "w1", "run-2", 30_000) is None  # the other job is dropped


async def test_job_added_never_revives_a_record_that_expired(redis: Redis) -> None:
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    added = await queue._job_added(keys=[KEYS.state(REF)], args=["1-0"])
    assert added == 0
    assert not await redis.exists(KEYS.state(REF))


async def test_abandoned_jobs_behind_a_thousand_live_ones_are_all_recovered(redis: Redis) -> None:
    """XAUTOCLAIM examines at most 10 x COUNT pending entries per call: a single call from 0-0
    stops long before abandoned jobs queued behind 1,100 live runs."""
    live, abandoned, lease_ms = 1100, 100, 30_000
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    pipe = redis.pipeline(transaction=False)
    for pk in range(live + abandoned):
        pipe.xadd(KEYS.jobs(), {"task": TaskRef("shop", "Job", str(pk)).label})
    await pipe.execute()
    await redis.xreadgroup(GROUP, "alive", {KEYS.jobs(): ">"}, count=live)
    taken = await redis.xreadgroup(GROUP, "dead", {KEYS.jobs(): ">"}, count=abandoned)
    dead_ids = [entry_id for entry_id, _ in taken[0][1]]
    # The dead worker's entries have not been refreshed for longer than a lease.
    await redis.xclaim(KEYS.jobs(), GROUP, "dead", 0, dead_ids, idle=lease_ms * 2, justid=True)

    recovered = await queue.claim_abandoned("rescuer", lease_ms)  # one recovery round

    assert sorted(job.entry_id for job in recovered) == sorted(i.decode() for i in dead_ids)
    pending = await redis.xpending(KEYS.jobs(), GROUP)
    assert {c["name"]: c["pending"] for c in pending["consumers"]} == {
        b"alive": live, b"rescuer": abandoned
    }
    assert await queue.claim_abandoned("rescuer", lease_ms) == []  # nothing is claimed twice


async def test_a_round_stops_at_its_limit_and_the_next_goes_on_from_there(redis: Redis) -> None:
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    for pk in range(30):
        await redis.xadd(KEYS.jobs(), {"task": TaskRef("shop", "Job", str(pk)).label})
    taken = await redis.xreadgroup(GROUP, "dead", {KEYS.jobs(): ">"}, count=30)
    ids = [entry_id for entry_id, _ in taken[0][1]]
    await redis.xclaim(KEYS.jobs(), GROUP, "dead", 0, ids, idle=60_000, justid=True)
    rounds = [await queue.claim_abandoned("rescuer", 30_000, limit=12) for _ in range(4)]
    assert [len(found) for found in rounds] == [12, 12, 6, 0]
    assert sorted(job.entry_id for found in rounds for job in found) == sorted(i.decode() for i in ids)


async def test_recover_verdicts_are_the_ones_the_queue_names(redis: Redis) -> None:
    queue = JobQueue(redis, KEYS)
    await queue.ensure_group()
    await redis.hset(KEYS.state(REF), mapping={"state": State.RUNNING, "lease_until": 0, "attempt": 1})
    await redis.xadd(KEYS.jobs(), {"task": REF.label})
    [job] = await queue.claim("w1", 1, 100)
    assert await queue.recover(job, "w2", "run-2", 30_000, 2) == (Verdict.RERUN, 2)
    assert await queue.recover(job, "w3", "run-3", 30_000, 2) == (Verdict.ALIVE, 2)
    await redis.hset(KEYS.state(REF), "lease_until", 0)
    assert await queue.recover(job, "w3", "run-3", 30_000, 2) == (Verdict.EXHAUSTED, 2)
    await redis.delete(KEYS.state(REF))
    assert await queue.recover(job, "w3", "run-4", 30_000, 2) == (Verdict.MISSING, 0)
