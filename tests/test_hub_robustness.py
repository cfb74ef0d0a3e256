"""The hub's reader survives what Redis returns (issue 11): a malformed entry written by hand is
skipped and logged, live and in history reads, and a reader that fails anyway is restarted,
with ``/ready`` answering 503 while its subscriber is down.

The gateway tests run a real gateway subprocess on a real redis-server (marked ``system``);
the restart tests drive a hub on fakeredis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import httpx
import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.codec import MalformedEntry, SkipLog, Skipped, entry_frame, entry_frames
from streamcoord.gateway import Gateway as GatewayApp
from streamcoord.hub import Hub
from streamcoord.settings import Settings
from streamcoord.subscriber import PoolConnector

from .processes import Gateway
from .rawsse import RawSSE, SSEEvent
from .workloads import append_progress, check_in_order, gateway_stats, until

BROKEN = TaskRef("shop", "Job", "1")
HEALTHY = TaskRef("shop", "Job", "2")
GOOD = {b"epoch": b"e1", b"type": b"progress", b"data": b"{}"}
TIMEOUT = 10


def http(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(gateway.socket)), base_url="http://gateway", timeout=10
    )


async def events(client: RawSSE) -> list[SSEEvent]:
    return await asyncio.wait_for(client.events_until_end(), TIMEOUT)


# -- pure: entry_frame refuses, entry_frames skips --------------------------------------------


@pytest.mark.parametrize(
    ("entry_id", "fields", "kind"),
    [
        (b"2-0", {b"foo": b"bar"}, "no epoch field"),
        (b"2-0", {b"epoch": b"e1", b"data": b"{}"}, "no type field"),
        (b"2-0", {b"epoch": b"e1", b"type": b"progress"}, "no data field"),
        (b"x-0", GOOD, "id is not <sequence>-0"),
        (b"2-1", GOOD, "id is not <sequence>-0"),
        (b"0-1", GOOD, "id is not <sequence>-0"),
        (b"2-0", {**GOOD, b"epoch": b""}, "epoch is empty or not letters and digits"),
        (b"2-0", {**GOOD, b"epoch": b"e\n1"}, "epoch is empty or not letters and digits"),
        (b"2-0", {**GOOD, b"epoch": b"e-1"}, "epoch is empty or not letters and digits"),
        (b"2-0", {**GOOD, b"type": b""}, "type is empty or holds a line break or NUL"),
        (b"2-0", {**GOOD, b"type": b"a\rb"}, "type is empty or holds a line break or NUL"),
        (b"2-0", {**GOOD, b"type": b"a\0b"}, "type is empty or holds a line break or NUL"),
    ],
)
def test_entry_frame_refuses_a_malformed_entry(entry_id: bytes, fields: dict[bytes, bytes], kind: str) -> None:
    with pytest.raises(MalformedEntry) as refused:
        entry_frame(entry_id, fields)
    assert refused.value.kind == kind
    frames, skipped = entry_frames([(b"1-0", GOOD), (entry_id, fields), (b"3-0", GOOD)])
    assert [f.seq for f in frames] == [1, 3]
    assert skipped == [Skipped(entry_id, kind)]


def test_skip_log_names_each_kind_once_per_stream(caplog: pytest.LogCaptureFixture) -> None:
    skips = SkipLog()
    with caplog.at_level(logging.WARNING, "streamcoord.codec"):
        for _ in range(3):
            skips.report(b"sc:a", [Skipped(b"2-1", "no epoch field"), Skipped(b"2-2", "no epoch field")])
        skips.report("sc:a", [Skipped(b"2-3", "id is not <sequence>-0")])
        skips.report(b"sc:b", [Skipped(b"7-1", "no epoch field")])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "entry 2-1 of stream sc:a: no epoch field" in lines[0]
    assert "entry 2-3 of stream sc:a: id is not <sequence>-0" in lines[1]
    assert "entry 7-1 of stream sc:b: no epoch field" in lines[2]


# -- fakeredis: the hub's reader --------------------------------------------------------------


@pytest.fixture
async def fake_hub() -> AsyncIterator[Hub]:
    server = fakeredis.FakeServer()
    reader = fakeredis.FakeAsyncRedis(server=server, protocol=2)
    redis = fakeredis.FakeAsyncRedis(server=server)
    hub = Hub(PoolConnector(reader.connection_pool), redis, Settings(heartbeat_seconds=60, stream_auth="public"))
    yield hub
    await hub.stop()
    await reader.aclose()
    await redis.aclose()


async def test_a_malformed_entry_is_skipped_and_the_stream_goes_on(fake_hub: Hub) -> None:
    redis: Any = fake_hub._redis
    listener, _ = fake_hub.subscribe("sc:k", 0)
    fake_hub._dispatch(b"sc:k", [(b"1-0", GOOD), (b"1-1", {b"foo": b"bar"})])
    assert [f.seq for b in await listener.take() for f in b.frames] == [1]
    # The next read goes on after the skipped entry, not after the cursor (it would read the
    # skipped one again, forever).
    assert fake_hub._streams[b"sc:k"].next_read() == b"(1-1"
    fake_hub._dispatch(b"sc:k", [(b"1-2", {b"foo": b"bar"})])
    assert fake_hub._streams[b"sc:k"].next_read() == b"(1-2"
    fake_hub._dispatch(b"sc:k", [(b"2-0", GOOD)])
    assert fake_hub._streams[b"sc:k"].next_read() == b"(2-0"
    assert [f.seq for b in await listener.take() for f in b.frames] == [2]
    assert fake_hub.stats["skipped_entries"] == 2
    # And through the real subscription: once subscribed, the hub reads what it missed (after
    # the skipped entry) and delivers it.
    await redis.xadd("sc:k", {b"foo": b"bar"}, id="2-1")
    await redis.xadd("sc:k", GOOD, id="3-0")
    await redis.hset("sc:k:state", mapping={"epoch": "e1", "last_seq": 3})
    await fake_hub.start()
    batches = await asyncio.wait_for(listener.take(), TIMEOUT)
    assert [f.seq for b in batches for f in b.frames] == [3]
    assert fake_hub.reading


async def test_a_reader_that_fails_is_restarted_and_ready_says_so_meanwhile(
    fake_hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the subscriber's read loop drops its connection: it is logged with its
    traceback, ``/ready`` answers 503 until it is back, and the streams go on exactly."""
    app = GatewayApp(EventLog(fake_hub._redis, fake_hub._settings), fake_hub, fake_hub._settings)
    real = fake_hub.on_message
    failed, release = asyncio.Event(), asyncio.Event()
    calls = 0

    def fails_once(channel: bytes, message: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            failed.set()
            raise RuntimeError("a bug in the reader")
        real(channel, message)

    connector = fake_hub._subscriber.connector
    real_connect = connector.connect

    async def held_after_the_failure(node: str) -> Any:
        if failed.is_set():
            await release.wait()
        return await real_connect(node)

    monkeypatch.setattr(connector, "connect", held_after_the_failure)
    monkeypatch.setattr(fake_hub._subscriber, "sink", type("Sink", (), {
        "on_message": staticmethod(fails_once),
        "on_subscribed": staticmethod(fake_hub.on_subscribed),
        "on_lost": staticmethod(fake_hub.on_lost),
    })())
    assert not fake_hub.reading  # not started yet
    await fake_hub.start()
    await until(lambda: fake_hub.reading, TIMEOUT, "the subscriber to connect")
    assert (await app._ready())[0] == 200
    log = EventLog(fake_hub._redis, fake_hub._settings)
    listener, _ = fake_hub.subscribe(log.keys.events(BROKEN), 0)
    await until(lambda: fake_hub._streams[listener.key].buffer is None, TIMEOUT, "the stream to go live")
    await append_progress(log, BROKEN, 1, 1)
    await asyncio.wait_for(failed.wait(), TIMEOUT)
    await until(lambda: not fake_hub.reading, TIMEOUT, "the subscriber to drop its connection")
    status, _, body = await app._ready()
    assert (status, body) == (503, "hub reader down")
    release.set()
    await until(lambda: fake_hub.reading, TIMEOUT, "the subscriber to reconnect")
    assert (await app._ready())[0] == 200
    assert fake_hub.stats["link_drops"] == 1
    failure = [r for r in caplog.records if "subscriber connection to redis failed" in r.getMessage()]
    assert failure and failure[0].exc_info is not None  # with its traceback
    # The event whose message was lost is read from the stream, and what follows goes live.
    await append_progress(log, BROKEN, 2, 2, complete=True)
    seqs: list[int] = []
    while len(seqs) < 3:
        batches = await asyncio.wait_for(listener.take(), TIMEOUT)
        seqs += [f.seq for b in batches for f in b.frames]
    assert seqs == [1, 2, 3]


# -- a real gateway on a real redis-server ----------------------------------------------------


@pytest.mark.system
async def test_a_malformed_entry_freezes_nothing(gateway: Gateway, event_log: EventLog, redis: Redis, sse: Any) -> None:
    """Issue 11: two followed streams; a malformed entry XADDed by hand into one. Both go on.
    (Live events come by Pub/Sub, so the hub reads the stream, and meets the entries, only when
    it catches up: whether it logs them depends on timing; that it never stops does not.)"""
    await append_progress(event_log, BROKEN, 1, 1)
    await append_progress(event_log, HEALTHY, 1, 1)
    broken = await sse(gateway.socket, "/stream/Job/1")
    healthy = await sse(gateway.socket, "/stream/Job/2")
    for client in (broken, healthy):
        assert (await asyncio.wait_for(client.next_event(), TIMEOUT)).seq == 1
    key = event_log.keys.events(BROKEN)
    await redis.xadd(key, {"foo": "bar"}, id="1-1")  # the entry, where a writer leaves room
    await redis.xadd(key, {"epoch": "e\nx", "type": "progress", "data": "{}"}, id="1-2")
    await append_progress(event_log, HEALTHY, 2, 20, complete=True)
    await append_progress(event_log, BROKEN, 2, 20, complete=True)
    check_in_order(await events(healthy), 21, first=2)
    check_in_order(await events(broken), 21, first=2)
    log_text = gateway.log_text()
    skipped = [line for line in log_text.splitlines() if "skipped malformed entry" in line]
    assert len(skipped) <= 2 and all(f"1-1 of stream {key}: no epoch" in line or f"1-2 of stream {key}: epoch is empty" in line for line in skipped), log_text
    assert "Traceback" not in log_text, log_text
    async with http(gateway) as client:
        ready = await client.get("/ready")
        assert (ready.status_code, ready.text) == (200, "READY")
    assert (await gateway_stats(gateway))["streams"] == 0  # both clients are done


@pytest.mark.system
@pytest.mark.parametrize("window_events", [0, 5])
async def test_history_reads_skip_a_malformed_entry(
    gateway_factory: Any, event_log: EventLog, redis: Redis, sse: Any, window_events: int
) -> None:
    """A stream with malformed entries in its older history and in its tail: a client reading
    it from Redis (a page and the snapshot's tail) gets every good event, never a 500; and each
    kind is logged once however many clients read it."""
    gateway = gateway_factory(window_events=window_events)
    key = event_log.keys.events(BROKEN)
    await append_progress(event_log, BROKEN, 1, 3)
    await redis.xadd(key, {"foo": "bar"}, id="3-1")
    await append_progress(event_log, BROKEN, 4, 15)
    await redis.xadd(key, {"foo": "bar"}, id="15-1")
    await redis.xadd(key, {"epoch": "e1", "type": "bad type\n", "data": "{}"}, id="15-2")
    await append_progress(event_log, BROKEN, 16, 17, complete=True)
    epoch = (await redis.hget(event_log.keys.state(BROKEN), "epoch") or b"").decode()
    for after in (0, 0, 2):
        headers = {"Last-Event-ID": f"{epoch}-{after}"} if after else None
        client = await sse(gateway.socket, "/stream/Job/1", headers)
        assert client.status == 200
        check_in_order(await events(client), 18, first=after + 1)
    log_text = gateway.log_text()
    # The tail's entry 15-1 or the page's 3-1 (the same kind: whichever was read first).
    for line in (f"of stream {key}: no epoch field", f"entry 15-2 of stream {key}: type is empty"):
        assert log_text.count(line) == 1, log_text
    assert "Traceback" not in log_text, log_text
    async with http(gateway) as client:
        assert (await client.get("/ready")).status_code == 200
