"""Issue 12: live events travel by Redis Pub/Sub, and a gap is never silent.

``append.lua`` publishes each event on its task's shard channel in the same atomic step as the
XADD; a gateway's hub follows the channels and reads a stream only to fill a gap. Pub/Sub
delivers at most once, so each way a message can be lost is made to happen here, on a real
redis-server, and a client must still get every event exactly once, in order, with no reset:

- Redis kills the subscriber (``CLIENT KILL TYPE pubsub``) again and again mid stream;
- Redis cuts the subscriber over its ``client-output-buffer-limit`` (the gateway stopped with
  SIGSTOP while a burst is published);
- a message is lost with the connection up (dropped on its way to the hub): the next message
  shows the gap, or, when none comes, the hub's periodic check does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord import hub as hub_module
from streamcoord.codec import live_frame, live_message
from streamcoord.hub import Hub
from streamcoord.keys import KeySpace
from streamcoord.listener import BatchKind
from streamcoord.registry import register_models
from streamcoord.settings import Settings
from streamcoord.subscriber import PoolConnector

from .processes import Gateway, RedisServer, start_gateway
from .rawsse import RawSSE, SSEEvent
from .workloads import append_progress, check_in_order, gateway_stats, until

pytestmark = pytest.mark.system

REF = TaskRef("shop", "Job", "1")
TIMEOUT = 20


async def received(client: RawSSE) -> list[SSEEvent]:
    return await asyncio.wait_for(client.events_until_end(), TIMEOUT)


# -- the message itself ----------------------------------------------------------------------


async def test_the_append_script_publishes_each_event_with_its_sequence_and_epoch(
    event_log: EventLog, redis: Redis
) -> None:
    """What a gateway gets by Pub/Sub is what the stream holds: the same frame, sequence and
    epoch, on the task's shard channel, published in the same step as the XADD."""
    channel = event_log.keys.live(REF)
    listener = Redis(unix_socket_path=redis.connection_pool.connection_kwargs["path"], protocol=2)
    pubsub = listener.pubsub()
    try:
        await pubsub.execute_command("SSUBSCRIBE", channel)
        confirmed = await pubsub.parse_response(block=False, timeout=TIMEOUT)
        assert confirmed[0] == b"ssubscribe"
        await append_progress(event_log, REF, 1, 2, complete=True)
        messages = []
        while len(messages) < 3:
            reply = await pubsub.parse_response(block=False, timeout=TIMEOUT)
            assert reply is not None, "no message"
            messages.append(reply)
    finally:
        await pubsub.aclose()
        await listener.aclose()
    entries = await redis.xrange(event_log.keys.events(REF))
    assert [m[:2] for m in messages] == [[b"smessage", channel.encode()]] * 3
    for (entry_id, fields), message in zip(entries, messages, strict=True):
        seq = int(entry_id.split(b"-")[0])
        assert message[2] == live_message(seq, fields[b"epoch"], fields[b"type"], fields[b"data"])
        frame = live_frame(message[2])
        assert (frame.seq, frame.epoch, frame.terminal) == (seq, fields[b"epoch"], fields[b"type"] == b"complete")


# -- Redis drops the subscriber --------------------------------------------------------------


async def test_client_kill_type_pubsub_mid_stream_loses_and_repeats_nothing(
    gateway: Gateway, event_log: EventLog, redis: Redis, sse: Any
) -> None:
    await append_progress(event_log, REF, 1, 1)
    client = await sse(gateway.socket, "/stream/Job/1")
    assert (await asyncio.wait_for(client.next_event(), TIMEOUT)).seq == 1
    kills = 0

    async def kill_subscribers() -> None:
        """Kill the gateway's subscriber six times, each once it is back (between appends)."""
        nonlocal kills
        while kills < 6:
            await asyncio.sleep(0.15)
            if await redis.execute_command("CLIENT", "LIST", "TYPE", "pubsub"):
                kills += int(await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))

    killer = asyncio.create_task(kill_subscribers())
    last = 1
    try:
        while not killer.done():
            last += 1
            await append_progress(event_log, REF, last, last)
            await asyncio.sleep(0.003)
        await killer
    finally:
        killer.cancel()
    await append_progress(event_log, REF, last + 1, last, complete=True)
    check_in_order(await received(client), last + 1, first=2)
    assert kills == 6 and last > 20  # events were written between the kills
    stats = await gateway_stats(gateway)
    assert stats["link_drops"] == 6 and stats["catch_ups"] >= 6, stats
    assert "Traceback" not in gateway.log_text()


async def test_a_subscriber_cut_over_its_output_buffer_limit_loses_nothing(
    tmp_path: Path, sse: Any
) -> None:
    """A gateway that stops reading (SIGSTOP) while 2 MB of events are published: Redis cuts its
    subscriber connection at the 64 KB pub/sub output-buffer limit set here, dropping what it
    held. Once the gateway runs again it reconnects and reads the stream: every event, once."""
    server = RedisServer(tmp_path / "redis", ["--client-output-buffer-limit", "pubsub 64kb 0 0"]).start()
    redis = Redis(unix_socket_path=str(server.socket))
    gateway = start_gateway(tmp_path, server.url)
    try:
        log = EventLog(redis, Settings(redis_url=server.url))
        await append_progress(log, REF, 1, 1)
        await register_models(redis, KeySpace("sc"), [("shop", "Job")])
        client = await sse(gateway.socket, "/stream/Job/1")
        assert (await asyncio.wait_for(client.next_event(), TIMEOUT)).seq == 1
        channel = log.keys.live(REF)

        async def subscribed() -> bool:
            reply = await redis.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            return bool(reply[1])

        await until(subscribed, TIMEOUT, "the gateway to subscribe")
        os.kill(gateway.pid, signal.SIGSTOP)
        try:
            await append_progress(log, REF, 2, 200, size=10_000)
            redis_log = (server.directory / "redis.log").read_text()
            assert "closed ASAP for overcoming of output buffer limits" in redis_log, redis_log
        finally:
            os.kill(gateway.pid, signal.SIGCONT)
        await append_progress(log, REF, 201, 200, complete=True)
        check_in_order(await received(client), 201, first=2)
        stats = await gateway_stats(gateway)
        assert stats["link_drops"] >= 1, stats
    finally:
        gateway.stop()
        await redis.aclose()
        server.stop()


# -- a message lost on its way ----------------------------------------------------------------


@pytest.fixture
async def live_hub(redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hub]:
    """A started hub on the real redis-server (its subscriber speaks RESP2, as a gateway's)."""
    monkeypatch.setattr(hub_module, "REVALIDATE_SECONDS", 0.5)
    subscriber = Redis(unix_socket_path=redis.connection_pool.connection_kwargs["path"], protocol=2)
    hub = Hub(PoolConnector(subscriber.connection_pool), redis, settings)
    await hub.start()
    yield hub
    await hub.stop()
    await subscriber.aclose()


async def take_seqs(hub: Hub, key: bytes, count: int, listener: Any) -> list[int]:
    seqs: list[int] = []
    while len(seqs) < count:
        batches = await asyncio.wait_for(listener.take(), TIMEOUT)
        assert batches, "the listener closed"
        assert all(b.kind is BatchKind.EVENTS or b.kind is BatchKind.HEARTBEAT for b in batches)
        seqs += [f.seq for b in batches for f in b.frames]
    return seqs


async def test_a_lost_message_is_read_from_the_stream_when_the_next_one_shows_the_gap(
    live_hub: Hub, event_log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = event_log.keys.events(REF)
    listener, _ = live_hub.subscribe(key, 0)
    await until(lambda: live_hub._streams[key.encode()].buffer is None, TIMEOUT, "the stream to go live")
    real = live_hub.on_message
    dropped: list[int] = []

    def lossy(channel: bytes, message: bytes) -> None:
        seq = live_frame(message).seq
        if seq in (5, 6, 9) and seq not in dropped:
            dropped.append(seq)  # lost on its way: the connection stays up
            return
        real(channel, message)

    monkeypatch.setattr(live_hub, "on_message", lossy)  # the subscriber looks it up per message
    await append_progress(event_log, REF, 1, 8)
    assert await take_seqs(live_hub, key.encode(), 8, listener) == list(range(1, 9))
    await append_progress(event_log, REF, 9, 11, complete=True)
    assert await take_seqs(live_hub, key.encode(), 4, listener) == list(range(9, 13))
    assert dropped == [5, 6, 9]
    assert live_hub.stats["gaps"] == 2  # at 7 (5 and 6 lost) and at 10
    assert live_hub.stats["link_drops"] == 0


async def test_a_lost_last_message_is_found_by_the_periodic_check(
    live_hub: Hub, event_log: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The terminal event's message is lost and nothing follows it: no gap ever shows, so the
    hub's check of its streams against their state records (every REVALIDATE_SECONDS) does."""
    key = event_log.keys.events(REF)
    listener, _ = live_hub.subscribe(key, 0)
    await until(lambda: live_hub._streams[key.encode()].buffer is None, TIMEOUT, "the stream to go live")
    real = live_hub.on_message

    def loses_the_end(channel: bytes, message: bytes) -> None:
        if not live_frame(message).terminal:
            real(channel, message)

    monkeypatch.setattr(live_hub, "on_message", loses_the_end)  # the subscriber looks it up per message
    await append_progress(event_log, REF, 1, 3, complete=True)
    assert await take_seqs(live_hub, key.encode(), 4, listener) == [1, 2, 3, 4]
    assert live_hub.stats["behind"] >= 1


async def test_a_client_joining_while_events_flow_gets_each_once(
    live_hub: Hub, event_log: EventLog
) -> None:
    """Subscribe, then read, then order by sequence: listeners added to a stream at its cursor
    while it is being written, each new one reading what the hub lacked, lose nothing."""
    from streamcoord.feed import Feed

    writing = asyncio.create_task(append_progress(event_log, REF, 1, 400, complete=True))
    feeds: list[Feed] = []
    try:
        while not writing.done():
            with contextlib.suppress(Exception):  # UnknownTask before the first event
                feeds.append(await Feed.open(event_log, live_hub, REF))
            await asyncio.sleep(0.005)
        await writing

        async def all_of(feed: Feed) -> list[int]:
            out = b"".join([chunk async for chunk in feed.chunks()])
            return [int(line.rsplit(b"-", 1)[1]) for line in out.split(b"\n") if line.startswith(b"id: ")]

        results = await asyncio.wait_for(asyncio.gather(*(all_of(f) for f in feeds)), TIMEOUT)
    finally:
        for feed in feeds:
            feed.close()
    assert len(feeds) >= 5
    assert all(seqs == list(range(1, 402)) for seqs in results), [s[:3] + s[-3:] for s in results]
    assert live_hub.listener_count == 0


async def test_a_multiplex_opens_its_tasks_one_at_a_time(live_hub: Hub, event_log: EventLog) -> None:
    """What a multiplexed connection holds of history at once is one task's: opening it reads
    the state records only, and each task's feed opens when the one before has sent its
    history (a client that stops reading stops the opening too)."""
    from streamcoord.ids import task_tag
    from streamcoord.mux import Multiplex
    from streamcoord.stall import WriteStall

    tasks = [TaskRef("shop", "Job", str(n)) for n in range(1, 6)]
    for ref in tasks:
        await append_progress(event_log, ref, 1, 50, complete=False)
    mux = await Multiplex.open(event_log, live_hub, tasks, [task_tag(ref.label) for ref in tasks], {})
    assert mux.feeds == [None] * 5 and live_hub.listener_count == 0 and not mux.empty

    class StuckClient:
        """Takes two chunks, then never another."""

        _send = None  # no uvicorn cycle: nothing is written directly

        def __init__(self) -> None:
            self.chunks: list[bytes] = []
            self.stuck = asyncio.Event()

        async def send(self, chunk: bytes, more: bool = True) -> None:
            self.chunks.append(chunk)
            if len(self.chunks) >= 2:
                self.stuck.set()
                await asyncio.Event().wait()

    client = StuckClient()
    pump = asyncio.create_task(mux.pump(client, WriteStall(None, 30)))
    try:
        await asyncio.wait_for(client.stuck.wait(), TIMEOUT)
        assert [feed is not None for feed in mux.feeds] == [True, True, False, False, False]
        assert live_hub.listener_count <= 2
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        mux.close()
    assert live_hub.listener_count == 0
