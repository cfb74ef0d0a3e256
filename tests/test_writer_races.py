"""Interleavings of one writer's appends, driven step by step against a real redis-server.

The one that lost events: an append whose caller gave up on it (its reply timed out, or the
caller was cancelled) is still on its way to Redis when the writer re-reads the stream. The
writer numbers its next event from that stale read, the late append lands first under the same
number, and the next event must be numbered again, not reported written (``dup``) and dropped.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamcoord import AppendError, EventId, EventLog, Settings, TaskRef
from streamcoord.publisher import Append, Publisher

from .processes import RedisServer

pytestmark = pytest.mark.system

REF = TaskRef("shop", "Job", "7")


class LatePublisher(Publisher):
    """A fault hook: the call carrying ``late_seq`` times out for its caller but is held back,
    and lands just before the next call goes out (after the writer's re-read)."""

    def __init__(self, redis: Redis, settings: Settings, late_seq: int) -> None:
        super().__init__(redis, settings)
        self.late_seq = late_seq
        self.held: asyncio.Task[Any] | None = None
        self.calls: list[list[int]] = []

    async def _call(self, common: list[str | int], appends: list[Append]) -> list[Any]:
        self.calls.append([append.seq for append in appends])
        if self.held is None and any(append.seq == self.late_seq for append in appends):
            release = asyncio.Event()
            self.release = release

            async def land_later() -> list[Any]:
                await release.wait()
                return await Publisher._call(self, common, appends)

            self.held = asyncio.create_task(land_later())
            raise RedisTimeoutError("Timeout talking to Redis")
        if self.held is not None and not self.held.done():
            self.release.set()
            await self.held  # the late append lands first
        return await Publisher._call(self, common, appends)


async def entries(redis: Redis, log: EventLog) -> list[tuple[int, str]]:
    raw = await redis.xrange(log.keys.events(REF))
    return [(int(entry_id.split(b"-")[0]), fields[b"type"].decode()) for entry_id, fields in raw]


async def test_a_terminal_event_after_a_late_append_is_written_exactly_once(
    redis_server: RedisServer, redis: Redis
) -> None:
    settings = Settings(redis_url=redis_server.url, send_retry_seconds=0.01)
    log = EventLog(redis, settings)
    log.publisher = publisher = LatePublisher(redis, settings, late_seq=3)
    writer = log.writer(REF, "")
    await writer.append("start", {})
    await writer.append("progress", {"n": 1})
    with pytest.raises(RedisTimeoutError):  # outcome unknown: the writer re-reads next time
        await writer.append("progress", {"n": 2})
    assert await entries(redis, log) == [(1, "start"), (2, "progress")]

    done = await writer.append("complete", {"final_value": 42}, final_value=42)

    assert await entries(redis, log) == [(1, "start"), (2, "progress"), (3, "progress"), (4, "complete")]
    state = await log.state(REF)
    assert state is not None and state.state == "completed" and state.last_seq == 4
    assert state.final_value == 42
    assert done.seq == 4 and writer.ended == "complete"
    assert publisher.calls == [[1], [2], [3], [3], [4]]  # numbered 3 from the re-read, then 4


@pytest.mark.parametrize("queued", [False, True], ids=["on the wire", "queued"])
async def test_a_cancelled_append_never_costs_the_next_one(
    redis_server: RedisServer, redis: Redis, queued: bool
) -> None:
    """Cancelled on the wire, an append may land or not, before or after the writer's re-read;
    queued, it still goes out with its batch and the writer waits for it before re-reading.
    Either way the next event is written once, numbered right after what is there."""
    settings = Settings(redis_url=redis_server.url)
    log = EventLog(redis, settings)
    writer = log.writer(REF, "")
    await writer.append("start", {})
    other = log.writer(TaskRef("shop", "Job", "8"), "")
    await other.append("start", {})
    if queued:  # another task's append holds the wire, so this one waits in the queue
        busy = asyncio.create_task(other.append("progress", {}))
        await asyncio.sleep(0)
    sending = asyncio.create_task(writer.append("progress", {"n": 1}))
    await asyncio.sleep(0)
    assert len(log.publisher._queue) == (1 if queued else 0)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    done = await writer.append("complete", {})
    written = await entries(redis, log)
    assert [seq for seq, _ in written] == list(range(1, len(written) + 1))
    assert [kind for _, kind in written] in (["start", "complete"], ["start", "progress", "complete"])
    if queued:
        await busy
        assert written == [(1, "start"), (2, "progress"), (3, "complete")]
    assert done.seq == len(written)


async def test_a_true_retry_of_a_written_event_is_still_a_dup(redis_server: RedisServer, redis: Redis) -> None:
    """The same event sent twice (its first reply lost) is written once: the entry at its
    number holds the same type and data."""
    settings = Settings(redis_url=redis_server.url)
    log = EventLog(redis, settings)
    writer = log.writer(REF, "")
    await writer.append("start", {})
    [(_, fields)] = await redis.xrange(log.keys.events(REF))
    keys = (log.keys.events(REF), log.keys.state(REF))
    same = Append(*keys, writer.epoch, 1, "start", fields[b"data"], "", "", writer.token, "")
    other = same._replace(data=b'{"another":1}')
    assert (await log.publisher.submit(same)).status == "dup"
    assert (await log.publisher.submit(other)).status == "stale"
    assert (await log.publisher.submit(other._replace(type="progress", data=fields[b"data"]))).status == "stale"
    assert await redis.xlen(log.keys.events(REF)) == 1


async def test_concurrent_first_sends_of_a_new_writer_share_one_epoch(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Several sends at once from a writer that has not read its stream yet: one re-read, and
    every event written under one epoch, numbered in the order they were made."""
    log = EventLog(redis, Settings(redis_url=redis_server.url))
    writer = log.writer(REF, "")
    ids = await asyncio.gather(*(writer.append("progress", {"n": n}) for n in range(10)))
    assert len({event_id.epoch for event_id in ids}) == 1
    assert [event_id.seq for event_id in ids] == list(range(1, 11))
    written = await redis.xrange(log.keys.events(REF))
    assert [json.loads(fields[b"data"])["n"] for _, fields in written] == list(range(10))


class UnreachableOnce(Publisher):
    """A fault hook: the first call carrying ``seq`` never reaches Redis (its reply times out),
    so its append waits to be re-sent while later appends of the same writer go out."""

    def __init__(self, redis: Redis, settings: Settings, seq: int) -> None:
        super().__init__(redis, settings)
        self.seq, self.fired = seq, False

    async def _call(self, common: list[str | int], appends: list[Append]) -> list[Any]:
        if not self.fired and any(append.seq == self.seq for append in appends):
            self.fired = True
            raise RedisTimeoutError("Timeout talking to Redis")
        return await Publisher._call(self, common, appends)


async def test_an_append_overtaken_while_it_waits_to_be_resent_loses_nothing(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Event 3 times out and waits to be re-sent; the terminal event, numbered 4, reaches Redis
    first and is answered 'lost' (3 is missing). That is not lost data: the writer waits for 3,
    then numbers the terminal event again. Nothing is wiped, the task ends exactly once."""
    settings = Settings(redis_url=redis_server.url)
    log = EventLog(redis, settings)
    log.publisher = UnreachableOnce(redis, settings, seq=3)
    writer = log.writer(REF, "")
    first = await writer.append("start", {})
    await writer.append("progress", {"n": 1})
    third, done = await asyncio.gather(
        writer.append("progress", {"n": 2}), writer.append("complete", {}, final_value=1)
    )
    assert (third.epoch, third.seq) == (first.epoch, 3)
    assert (done.epoch, done.seq) == (first.epoch, 4)
    assert await entries(redis, log) == [(1, "start"), (2, "progress"), (3, "progress"), (4, "complete")]
    state = await log.state(REF)
    assert state is not None and state.state == "completed" and state.epoch == first.epoch


async def test_a_broken_key_of_one_task_fails_only_its_own_append(
    redis_server: RedisServer, redis: Redis
) -> None:
    """One batch, two tasks; the second task's events key was overwritten by hand with a string.
    The first task's append is written and answered ok; the second is refused, written nowhere."""
    log = EventLog(redis, Settings(redis_url=redis_server.url))
    broken = TaskRef("shop", "Job", "14")
    await redis.set(log.keys.events(broken), "not a stream")
    good_writer, broken_writer = log.writer(REF, ""), log.writer(broken, "")
    await good_writer.append("start", {})
    results = await asyncio.gather(
        good_writer.append("progress", {}), broken_writer.append("start", {}), return_exceptions=True
    )
    assert results[0] == EventId(good_writer.epoch, 2)
    assert isinstance(results[1], AppendError) and "hold something else" in str(results[1])
    assert await redis.get(log.keys.events(broken)) == b"not a stream"
    assert not await redis.exists(log.keys.state(broken))
    keys = (log.keys.events(broken), log.keys.state(broken))
    one = Append(*keys, "e", 1, "start", b"{}", "", "", "w", "")
    other = Append(log.keys.events(REF), log.keys.state(REF), good_writer.epoch, 3, "progress", b"{}", "", "", good_writer.token, "")
    handles = [log.publisher.submit(one), log.publisher.submit(other)]  # the same batch
    replies = await asyncio.gather(*handles)
    assert [reply.status for reply in replies] == ["invalid", "ok"]
