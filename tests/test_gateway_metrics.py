"""A gateway's Prometheus metrics (issue 14) on its admin listener, ``GET /metrics``, against
what the test did: N clients of E events make E x N deliveries, a resume from another epoch one
``epoch`` reset, a client that never reads one cut by bytes, a killed subscriber connection one
reader restart. Parsed with prometheus-client's own parser; real redis-server and gateways.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.resets import ResetReason

from .processes import Gateway
from .rawsse import RawSSE
from .workloads import gateway_stats, until

pytestmark = pytest.mark.system

JOB = TaskRef("shop", "Job", "1")
PATH = "/stream/Job/1"
TIMEOUT = 20.0
#: Every metric a gateway exports (besides the process collector's ``process_*``).
GATEWAY_METRICS = {
    "streamcoord_gateway_connections_open", "streamcoord_gateway_connections_total",
    "streamcoord_gateway_deliveries_total", "streamcoord_gateway_events_read_total",
    "streamcoord_gateway_bytes_written_total", "streamcoord_gateway_resets_total",
    "streamcoord_gateway_clients_cut_total", "streamcoord_gateway_window_hits_total",
    "streamcoord_gateway_history_reads_total", "streamcoord_gateway_redis_errors_total",
    "streamcoord_gateway_reader_restarts_total", "streamcoord_gateway_streams_followed",
    "streamcoord_gateway_reader_up",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(gateway: Gateway) -> Samples:
    """The gateway's metrics, parsed: (sample name, sorted labels) -> value."""
    assert gateway.admin_socket is not None
    transport = httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST, response.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"streamcoord_gateway_{name}", tuple(sorted(labels.items())))]


@pytest.mark.timeout(90)
async def test_metrics_match_what_clients_received(gateway_factory: Any, event_log: EventLog) -> None:
    clients_n, events_n = 5, 20
    gateway: Gateway = gateway_factory()
    first = await scrape(gateway)
    assert {name for name, _ in first if name.startswith("streamcoord_")} == GATEWAY_METRICS, sorted(first)
    assert any(name.startswith("process_") for name, _ in first)
    assert value(first, "reader_up") == 1
    assert value(first, "deliveries_total") == value(first, "connections_total") == 0
    # Every reason is there from the start, at 0 (a rate() needs the series before the event).
    assert {labels for name, labels in first if name.endswith("resets_total")} == {
        (("reason", reason.value),) for reason in ResetReason
    }
    assert {labels for name, labels in first if name.endswith("clients_cut_total")} == {
        (("reason", reason),) for reason in ("overflow", "bytes", "stall")
    }

    await event_log.declare(JOB)
    clients = [await RawSSE.open(gateway.socket, PATH) for _ in range(clients_n)]
    try:
        for client in clients:
            await asyncio.wait_for(client.read_head(), TIMEOUT)
        await until(lambda: _listeners(gateway, clients_n), TIMEOUT, f"{clients_n} listeners")
        during = await scrape(gateway)
        assert value(during, "connections_open") == value(during, "connections_total") == clients_n
        assert value(during, "streams_followed") == 1
        writer = event_log.writer(JOB)
        for n in range(events_n - 1):
            await writer.append("progress", {"n": n})
        await writer.append("complete", {})
        received = await asyncio.wait_for(asyncio.gather(*(c.events_until_end() for c in clients)), TIMEOUT)
    finally:
        for client in clients:
            client.close()
    assert [len(events) for events in received] == [events_n] * clients_n
    await until(lambda: _listeners(gateway, 0), TIMEOUT, "the clients to be gone")
    after = await scrape(gateway)
    assert value(after, "deliveries_total") == events_n * clients_n
    assert value(after, "connections_total") == clients_n
    assert value(after, "connections_open") == value(after, "streams_followed") == 0
    # Each event taken from Redis once or twice (a live message, and maybe the read that
    # follows a new subscription), never once per client.
    assert events_n <= value(after, "events_read_total") <= 2 * events_n
    frames = sum(len(e.data) for events in received for e in events)
    assert value(after, "bytes_written_total") > frames  # the data lines, plus ids and names
    assert value(after, "reader_up") == 1
    assert value(after, "redis_errors_total") == value(after, "reader_restarts_total") == 0

    # A late client reads the ended stream from history, and one resuming with an id of
    # another epoch is reset first, then gets it all too.
    late = await RawSSE.open(gateway.socket, PATH)
    other_epoch = await RawSSE.open(gateway.socket, PATH, {"Last-Event-ID": "0000beef-3"})
    try:
        for client in (late, other_epoch):
            await asyncio.wait_for(client.read_head(), TIMEOUT)
        late_events = await asyncio.wait_for(late.events_until_end(), TIMEOUT)
        resumed = await asyncio.wait_for(other_epoch.events_until_end(), TIMEOUT)
    finally:
        late.close()
        other_epoch.close()
    assert len(late_events) == events_n
    assert [e.event for e in resumed[:1]] == ["reset"] and len(resumed) == events_n + 1
    last = await scrape(gateway)
    assert value(last, "deliveries_total") == events_n * (clients_n + 2)
    assert value(last, "connections_total") == clients_n + 2
    assert value(last, "history_reads_total") >= 1
    assert value(last, "events_read_total") >= value(after, "events_read_total") + events_n
    assert {reason.value: value(last, "resets_total", reason=reason.value) for reason in ResetReason} == {
        reason.value: 1 if reason is ResetReason.EPOCH else 0 for reason in ResetReason
    }


class NonReader:
    """A client that sends its request and never reads (a small receive buffer: what the
    gateway writes stays in the gateway once the kernel's buffers are full)."""

    def __init__(self, gateway: Gateway) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(gateway.socket))
        self.sock.sendall(f"GET {PATH} HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n\r\n".encode())

    def peek(self) -> bytes:
        try:
            return self.sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""


@pytest.fixture
def non_readers() -> Iterator[list[NonReader]]:
    opened: list[NonReader] = []
    yield opened
    for client in opened:
        client.sock.close()


@pytest.mark.timeout(90)
async def test_a_client_cut_by_its_byte_bound_is_counted_by_reason(
    gateway_factory: Any, event_log: EventLog, non_readers: list[NonReader]
) -> None:
    # No stall cut within the test; far fewer events than the frame bound (1000).
    gateway: Gateway = gateway_factory(
        client_queue_bytes=64 * 1024, write_stall_seconds=600, heartbeat_seconds=0.2
    )
    await event_log.declare(JOB)
    client = NonReader(gateway)
    non_readers.append(client)
    # Heartbeats go to listeners only: once one arrived, the client listens to live events.
    await until(lambda: b"heartbeat" in client.peek(), TIMEOUT, "the non-reader to listen")
    writer = event_log.writer(JOB)
    for n in range(200):
        await writer.append("progress", {"n": n, "pad": "x" * 4000})
        if n % 10 == 0:
            await asyncio.sleep(0.01)  # in bursts: many batches, as live traffic comes
        if n % 20 == 0 and value(await scrape(gateway), "clients_cut_total", reason="bytes"):
            break
    await until(lambda: _cut(gateway, "bytes"), TIMEOUT, "the non-reader cut by its byte bound")
    samples = await scrape(gateway)
    assert value(samples, "clients_cut_total", reason="overflow") == 0
    assert value(samples, "clients_cut_total", reason="stall") == 0
    assert value(samples, "connections_open") == 0


@pytest.mark.timeout(60)
async def test_a_lost_subscriber_connection_is_a_reader_restart(gateway_factory: Any, redis: Redis) -> None:
    gateway: Gateway = gateway_factory()
    assert value(await scrape(gateway), "reader_restarts_total") == 0
    subscriber = [
        c for c in await redis.client_list() if c.get("name") == f"streamcoord:gateway-subscriber:{gateway.pid}"
    ]
    assert len(subscriber) == 1, subscriber  # the gateway's one subscriber connection
    await redis.client_kill_filter(_id=subscriber[0]["id"])
    await until(lambda: _restarted(gateway), TIMEOUT, "the reader restart counted and the reader up again")


async def _listeners(gateway: Gateway, count: int) -> bool:
    return bool((await gateway_stats(gateway))["listeners"] == count)


async def _cut(gateway: Gateway, reason: str) -> bool:
    return value(await scrape(gateway), "clients_cut_total", reason=reason) == 1


async def _restarted(gateway: Gateway) -> bool:
    samples = await scrape(gateway)
    return value(samples, "reader_restarts_total") == 1 and value(samples, "reader_up") == 1
