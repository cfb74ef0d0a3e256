"""Interleavings of one writer's appends, driven step by step against a real redis-server.

The one that lost events: an append whose caller gave up on it (its reply timed out, or the
caller was cancelled) is still on its way to Redis when the writer re-reads the stream. The
writer numbers its next event from that stale read, the late append lands first under the same
number, and the next event must be numbered again, not reported written (``dup``) and dropped.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamcoord import EventLog, Settings, TaskRef
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
