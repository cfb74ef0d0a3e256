"""Our reasoning in Listener, Hub, the start of a feed and Feed, against fakeredis: the hub's
reader is never started; tests hand it read replies (XRANGE entries) through ``Hub._dispatch`` themselves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest

from streamcoord import history, resume, sse
from streamcoord.codec import Frame
from streamcoord.errors import UnknownTask
from streamcoord.eventlog import EventLog
from streamcoord.feed import Feed
from streamcoord.hub import Hub, Position
from streamcoord.ids import EventId
from streamcoord.keys import TaskRef
from streamcoord.listener import HEARTBEAT, REWIND, Batch, BatchKind, Listener, make_batch
from streamcoord.settings import Settings
from streamcoord.subscriber import PoolConnector
from streamcoord.window import Window

REF = TaskRef("shop", "Job", "1")
TIMEOUT = 2.0

# -- helpers -----------------------------------------------------------------------------------


def parse(raw: bytes) -> list[tuple[str, str, str]]:
    """SSE bytes -> (id, event, data) per frame; a comment frame is ("", ":", text)."""
    frames = []
    for block in raw.split(b"\n\n")[:-1]:
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(": ")
            fields[name or ":"] = value
        if ":" in fields:
            frames.append(("", ":", fields[":"]))
        else:
            frames.append((fields.get("id", ""), fields.get("event", ""), fields["data"]))
    return frames


def seqs(frames: list[tuple[str, str, str]]) -> list[int]:
    return [int(id_.rpartition("-")[2]) for id_, _, _ in frames if id_]


def entry(seq: int, epoch: bytes = b"e1", type_: bytes = b"progress", data: bytes = b"{}") -> Any:
    return (b"%d-0" % seq, {b"epoch": epoch, b"type": type_, b"data": data})


async def wait_until(condition: Callable[[], bool], state: Callable[[], object] = str) -> None:
    """Poll ``condition`` for up to TIMEOUT seconds; on failure show ``state()``."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting; state: {state()}")
        await asyncio.sleep(0.001)


class Client:
    """Iterates a feed in a task of its own, as the gateway does, collecting its chunks."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.chunks: list[bytes] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for chunk in self.feed.chunks():
                self.chunks.append(chunk)
        finally:
            self.feed.close()

    @property
    def frames(self) -> list[tuple[str, str, str]]:
        return parse(b"".join(self.chunks))

    async def wait_frames(self, count: int) -> list[tuple[str, str, str]]:
        await wait_until(lambda: len(self.frames) >= count, lambda: [i for i, _, _ in self.frames])
        return self.frames

    async def finished(self) -> list[tuple[str, str, str]]:
        await asyncio.wait_for(self.task, TIMEOUT)
        # Whole frames only. (An all-duplicates live batch yields b"": harmless, tolerated.)
        assert all(chunk.endswith(b"\n\n") for chunk in self.chunks if chunk)
        assert [f for c in self.chunks for f in parse(c)] == self.frames
        return self.frames

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
async def redis(server: fakeredis.FakeServer) -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


@pytest.fixture(params=[Settings().window_events, 0], ids=["window", "no-window"])
def settings(request: pytest.FixtureRequest) -> Settings:
    """Every feed test runs twice: with the hub's window of recent frames (feeds may start
    from memory) and without it (every feed reads Redis)."""
    return Settings(window_events=request.param)


@pytest.fixture
def log(redis: fakeredis.FakeAsyncRedis, settings: Settings) -> EventLog:
    return EventLog(redis, settings)


@pytest.fixture
async def hub(
    server: fakeredis.FakeServer, redis: fakeredis.FakeAsyncRedis, settings: Settings
) -> AsyncIterator[Hub]:
    yield Hub(PoolConnector(redis.connection_pool), redis, settings)  # never started: tests dispatch themselves


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        await client.stop()


async def publish(log: EventLog, *types: str) -> list[EventId]:
    writer = log.writer(REF)
    return [await writer.append(t, {"n": n}) for n, t in enumerate(types)]


async def dispatch(hub: Hub, log: EventLog, first: int, last: int) -> None:
    """Hand the hub events first..last as its catch-up read would, read from the stream itself."""
    key = log.keys.events(REF)
    entries = await log.redis.xrange(key, f"{first}-0", f"{last}-0")
    assert entries, "nothing to dispatch"
    hub._dispatch(key.encode(), entries)


async def open_client(log: EventLog, hub: Hub, clients: list[Client], **kwargs: Any) -> Client:
    feed = await asyncio.wait_for(Feed.open(log, hub, REF, **kwargs), TIMEOUT)
    client = Client(feed)
    clients.append(client)
    return client


# -- 1. Listener -------------------------------------------------------------------------------


def batch(*numbers: int) -> Batch:
    return make_batch([Frame(n, b"e1", False, b"data: %d\n\n" % n) for n in numbers])


def seqs_of(batches: list[Batch]) -> list[int]:
    return [f.seq for b in batches for f in b.frames]


async def test_listener_take_returns_all_queued_batches_in_order() -> None:
    listener = Listener(b"k", limit=10)
    listener.push(batch(1, 2))
    listener.push(batch(3))
    assert seqs_of(await asyncio.wait_for(listener.take(), TIMEOUT)) == [1, 2, 3]
    listener.push(batch(4))
    assert seqs_of(await asyncio.wait_for(listener.take(), TIMEOUT)) == [4]


async def test_listener_overflow_closes_it_and_cancels_its_task() -> None:
    listener = Listener(b"k", limit=3)
    listener.task = asyncio.create_task(asyncio.sleep(60))
    listener.push(batch(1, 2))
    listener.push(batch(3))  # now holding exactly ``limit`` untaken frames
    assert listener.closed is None
    listener.push(batch(4))
    assert listener.closed == "overflow"
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(listener.task, TIMEOUT)
    assert listener.task.cancelled()
    assert seqs_of(listener.batches) == [1, 2, 3]  # the overflowing batch is dropped


async def test_listener_accepts_a_burst_larger_than_its_limit() -> None:
    listener = Listener(b"k", limit=3)
    listener.push(batch(*range(1, 11)))  # empty queue: the bound is checked before appending
    assert listener.closed is None
    assert seqs_of(await listener.take()) == list(range(1, 11))
    listener.push(batch(11, 12))
    listener.push(batch(*range(13, 20)))  # 2 untaken < limit: accepted
    assert listener.closed is None
    assert listener.pending == 9


async def test_close_wakes_a_waiting_take() -> None:
    listener = Listener(b"k", limit=3)
    waiting = asyncio.create_task(listener.take())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    listener.close("shutdown")
    assert await asyncio.wait_for(waiting, TIMEOUT) == []
    assert listener.closed == "shutdown"
    listener.push(batch(1))  # ignored once closed
    assert await listener.take() == []


def test_a_batch_joins_its_frames_once_and_knows_its_range() -> None:
    made = make_batch([Frame(4, b"e1", False, b"a"), Frame(5, b"e1", True, b"b")])
    assert (made.kind, made.data, made.first, made.last, made.epoch, made.terminal) == (
        BatchKind.EVENTS, b"ab", 4, 5, b"e1", True,
    )
    mixed = make_batch([Frame(9, b"e1", False, b"a"), Frame(1, b"e2", False, b"b")])
    assert mixed.epoch == b""  # listeners take a batch spanning two epochs frame by frame


# -- 2. Hub ------------------------------------------------------------------------------------


async def test_subscribe_returns_the_hub_cursor(hub: Hub) -> None:
    first, cursor = hub.subscribe("sc:k", 4)
    assert cursor == 4  # a new key starts where its first listener is
    hub._dispatch(b"sc:k", [entry(5), entry(6), entry(7)])
    second, cursor = hub.subscribe("sc:k", 2)
    assert cursor == 7  # an existing key: the hub's own position
    _, cursor = hub.subscribe("sc:k", 9)
    assert cursor == 7
    assert (hub.stream_count, hub.listener_count) == (1, 3)
    assert first.key == second.key == b"sc:k"


async def test_dispatch_delivers_each_batch_once_encoded_once(hub: Hub) -> None:
    a, _ = hub.subscribe("sc:k", 0)
    b, _ = hub.subscribe("sc:k", 0)
    other, _ = hub.subscribe("sc:other", 0)
    hub._dispatch(b"sc:k", [entry(1), entry(2, type_=b"complete", data=b'{"x":1}')])
    hub._dispatch(b"sc:k", [entry(3)])
    got_a, got_b = await a.take(), await b.take()
    assert seqs_of(got_a) == seqs_of(got_b) == [1, 2, 3]
    assert [f.terminal for x in got_a for f in x.frames] == [False, True, False]
    assert got_a[0].frames[1].data == b'id: e1-2\nevent: complete\ndata: {"x":1}\n\n'
    assert got_a[0].data == b"".join(f.data for f in got_a[0].frames)
    assert all(x is y for x, y in zip(got_a, got_b, strict=True))  # one encoding for everyone
    assert not other.batches
    assert hub.stats["events"] == 3 and hub.stats["deliveries"] == 6
    _, cursor = hub.subscribe("sc:k", 0)
    assert cursor == 3


async def test_unsubscribing_the_last_listener_forgets_the_stream(hub: Hub) -> None:
    a, _ = hub.subscribe("sc:k", 0)
    b, _ = hub.subscribe("sc:k", 0)
    hub._dispatch(b"sc:k", [entry(1), entry(2)])
    hub.unsubscribe(a)
    assert a.closed == "unsubscribed"
    assert hub.stream_count == 1
    hub.unsubscribe(b)
    assert (hub.stream_count, hub.listener_count) == (0, 0)
    _, cursor = hub.subscribe("sc:k", 0)
    assert cursor == 0  # forgotten: a new listener starts the stream afresh


async def test_dispatch_for_an_unknown_key_is_ignored(hub: Hub) -> None:
    listener, _ = hub.subscribe("sc:k", 0)
    hub._dispatch(b"sc:gone", [entry(1)])
    assert not listener.batches
    assert hub.stream_count == 1
    assert hub.stats["events"] == 0


def test_heartbeats_and_rewinds_are_batches_of_their_own_kind_without_frames() -> None:
    assert (HEARTBEAT.kind, HEARTBEAT.data, HEARTBEAT.frames) == (BatchKind.HEARTBEAT, sse.HEARTBEAT, ())
    assert (REWIND.kind, REWIND.data, REWIND.frames) == (BatchKind.REWIND, b"", ())
    listener = Listener(b"k", limit=2)
    listener.push(HEARTBEAT)
    listener.push(REWIND)  # each counts as one against the bound
    listener.push(HEARTBEAT)
    assert listener.closed == "overflow"


async def test_the_hub_sends_heartbeats_to_every_listener(redis: fakeredis.FakeAsyncRedis) -> None:
    hub = Hub(PoolConnector(redis.connection_pool), redis, Settings(heartbeat_seconds=0.01))
    listener, _ = hub.subscribe("sc:k", 0)
    beating = asyncio.create_task(hub._heartbeat_forever())
    try:
        taken = await asyncio.wait_for(listener.take(), TIMEOUT)
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
    assert taken and all(x is HEARTBEAT for x in taken)


def test_a_position_read_from_redis_confirms_a_window_only_if_redis_holds_what_it_saw() -> None:
    window = Window(10, [Frame(n, b"e1", False, b"") for n in range(1, 6)])
    assert Position(b"e1", 5, window_last=5).confirms(window)
    assert Position(b"e1", 7, window_last=5).confirms(window)  # Redis is ahead of the hub: fine
    assert not Position(b"e1", 4, window_last=5).confirms(window)  # cut back under the hub
    assert not Position(b"e2", 9, window_last=5).confirms(window)  # created anew


# -- 3. Feed -----------------------------------------------------------------------------------


async def test_new_client_gets_history_then_live_until_the_terminal_event(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    ids = await publish(log, "start", "progress")
    client = await open_client(log, hub, clients)
    assert seqs(await client.wait_frames(2)) == [1, 2]
    await wait_until(lambda: hub.listener_count == 1)
    await log.writer(REF).append("progress", {"n": 3})
    await dispatch(hub, log, 3, 3)
    await client.wait_frames(3)
    await log.writer(REF).append("complete", {"n": 4})
    await dispatch(hub, log, 4, 4)
    got = await client.finished()
    epoch = ids[0].epoch
    assert [(i, e) for i, e, _ in got] == [
        (f"{epoch}-1", "start"),
        (f"{epoch}-2", "progress"),
        (f"{epoch}-3", "progress"),
        (f"{epoch}-4", "complete"),
    ]
    assert json.loads(got[3][2])["n"] == 4
    assert len(client.chunks) == 3  # history in one chunk, then one per live batch
    assert all(chunk.endswith(b"\n\n") for chunk in client.chunks)
    assert hub.listener_count == 0  # the feed let go of its listener


async def test_a_second_client_joins_a_hub_that_is_behind_redis(
    log: EventLog, hub: Hub, clients: list[Client], settings: Settings
) -> None:
    await publish(log, *["progress"] * 5)
    first = await open_client(log, hub, clients)
    await first.wait_frames(5)
    await wait_until(lambda: hub.listener_count == 1)
    await dispatch(hub, log, 1, 5)  # the first client already had them: skipped
    writer = log.writer(REF)
    for n in range(6, 9):
        await writer.append("progress", {"n": n})  # in Redis, not yet read by the hub
    second = await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 2)
    if settings.window_events:
        # Started from the hub's window, at the hub's position: 6..8 come with its next read.
        assert seqs(await second.wait_frames(5)) == [1, 2, 3, 4, 5]
        assert hub.stats["window_hits"] == 1
    else:  # read everything from Redis, ahead of the hub: what the hub sends next is skipped
        assert seqs(second.frames) == list(range(1, 9))
    await dispatch(hub, log, 6, 8)  # the hub catches up: the second client has them already
    await writer.append("complete", {})
    await dispatch(hub, log, 9, 9)
    assert seqs(await second.finished()) == list(range(1, 10))
    assert seqs(await first.finished()) == list(range(1, 10))


async def test_a_client_behind_the_hub_reads_the_difference_from_redis(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    await publish(log, *["progress"] * 3)
    first = await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 1)
    second_feed = await Feed.open(log, hub, REF)  # first page read now: events 1..3
    writer = log.writer(REF)
    for n in range(4, 9):
        await writer.append("progress", {"n": n})
    await dispatch(hub, log, 4, 8)  # hub cursor 8, past the second feed's page
    second = Client(second_feed)
    clients.append(second)
    await wait_until(lambda: hub.listener_count == 2)
    assert seqs(await second.wait_frames(8)) == list(range(1, 9))
    await dispatch(hub, log, 6, 8)  # duplicates from the hub are skipped by sequence
    await writer.append("complete", {})
    await dispatch(hub, log, 9, 9)
    assert seqs(await second.finished()) == list(range(1, 10))
    assert seqs(await first.finished()) == list(range(1, 10))


async def test_a_gap_in_live_frames_is_filled_from_redis(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    await publish(log, "start", "progress")
    client = await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 1)
    writer = log.writer(REF)
    for n in range(3, 6):
        await writer.append("progress", {"n": n})
    await dispatch(hub, log, 5, 5)  # seq last+3: 3 and 4 never came through the hub
    got = await client.wait_frames(5)
    assert seqs(got) == [1, 2, 3, 4, 5]
    assert [json.loads(d)["n"] for _, _, d in got[2:]] == [3, 4, 5]
    await writer.append("complete", {})
    await dispatch(hub, log, 6, 6)
    assert seqs(await client.finished()) == [1, 2, 3, 4, 5, 6]


async def test_an_epoch_change_resets_the_client_and_starts_the_new_stream(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    old = await publish(log, "start", "progress", "progress")
    client = await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 1)
    await log.redis.delete(log.keys.events(REF))  # as a Redis restart without persistence
    writer = log.writer(REF)
    await writer.append("progress", {"n": 1})  # no stream: a new epoch, from seq 1
    new_epoch = writer.epoch
    assert new_epoch != old[0].epoch
    for n in range(2, 5):
        await writer.append("progress", {"n": n})
    # The hub read on from its old cursor (3), so the first frame it sees is the new seq 4.
    await dispatch(hub, log, 4, 4)
    got = await client.wait_frames(3 + 1 + 4)
    assert [i for i, _, _ in got[:3]] == [str(i) for i in old]
    assert got[3][1] == "reset"
    assert json.loads(got[3][2])["reason"] == "epoch"
    assert [i for i, _, _ in got[4:]] == [f"{new_epoch}-{n}" for n in range(1, 5)]
    await writer.append("complete", {})
    await dispatch(hub, log, 5, 5)
    assert (await client.finished())[-1][:2] == (f"{new_epoch}-5", "complete")


async def test_resuming_from_the_terminal_event_sends_nothing(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    ids = await publish(log, "start", "complete")
    client = await open_client(log, hub, clients, last_id=ids[-1])
    assert client.feed.empty
    assert await client.finished() == []
    assert client.chunks == []
    assert hub.listener_count == 0 and hub.stream_count == 0


async def test_resuming_from_a_foreign_epoch_resets_then_sends_everything(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    ids = await publish(log, "start", "progress", "complete")
    client = await open_client(log, hub, clients, last_id=EventId("ffff0000", 2))
    got = await client.finished()
    reset = json.loads(got[0][2])
    assert (got[0][1], reset["reason"], reset["epoch"]) == ("reset", "epoch", ids[0].epoch)
    assert [i for i, _, _ in got[1:]] == [str(i) for i in ids]


async def test_latest_sends_only_the_latest_event_first(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    ids = await publish(log, "start", "progress", "progress")
    client = await open_client(log, hub, clients, latest=True)
    assert [i for i, _, _ in await client.wait_frames(1)] == [str(ids[2])]
    await wait_until(lambda: hub.listener_count == 1)
    await log.writer(REF).append("complete", {})
    await dispatch(hub, log, 1, 4)  # the hub may hand over older ones too: skipped
    assert seqs(await client.finished()) == [3, 4]


async def test_an_unknown_task_does_not_open(log: EventLog, hub: Hub) -> None:
    with pytest.raises(UnknownTask):
        await Feed.open(log, hub, REF)
    assert hub.stream_count == 0


async def test_a_declared_task_without_events_opens_and_waits(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    await log.declare(REF)
    client = await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 1)
    assert client.chunks == []
    await publish(log, "start", "complete")
    await dispatch(hub, log, 1, 2)
    assert [e for _, e, _ in await client.finished()] == ["start", "complete"]


async def test_an_expired_stream_sends_reset_then_the_outcome(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    ids = await publish(log, "start", "error")
    stored = await log.state(REF)
    assert stored is not None
    await log.redis.delete(log.keys.events(REF))
    client = await open_client(log, hub, clients)
    assert client.feed.ended and not client.feed.empty  # the outcome is still to be sent
    got = await client.finished()
    assert [e for _, e, _ in got] == ["reset", "error"]
    assert json.loads(got[0][2])["reason"] == "expired"
    assert got[1] == (str(ids[1]), "error", stored.end_data.decode())
    assert json.loads(got[1][2])["n"] == 1
    assert hub.stream_count == 0


async def test_a_rewind_resets_the_client_then_sends_the_stream_from_its_start(
    log: EventLog, hub: Hub, clients: list[Client]
) -> None:
    """Redis lost events under a connected client (the hub found out and rewound its cursor):
    reset ``lost``, then the stream from sequence 1, as Redis now holds it."""
    old = await publish(log, "start", "progress")
    client = await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 1)
    assert seqs(await client.wait_frames(2)) == [1, 2]
    await log.redis.delete(log.keys.events(REF), log.keys.state(REF))
    new = await publish(log, "start", "complete")
    for listener in hub._streams[log.keys.events(REF).encode()].listeners:
        listener.push(REWIND)
    await dispatch(hub, log, 1, 2)
    got = await client.finished()
    reset = json.loads(got[2][2])
    assert (got[2][1], reset["reason"], reset["epoch"]) == ("reset", "lost", old[0].epoch)
    assert [i for i, _, _ in got[3:]] == [str(i) for i in new]


async def test_revalidate_rewinds_a_stream_created_anew_under_a_history_only_listener(
    log: EventLog, hub: Hub, redis: fakeredis.FakeAsyncRedis, clients: list[Client]
) -> None:
    """The client read 1..3 from history alone (the hub never dispatched an entry); Redis then
    lost the stream and a new run ended exactly at seq 3: only the epoch tells them apart."""
    await publish(log, "progress", "progress", "progress")
    client = await open_client(log, hub, clients)
    await wait_until(lambda: hub.stream_count == 1)
    await redis.delete(log.keys.events(REF), log.keys.state(REF))
    await publish(log, "progress", "progress", "complete")
    key = log.keys.events(REF).encode()
    await hub._revalidate()
    assert hub._streams[key].cursor == 0
    await dispatch(hub, log, 1, 3)  # what the hub's catch-up read returns from the rewound cursor
    await asyncio.wait_for(client.task, TIMEOUT)
    received = parse(b"".join(client.chunks))
    assert [event for _, event, _ in received] == ["progress"] * 3 + ["reset", "progress", "progress", "complete"]


# -- 4. The window and shared reads --------------------------------------------------------------


async def test_a_resume_within_the_window_starts_from_memory_without_reading_history(
    log: EventLog, hub: Hub, clients: list[Client], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the window, no snapshot or page of history is read (only the small HMGET that
    confirms the window); without it, the feed reads its snapshot."""
    ids = await publish(log, *["progress"] * 6)
    await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 1)
    reads: list[str] = []
    monkeypatch.setattr(log.redis, "pipeline", lambda *a, **k: reads.append("pipeline"))
    monkeypatch.setattr(log.redis, "xrange", lambda *a, **k: reads.append("xrange"))
    if not settings.window_events:
        with pytest.raises(AttributeError):  # it tried to read: the patched pipeline gave None
            await Feed.open(log, hub, REF, last_id=ids[2])
        assert reads == ["pipeline"]
        return
    resumed = await open_client(log, hub, clients, last_id=ids[2])
    latest = await open_client(log, hub, clients, latest=True)
    everything = await open_client(log, hub, clients)
    assert seqs(await resumed.wait_frames(3)) == [4, 5, 6]
    assert seqs(await latest.wait_frames(1)) == [6]
    assert seqs(await everything.wait_frames(6)) == [1, 2, 3, 4, 5, 6]
    assert reads == [] and hub.stats["window_hits"] == 3 and hub.listener_count == 4
    monkeypatch.undo()
    # From memory, then live like any other client.
    await log.writer(REF).append("complete", {})
    await dispatch(hub, log, 7, 7)
    assert seqs(await resumed.finished()) == [4, 5, 6, 7]
    assert seqs(await everything.finished()) == list(range(1, 8))


async def test_a_resume_before_the_window_reads_the_rest_from_redis(
    log: EventLog, redis: fakeredis.FakeAsyncRedis, server: fakeredis.FakeServer, clients: list[Client]
) -> None:
    small = Settings(window_events=3)
    log = EventLog(redis, small)
    hub = Hub(PoolConnector(redis.connection_pool), redis, small)
    ids = await publish(log, *["progress"] * 8)
    await open_client(log, hub, clients)  # seeds the window with the stream's tail: 6..8
    await wait_until(lambda: hub.listener_count == 1)
    resumed = await open_client(log, hub, clients, last_id=ids[1])
    assert seqs(await resumed.wait_frames(6)) == [3, 4, 5, 6, 7, 8]
    assert hub.stats["window_hits"] == 0


async def test_feeds_opening_together_share_one_read(
    log: EventLog, hub: Hub, clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await publish(log, *["progress"] * 20)
    calls = 0
    real = resume.read_snapshot

    async def counted(log: EventLog, ref: TaskRef) -> resume.Snapshot:
        nonlocal calls
        calls += 1
        return await real(log, ref)

    monkeypatch.setattr(resume, "read_snapshot", counted)
    opens = [Feed.open(log, hub, REF, last_id=ids[n % 20]) for n in range(50)]
    feeds = await asyncio.wait_for(asyncio.gather(*opens), TIMEOUT)
    assert calls == 1
    clients.extend(Client(feed) for feed in feeds)
    for n, client in enumerate(clients):
        want = list(range(n % 20 + 2, 21))
        got = await client.wait_frames(len(want))
        assert seqs(got) == want and len(got) == len(want)  # no reset: each goes on where it was


async def test_a_shared_read_older_than_the_client_is_checked_with_a_read_of_its_own(
    log: EventLog, hub: Hub, clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A feed that joins a read in flight may know a newer event than that read saw (from
    another gateway): the stale read must not make it reset the client ("position")."""
    ids = await publish(log, *["progress"] * 5)
    gate = asyncio.Event()
    real = resume.read_snapshot
    calls = 0

    async def slow_first(log: EventLog, ref: TaskRef) -> resume.Snapshot:
        nonlocal calls
        calls += 1
        snapshot = await real(log, ref)
        if calls == 1:
            await gate.wait()  # returns what Redis held before event 6
        return snapshot

    monkeypatch.setattr(resume, "read_snapshot", slow_first)
    leader = asyncio.create_task(Feed.open(log, hub, REF, last_id=ids[1]))
    await wait_until(lambda: calls == 1)
    sixth = await log.writer(REF).append("progress", {"n": 6})
    follower = asyncio.create_task(Feed.open(log, hub, REF, last_id=sixth))
    await asyncio.sleep(0.01)
    gate.set()
    first, second = await asyncio.wait_for(asyncio.gather(leader, follower), TIMEOUT)
    assert calls == 2  # the shared read, then the follower's own
    clients.extend([Client(first), Client(second)])
    assert [e for _, e, _ in await clients[0].wait_frames(3)] == ["progress"] * 3  # no reset
    assert seqs(clients[0].frames) == [3, 4, 5]
    await wait_until(lambda: hub.listener_count == 2)
    await dispatch(hub, log, 6, 6)
    assert seqs(await clients[0].wait_frames(4)) == [3, 4, 5, 6]
    await log.writer(REF).append("complete", {})
    await dispatch(hub, log, 7, 7)
    assert [(i.rpartition("-")[2], e) for i, e, _ in await clients[1].finished()] == [("7", "complete")]


async def test_a_window_of_a_stream_created_anew_is_not_served(
    log: EventLog, hub: Hub, redis: fakeredis.FakeAsyncRedis, clients: list[Client]
) -> None:
    """Redis lost the stream (evicted, failed over) and a writer started it under a new epoch
    before the hub read past its old position: the hub's window holds events that no longer
    exist. New clients must get the stream Redis holds, and a resume from the old epoch a reset."""
    old = await publish(log, "start", "progress", "progress")
    await open_client(log, hub, clients)
    await wait_until(lambda: hub.listener_count == 1)
    await dispatch(hub, log, 1, 3)  # the window holds e1 1..3
    await redis.delete(log.keys.events(REF))
    new = await log.writer(REF).append("progress", {"n": 1})
    assert new.epoch != old[0].epoch
    fresh = await open_client(log, hub, clients)
    resumed = await open_client(log, hub, clients, last_id=old[-1])
    assert [i for i, _, _ in await fresh.wait_frames(1)] == [str(new)]
    got = await resumed.wait_frames(2)
    assert (got[0][1], json.loads(got[0][2])["reason"]) == ("reset", "epoch")
    assert got[1][0] == str(new)
    assert hub.stats["window_hits"] == 0
    assert hub._revalidate_now == bool(hub._settings.window_events)  # the hub checks at once


async def test_a_shared_read_cannot_tell_a_client_the_task_ended_once_a_new_run_began(
    log: EventLog, hub: Hub, redis: fakeredis.FakeAsyncRedis, clients: list[Client],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream expired with the outcome kept in the state record; a read of that is in
    flight when the task runs again. A feed joining that read must not send the old outcome."""
    await publish(log, "start", "error")
    await redis.delete(log.keys.events(REF))
    gate, calls, real = asyncio.Event(), 0, resume.read_snapshot

    async def slow_first(log: EventLog, ref: TaskRef) -> resume.Snapshot:
        nonlocal calls
        calls += 1
        snapshot = await real(log, ref)
        if calls == 1:
            await gate.wait()
        return snapshot

    monkeypatch.setattr(resume, "read_snapshot", slow_first)
    leader = asyncio.create_task(Feed.open(log, hub, REF))
    await wait_until(lambda: calls == 1)
    await redis.hset(log.keys.state(REF), "state", "running")  # a new run ...
    new = await log.writer(REF).append("start", {"n": 0})  # ... writes its first event
    follower = asyncio.create_task(Feed.open(log, hub, REF))
    await asyncio.sleep(0.01)
    gate.set()
    first, second = await asyncio.wait_for(asyncio.gather(leader, follower), TIMEOUT)
    assert calls == 2 and first.ended and not second.ended
    clients.append(Client(second))
    assert [(i, e) for i, e, _ in await clients[0].wait_frames(1)] == [(str(new), "start")]


async def test_history_trimmed_between_two_page_reads_is_told_with_a_reset(
    redis: fakeredis.FakeAsyncRedis, hub: Hub, clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client reads a long history page by page while the stream is trimmed under it: the
    events it had not read yet are gone, and it is told so instead of seeing a silent gap."""
    monkeypatch.setattr(history, "HISTORY_PAGE", 2)
    log = EventLog(redis, Settings(window_events=0))  # so the tail read holds event 9 only
    await publish(log, *["progress"] * 9)
    feed = await Feed.open(log, hub, REF)  # first page read: 1, 2
    await redis.xtrim(log.keys.events(REF), maxlen=3, approximate=False)  # 3..6 go now
    client = Client(feed)
    clients.append(client)
    await client.wait_frames(6)
    got = client.frames
    assert [i.rpartition("-")[2] or e for i, e, _ in got] == ["1", "2", "reset", "7", "8", "9"]
    assert json.loads(got[2][2])["reason"] == "trimmed"
