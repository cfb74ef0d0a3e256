"""The event log against a real redis-server: numbering, idempotent retry, refusal, retention."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streamcoord import (
    EventLog,
    PayloadNotSerializable,
    PayloadTooLarge,
    Settings,
    TaskEnded,
    TaskRef,
    WriterFenced,
)
from streamcoord.publisher import Append, Status

from .faultproxy import FaultProxy
from .processes import RedisServer

pytestmark = pytest.mark.system


def ref(pk: int | str = 1) -> TaskRef:
    return TaskRef("shop", "Job", str(pk))


async def seqs(client: Redis, key: str) -> list[int]:
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in await client.xrange(key)]


async def test_concurrent_tasks_get_gap_free_sequences(event_log: EventLog, redis: Redis) -> None:
    async def run(pk: int) -> None:
        writer = event_log.writer(ref(pk))
        for step in range(1, 101):
            await writer.append("progress", {"step": step})

    await asyncio.gather(*(run(pk) for pk in range(50)))
    for pk in range(50):
        entries = await redis.xrange(event_log.keys.events(ref(pk)))
        assert [int(i.split(b"-")[0]) for i, _ in entries] == list(range(1, 101))
        assert [f[b"data"].startswith(b'{"step":%d,' % n) for n, (_, f) in enumerate(entries, 1)] == [True] * 100
        assert (await event_log.state(ref(pk))).last_seq == 100  # type: ignore[union-attr]
    # Concurrent appends of one process share round trips.
    assert event_log.publisher.batches < 50 * 100


async def test_concurrent_sends_of_one_task_keep_submission_order(event_log: EventLog, redis: Redis) -> None:
    writer = event_log.writer(ref())
    await writer.append("start", {})
    ids = await asyncio.gather(*(writer.append("progress", {"n": n}) for n in range(200)))
    assert [i.seq for i in ids] == list(range(2, 202))
    entries = await redis.xrange(event_log.keys.events(ref()))
    assert [f[b"data"].split(b",")[0] for _, f in entries[1:]] == [b'{"n":%d' % n for n in range(200)]


async def test_two_writers_of_one_task_never_share_a_number(event_log: EventLog, redis: Redis) -> None:
    first, second = event_log.writer(ref()), event_log.writer(ref())
    await first.append("start", {})
    await second.append("progress", {"by": "second"})  # opens on seq 1, writes seq 2
    with pytest.raises(WriterFenced):
        await first.append("progress", {"by": "first"})  # seq 2 is taken by another writer
    assert await seqs(redis, event_log.keys.events(ref())) == [1, 2]


async def test_a_retry_of_the_same_append_is_written_once(event_log: EventLog, redis: Redis) -> None:
    writer = event_log.writer(ref())
    await writer.append("start", {})
    # Re-send the exact script call for seq 1, as a retry after a lost reply would.
    keys = event_log.keys
    [(_, fields)] = await redis.xrange(keys.events(ref()))
    again = Append(
        keys.events(ref()), keys.state(ref()), writer.epoch, 1, "start", fields[b"data"], "", "",
        writer.token, "",
    )
    reply = await event_log.publisher.submit(again)
    assert reply.status is Status.DUP
    assert await redis.xlen(event_log.keys.events(ref())) == 1


async def test_an_append_whose_reply_is_lost_is_written_once(
    tmp_path: Path, redis_server: RedisServer, redis: Redis, settings: Settings
) -> None:
    async with FaultProxy(tmp_path / "proxy.sock", redis_server.socket).running() as proxy:
        client = Redis(
            unix_socket_path=str(proxy.path), retry=Retry(NoBackoff(), 3)
        )
        log = EventLog(client, settings)
        writer = log.writer(ref())
        await writer.append("start", {})
        proxy.cut_reply(lambda reply: b"ok" in reply)
        event_id = await writer.append("progress", {"step": 1})  # reply lost, redis-py re-sends
        await client.aclose()
    assert proxy.faults == 1
    assert event_id.seq == 2
    assert await seqs(redis, log.keys.events(ref())) == [1, 2]


async def test_refused_payloads_leave_nothing_behind(event_log: EventLog, redis: Redis) -> None:
    writer = event_log.writer(ref())
    with pytest.raises(PayloadNotSerializable, match=r"'progress' of task shop\.Job:1"):
        await writer.append("progress", {"when": object()})
    with pytest.raises(PayloadTooLarge, match="65537 bytes"):
        await writer.append("progress", {"x": "y" * (65537 - 8)})
    assert not await redis.exists(event_log.keys.events(ref()), event_log.keys.state(ref()))
    assert (await writer.append("progress", {"ok": True})).seq == 1


async def test_terminal_event_ends_the_run_and_starts_expiry(event_log: EventLog, redis: Redis) -> None:
    writer = event_log.writer(ref())
    await writer.append("start", {})
    assert await redis.ttl(event_log.keys.events(ref())) == -1  # no expiry while running
    await writer.append("complete", {"message": "done"}, final_value={"answer": 42})
    with pytest.raises(TaskEnded):
        await writer.append("progress", {})
    state = await event_log.state(ref())
    assert state is not None
    assert (state.state, state.last_seq, state.last_type, state.final_value) == ("completed", 2, "complete", {"answer": 42})
    assert 86390 < await redis.ttl(event_log.keys.events(ref())) <= 86400
    assert 7 * 86400 - 10 < await redis.ttl(event_log.keys.state(ref())) <= 7 * 86400
    assert await redis.xlen(event_log.keys.events(ref())) == 2


@pytest.mark.parametrize(("event_type", "state"), [("error", "failed"), ("cancelled", "cancelled")])
async def test_other_terminal_events_record_their_state(event_log: EventLog, event_type: str, state: str) -> None:
    await event_log.writer(ref()).append(event_type, {"message": "x"})
    assert (await event_log.state(ref())).state == state  # type: ignore[union-attr]


async def test_the_stream_is_trimmed_exactly(redis: Redis, redis_server: RedisServer) -> None:
    log = EventLog(redis, Settings(redis_url=redis_server.url, max_stream_length=50))
    writer = log.writer(ref())
    for n in range(120):
        await writer.append("progress", {"n": n})
    assert await seqs(redis, log.keys.events(ref())) == list(range(71, 121))


async def test_a_lost_stream_continues_under_a_new_epoch(event_log: EventLog, redis: Redis) -> None:
    writer = event_log.writer(ref())
    first = await writer.append("start", {})
    await redis.delete(event_log.keys.events(ref()))  # as a restart without persistence would
    after = await writer.append("progress", {})
    assert after.epoch != first.epoch and after.seq == 1


async def test_cancelling_a_blocked_read_leaves_no_reply_behind(redis: Redis) -> None:
    """Regression guard for the redis-py bug that handed one command's reply to the next."""
    blocked = asyncio.create_task(redis.xread({"sc:nothing": "0-0"}, block=2000))
    await asyncio.sleep(0.1)
    blocked.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await blocked
    await redis.set("sc:probe", "value")
    assert await redis.get("sc:probe") == b"value"
    await redis.xadd("sc:nothing", {"a": "1"})
    assert await redis.get("sc:probe") == b"value"
