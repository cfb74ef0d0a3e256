"""What one client may hold of a gateway (issue 11): its queue bounded in bytes as well as
frames, history included, and a connection that takes no bytes for ``write_stall_seconds`` cut.

The unit tests check the accounting (Listener, WriteStall, the byte-sized history) without
processes; the system tests run real gateway subprocesses on a real redis-server, with clients
that truly never read: plain sockets with a small receive buffer (an asyncio stream would read
ahead into a buffer of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from streamcoord import EventLog, TaskRef
from streamcoord.codec import Frame
from streamcoord.feed import CHUNK_BYTES, Feed
from streamcoord.history import History
from streamcoord.hub import Hub, Position
from streamcoord.ids import EventId
from streamcoord.listener import HEARTBEAT, REWIND, Batch, Listener, make_batch
from streamcoord.resume import read_snapshot
from streamcoord.settings import Settings
from streamcoord.stall import WriteStall, unsent_bytes
from streamcoord.subscriber import PoolConnector
from streamcoord.window import frames_bytes, history_bytes, newest_within, runs_within

from .processes import Gateway
from .rawsse import SSEEvent
from .workloads import gateway_stats

JOB = TaskRef("shop", "Job", "1")
PATH = "/stream/Job/1"
TIMEOUT = 10.0


def frame(seq: int, size: int = 10) -> Frame:
    data = b"id: e1-%d\ndata: " % seq
    return Frame(seq, b"e1", False, data + b"x" * max(size - len(data) - 2, 0) + b"\n\n")


def batch(*seqs: int, size: int = 10) -> Batch:
    return make_batch([frame(n, size) for n in seqs])


# -- Listener: bytes, checked like frames -------------------------------------------------------


async def test_a_listener_past_its_byte_bound_is_cut_long_before_its_frame_bound() -> None:
    listener = Listener(b"k", limit=1000, limit_bytes=100)
    listener.task = asyncio.create_task(asyncio.sleep(60))
    for n in range(1, 4):
        listener.push(batch(n, size=40))
    assert (listener.closed, listener.pending, listener.pending_bytes) == (None, 3, 120)
    listener.push(batch(4, size=40))  # 120 untaken bytes >= 100: not keeping up
    assert listener.closed == "overflow"
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(listener.task, TIMEOUT)
    assert [b.first for b in listener.batches] == [1, 2, 3]  # the overflowing batch is dropped


async def test_the_byte_bound_is_checked_before_appending_and_reset_by_take() -> None:
    listener = Listener(b"k", limit=1000, limit_bytes=100)
    listener.push(batch(*range(1, 11), size=50))  # 500 bytes into an empty queue: accepted
    assert listener.closed is None and listener.pending_bytes == 500
    assert len(await asyncio.wait_for(listener.take(), TIMEOUT)) == 1
    assert listener.pending_bytes == 0
    listener.push(batch(11, size=99))
    listener.push(batch(12, size=50))  # 99 < 100 untaken: accepted
    assert listener.closed is None and listener.pending_bytes == 149


def test_heartbeats_count_their_bytes_and_a_rewind_none() -> None:
    listener = Listener(b"k", limit=1000, limit_bytes=2 * len(HEARTBEAT.data))
    listener.push(REWIND)
    assert listener.pending_bytes == 0
    listener.push(HEARTBEAT)
    listener.push(HEARTBEAT)
    assert listener.pending_bytes == 2 * len(HEARTBEAT.data)
    listener.push(HEARTBEAT)
    assert listener.closed == "overflow"


async def test_history_held_counts_against_the_bound_and_outlives_a_take() -> None:
    listener = Listener(b"k", limit=1000, limit_bytes=100)
    listener.hold(80)
    listener.push(batch(1, size=30))  # 80 held < 100: accepted
    assert listener.pending_bytes == 110
    await asyncio.wait_for(listener.take(), TIMEOUT)
    assert listener.pending_bytes == 80  # what the feed still holds is not taken
    listener.hold(-80)
    listener.push(batch(2, size=30))
    listener.push(batch(3, size=30))
    assert listener.closed is None and listener.pending_bytes == 60
    listener.hold(50)
    listener.push(batch(4, size=30))  # 110 >= 100
    assert listener.closed == "overflow"


def test_a_listener_without_a_byte_bound_counts_frames_only() -> None:
    listener = Listener(b"k", limit=2)
    listener.push(batch(1, size=10_000_000))
    listener.push(batch(2, size=10_000_000))
    assert listener.closed is None
    listener.push(batch(3))
    assert listener.closed == "overflow"


# -- WriteStall: no bytes taken for ``seconds`` -------------------------------------------------


class Buffer:
    """A transport's write buffer, as WriteStall reads it (no socket: no kernel buffer)."""

    def __init__(self) -> None:
        self.size = 0

    def get_write_buffer_size(self) -> int:
        return self.size

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def test_a_connection_that_takes_nothing_stalls_after_its_seconds_not_before() -> None:
    buffer = Buffer()
    stall = WriteStall(buffer, 3.0)
    stall.written, buffer.size = 5000, 3000  # 2000 bytes left for the client, 3000 wait
    assert not stall.check(100.0)  # progress: the first look
    assert not stall.check(101.0)
    assert not stall.check(102.9)
    assert stall.check(103.0)


def test_bytes_leaving_the_buffer_are_progress_even_while_more_is_written() -> None:
    buffer = Buffer()
    stall = WriteStall(buffer, 3.0)
    stall.written, buffer.size = 5000, 3000
    stall.check(100.0)
    stall.written, buffer.size = 9000, 6500  # 4000 more written, 500 more taken
    assert not stall.check(102.5)
    assert not stall.check(105.0)  # 2.5 s since the 500 bytes left
    assert stall.check(105.5)


def test_more_written_without_any_taken_is_no_progress() -> None:
    buffer = Buffer()
    stall = WriteStall(buffer, 3.0)
    stall.written, buffer.size = 100, 100  # nothing taken at all yet (the head waits too)
    stall.check(100.0)
    stall.written, buffer.size = 150, 154  # a heartbeat written, with its chunk framing
    assert not stall.check(102.0)
    assert stall.check(103.0)


def test_an_empty_buffer_is_never_a_stall() -> None:
    buffer = Buffer()
    stall = WriteStall(buffer, 3.0)
    stall.written = 10_000  # all of it went to the kernel: nothing waits here
    for now in (100.0, 110.0, 1000.0):
        assert not stall.check(now)


def test_unsent_bytes_are_what_the_peer_has_not_read_yet() -> None:
    here, peer = socket.socketpair()
    with here, peer:
        assert unsent_bytes(here.fileno()) == 0
        here.sendall(b"x" * 1000)
        assert unsent_bytes(here.fileno()) >= 1000  # a unix socket counts memory: a bit more
        assert peer.recv(2000) == b"x" * 1000
        assert unsent_bytes(here.fileno()) == 0
    assert unsent_bytes(-1) == 0


async def test_the_timer_calls_on_stall_once_and_never_before_its_seconds() -> None:
    buffer = Buffer()
    buffer.size = 10
    stall = WriteStall(buffer, 0.2)
    loop = asyncio.get_running_loop()
    stalled = loop.create_future()
    started = loop.time()
    stall.start(lambda: stalled.set_result(loop.time()))
    try:
        assert await asyncio.wait_for(stalled, TIMEOUT) - started >= 0.2
        assert stall.stalled
    finally:
        stall.stop()


async def test_a_stall_without_a_transport_does_nothing() -> None:
    stall = WriteStall(None, 0.01)
    stall.start(lambda: pytest.fail("no transport: nothing to watch"))
    await asyncio.sleep(0.05)
    assert not stall.stalled
    stall.stop()


# -- history in memory, in bytes ----------------------------------------------------------------


def test_newest_within_keeps_the_newest_frames_that_fit_and_at_least_one() -> None:
    frames = [frame(n, 100) for n in range(1, 11)]
    assert [f.seq for f in newest_within(frames, 350)] == [8, 9, 10]
    assert newest_within(frames, 10_000) is frames
    assert [f.seq for f in newest_within(frames, 5)] == [10]
    assert newest_within([], 5) == []


def test_runs_within_cuts_in_order_and_a_big_frame_goes_alone() -> None:
    frames = [frame(1, 40), frame(2, 40), frame(3, 500), frame(4, 40), frame(5, 40), frame(6, 40)]
    runs = [[f.seq for f in run] for run in runs_within(frames, 100)]
    assert runs == [[1, 2], [3], [4, 5], [6]]
    assert [[f.seq for f in run] for run in runs_within(frames, 100, used=30)] == [[1], [2], [3], [4, 5], [6]]
    assert [[f.seq for f in run] for run in runs_within(frames[2:], 100, used=30)] == [[], [3], [4, 5], [6]]
    assert list(runs_within([], 100)) == []


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
async def fake(server: fakeredis.FakeServer) -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


SMALL = Settings(client_queue_bytes=16 * 1024)  # a client's history: 8 KiB at once


async def big_events(log: EventLog, count: int, pad: int = 2000) -> None:
    writer = log.writer(JOB)
    for n in range(1, count + 1):
        await writer.append("progress", {"n": n, "pad": "x" * pad})


async def test_the_snapshot_tail_and_history_pages_are_sized_in_bytes(fake: fakeredis.FakeAsyncRedis) -> None:
    log = EventLog(fake, SMALL)
    await big_events(log, 40)
    snapshot = await read_snapshot(log, JOB)
    assert snapshot.tail[-1].seq == 40
    assert frames_bytes(snapshot.tail) <= history_bytes(SMALL) // 2 < frames_bytes(snapshot.tail) + 2100
    hub = Hub(PoolConnector(fake.connection_pool), fake, SMALL)
    history = History(log, hub, JOB, snapshot.tail)
    assert history.page_size == history_bytes(SMALL) // 2 // len(snapshot.tail[0].data)
    page = await history.page(0)
    assert [f.seq for f in page] == list(range(1, history.page_size + 1))
    assert frames_bytes(page) <= history_bytes(SMALL) // 2


async def test_history_goes_out_in_chunks_of_bounded_bytes_and_complete(
    fake: fakeredis.FakeAsyncRedis,
) -> None:
    log = EventLog(fake, SMALL)
    await big_events(log, 100, pad=20_000)  # ~2 MB of history, pages of one frame or two
    await log.writer(JOB).append("complete", {})
    hub = Hub(PoolConnector(fake.connection_pool), fake, SMALL)
    feed = await Feed.open(log, hub, JOB)
    chunks = [chunk async for chunk in feed.chunks()]
    assert all(len(c) <= CHUNK_BYTES or c.count(b"\nid: ") == 0 for c in chunks)
    ids = [line for c in chunks for line in c.split(b"\n") if line.startswith(b"id: ")]
    assert [int(i.rpartition(b"-")[2]) for i in ids] == list(range(1, 102))
    assert feed.ended


async def test_a_window_start_bigger_than_a_clients_history_reads_redis_instead(
    fake: fakeredis.FakeAsyncRedis,
) -> None:
    hub = Hub(PoolConnector(fake.connection_pool), fake, SMALL)
    follower, _ = hub.subscribe("sc:k", 0)
    entries = [(b"%d-0" % n, {b"epoch": b"e1", b"type": b"progress", b"data": b"x" * 1000}) for n in range(1, 21)]
    hub._dispatch(b"sc:k", entries)  # a window of 20 frames of ~1 KB: 20 KB > 8 KB
    confirmed = Position(b"e1", 20, 20)
    assert hub.attach("sc:k", None, False, confirmed) is None  # the whole stream: too much
    attached = hub.attach("sc:k", EventId("e1", 17), False, confirmed)
    assert attached is not None
    listener, frames = attached
    assert [f.seq for f in frames] == [18, 19, 20]
    assert listener.limit_bytes == SMALL.client_queue_bytes
    assert follower.limit_bytes == SMALL.client_queue_bytes


async def test_history_from_the_window_counts_against_the_listener_until_sent(
    fake: fakeredis.FakeAsyncRedis,
) -> None:
    settings = Settings(client_queue_bytes=512 * 1024)
    log = EventLog(fake, settings)
    await big_events(log, 60, pad=3000)
    hub = Hub(PoolConnector(fake.connection_pool), fake, settings)
    key = log.keys.events(JOB)
    entries: Any = await fake.xrange(key)
    hub.subscribe(key, 0)
    hub._dispatch(key.encode(), entries)  # the hub follows the stream: its window holds all 60
    feed = await Feed.open(log, hub, JOB)
    assert feed.listener is not None and hub.stats["window_hits"] == 1
    total = frames_bytes(hub._streams[key.encode()].window.frames)
    assert total > 2 * CHUNK_BYTES
    chunks = feed.history()
    first = await anext(chunks)  # the rest is held still, and counts
    assert feed.listener.held_bytes == feed.listener.pending_bytes == total - len(first)
    second = await anext(chunks)
    assert feed.listener.held_bytes == feed.listener.pending_bytes == total - len(first) - len(second)
    rest = [chunk async for chunk in chunks]
    assert feed.listener.held_bytes == feed.listener.pending_bytes == 0
    assert all(len(c) <= CHUNK_BYTES for c in [first, second, *rest])
    assert sum(map(len, [first, second, *rest])) == total
    feed.close()


# -- real gateways -----------------------------------------------------------------------------


class Stuck:
    """A client that sends its request and never reads: a plain socket with a small receive
    buffer, so what the gateway writes stays in the gateway once the kernel's buffers fill."""

    def __init__(self, path: Path, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        lines = [f"GET {PATH} HTTP/1.1", "Host: gateway", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.opened = time.monotonic()
        #: When ``cut`` first saw the connection closed.
        self.cut_at: float | None = None

    @property
    def cut(self) -> bool:
        """The gateway closed the connection (whatever is still unread in it)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        if self.cut_at is None and poller.poll(0):
            self.cut_at = time.monotonic()
        return self.cut_at is not None

    @property
    def open_for(self) -> float:
        """Seconds from connecting to being seen cut."""
        assert self.cut_at is not None
        return self.cut_at - self.opened

    def peek(self) -> bytes:
        """What arrived so far, left unread."""
        try:
            return self.sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""

    def drain(self) -> bytes:
        """Everything the connection still holds, up to its end (once cut)."""
        received = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.sock.recv(1 << 20):
                received.append(chunk)
        return b"".join(received)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stuck() -> Iterator[Any]:
    opened: list[Stuck] = []

    def open_stuck(path: Path, headers: dict[str, str] | None = None) -> Stuck:
        client = Stuck(path, headers)
        opened.append(client)
        return client

    yield open_stuck
    for client in opened:
        client.close()


async def until(predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def event_ids(raw: bytes) -> list[str]:
    """The ids of the complete events in a raw response, read up to where it was cut (the
    gateway writes whole frames per chunk: a complete chunk ends at a frame's end)."""
    _, _, body = raw.partition(b"\r\n\r\n")
    data = []
    while True:
        size_line, found, rest = body.partition(b"\r\n")
        if not found or not size_line or int(size_line, 16) == 0 or len(rest) < int(size_line, 16) + 2:
            break
        size = int(size_line, 16)
        data.append(rest[:size])
        body = rest[size + 2:]
    blocks = b"".join(data).split(b"\n\n")[:-1]
    return [line[4:].decode() for block in blocks for line in block.split(b"\n") if line.startswith(b"id: ")]


def seqs(events: list[SSEEvent]) -> list[int]:
    return [e.seq for e in events]


@pytest.mark.system
async def test_twenty_non_readers_of_a_long_history_are_cut_and_memory_comes_back(
    sse: Any, stuck: Any, gateway_factory: Any, event_log: EventLog
) -> None:
    writer = event_log.writer(JOB)
    for n in range(1, 10_001):  # a realistic few hundred bytes each
        await writer.append("progress", {"n": n, "note": "y" * 300})
    gateway: Gateway = gateway_factory(write_stall_seconds=3)
    warm = await sse(gateway.socket, PATH)  # warm-up: the whole history once
    for _ in range(10_000):
        assert await asyncio.wait_for(warm.next_event(), TIMEOUT) is not None
    warm.close()
    for _ in range(100):  # until the gateway let go of it
        if (await gateway_stats(gateway))["listeners"] == 0:
            break
        await asyncio.sleep(0.05)
    baseline = rss_mb(gateway.pid)

    clients = [stuck(gateway.socket) for _ in range(20)]
    reader = await sse(gateway.socket, PATH)
    received = asyncio.create_task(reader.events_until_end())
    for n in range(10_001, 10_201):  # live events meanwhile
        await writer.append("progress", {"n": n, "note": "y" * 300})
    await until(lambda: all([c.cut for c in clients]), 30, "all 20 non-readers cut")  # each seen
    assert min(c.open_for for c in clients) >= 3  # the write stall, not sooner
    stats = await gateway_stats(gateway)
    assert stats["closed_stall"] == 20 and "closed_overflow" not in stats
    await writer.append("complete", {})
    events = await asyncio.wait_for(received, 30)
    assert seqs(events) == list(range(1, 10_202))

    await until(lambda: rss_mb(gateway.pid) <= baseline + 20, 15, f"RSS back near {baseline:.0f} MB")

    ids = event_ids(clients[0].drain())
    assert ids and int(ids[-1].rpartition("-")[2]) < 10_000  # it got a part of the history only
    assert [int(i.rpartition("-")[2]) for i in ids] == list(range(1, len(ids) + 1))
    resumed = await sse(gateway.socket, PATH, {"Last-Event-ID": ids[-1]})
    rest = await asyncio.wait_for(resumed.events_until_end(), 30)
    assert seqs(rest) == list(range(len(ids) + 1, 10_202))
    assert rest[-1].event == "complete"


@pytest.mark.system
async def test_a_non_reader_of_big_live_frames_is_cut_by_bytes_before_its_frame_bound(
    sse: Any, stuck: Any, gateway_factory: Any, event_log: EventLog
) -> None:
    # No stall cut within the test; 400 events < client_queue_size (1000) frames.
    gateway: Gateway = gateway_factory(
        client_queue_bytes=256 * 1024, write_stall_seconds=600, heartbeat_seconds=0.2
    )
    await event_log.declare(JOB)
    client = stuck(gateway.socket)
    reader = await sse(gateway.socket, PATH)
    received = asyncio.create_task(reader.events_until_end())
    # Heartbeats go to listeners only: once one arrived, the non-reader listens to live events.
    await until(lambda: b"heartbeat" in client.peek(), TIMEOUT, "the non-reader to listen")
    writer = event_log.writer(JOB)
    for n in range(1, 401):
        await writer.append("progress", {"n": n, "pad": "x" * 4000})
        if n % 10 == 0:
            await asyncio.sleep(0.01)  # in bursts: many batches, as live traffic comes
    await until(lambda: client.cut, 15, "the non-reader cut by its byte bound")
    stats = await gateway_stats(gateway)
    assert stats["closed_overflow"] == 1 and "closed_stall" not in stats
    await writer.append("complete", {})
    assert seqs(await asyncio.wait_for(received, 30)) == list(range(1, 402))
    ids = event_ids(client.drain())
    assert len(ids) < 400
    assert [int(i.rpartition("-")[2]) for i in ids] == list(range(1, len(ids) + 1))


@pytest.mark.system
async def test_a_non_reader_of_an_idle_stream_is_cut_after_the_write_stall(
    stuck: Any, gateway_factory: Any, event_log: EventLog
) -> None:
    # Only heartbeats, often, so the kernel's buffers fill; a queue bound it can never reach.
    gateway: Gateway = gateway_factory(
        heartbeat_seconds=0.01, write_stall_seconds=2, client_queue_size=1_000_000
    )
    await event_log.declare(JOB)
    client = stuck(gateway.socket)
    await until(lambda: client.cut, 45, "the non-reader cut")
    assert client.open_for >= 2
    assert (await gateway_stats(gateway))["closed_stall"] == 1
    assert b"heartbeat" in client.drain()


@pytest.mark.system
async def test_a_slow_reader_is_not_cut(stuck: Any, gateway_factory: Any, event_log: EventLog) -> None:
    writer = event_log.writer(JOB)
    for n in range(1, 301):
        await writer.append("progress", {"n": n, "pad": "x" * 1000})
    await writer.append("complete", {})
    gateway: Gateway = gateway_factory(write_stall_seconds=1.5)
    client = stuck(gateway.socket)
    client.sock.setblocking(False)
    loop = asyncio.get_running_loop()
    received = b""
    deadline = time.monotonic() + 40
    while not received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
        assert time.monotonic() < deadline, "the slow reader never got to the end"
        chunk = await asyncio.wait_for(loop.sock_recv(client.sock, 16 * 1024), TIMEOUT)
        assert chunk, f"cut after {len(received)} bytes:\n{gateway.log_text()[-2000:]}"
        received += chunk
        await asyncio.sleep(0.25)  # slow, with pauses well under the stall
    ids = event_ids(received)
    assert [int(i.rpartition("-")[2]) for i in ids] == list(range(1, 302))
    stats = await gateway_stats(gateway)
    for _ in range(100):  # the handler counts its stream once it returned from the last send
        if "finished" in stats:
            break
        await asyncio.sleep(0.05)
        stats = await gateway_stats(gateway)
    assert stats.get("finished") == 1 and "closed_stall" not in stats
