"""A gateway's Prometheus metrics, served on its admin listener at ``GET /metrics``.

Nothing is counted for Prometheus on the way: the gateway already counts what it does (the hub's
``stats``, its open connections), and :class:`GatewayCollector` turns those counters into
metrics when a scrape asks, so the hot path (a batch fanned out to thousands of clients) pays
nothing for metrics. Each process has a registry of its own (never the library's global one:
a test or an embedding application may run several gateways in one process).

Every name starts ``streamcoord_gateway_``; labels are bounded (a reason, never a task id)::

    connections_open                gauge    SSE streams open now
    connections_total               counter  SSE streams opened
    deliveries_total                counter  events handed to clients (live, and history)
    events_read_total               counter  events taken from Redis: live messages, catch-up and history reads
    bytes_written_total             counter  SSE bytes written to clients
    resets_total{reason}            counter  resets sent to clients (streamcoord.resets.ResetReason)
    clients_cut_total{reason}       counter  clients cut: overflow (frames), bytes, stall
    window_hits_total               counter  clients started from the hub's window (no history read)
    history_reads_total             counter  history reads from Redis (snapshots and pages)
    redis_errors_total              counter  Redis commands that failed
    reader_restarts_total           counter  subscriber connections lost and made again, hub loops restarted
    streams_followed                gauge    streams the hub follows (with listeners here)
    reader_up                       gauge    1 while live events flow (the subscriber is connected), else 0

and the process's own (``process_resident_memory_bytes``, ``process_open_fds``, CPU seconds)
from prometheus-client's process collector.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sized
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .hub import Hub
from .resets import ResetReason


class Gateway(Protocol):
    """What the metrics read of a gateway (:class:`streamcoord.gateway.Gateway`, which makes
    its metrics: a protocol here keeps the import one way)."""

    hub: Hub
    connections_opened: int

    @property
    def connections(self) -> Sized: ...

    def written_bytes(self) -> int: ...

PREFIX = "streamcoord_gateway_"
#: Why a client is cut (``clients_cut_total``): its queue's frame bound, its byte bound, or its
#: connection taking no bytes (``write_stall_seconds``).
CUT_REASONS = ("overflow", "bytes", "stall")
#: The content type of :meth:`GatewayMetrics.exposition`: Prometheus's text format (version
#: 1.0.0 as prometheus-client names it; every name here is also valid in the older 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_LATEST

Stats = collections.Counter[str]


def deliveries(stats: Stats) -> int:
    """Events handed to clients: pushed live by the hub, and sent from history (a client cut or gone before writing them still counted them)."""
    return stats["deliveries"] + stats["history_deliveries"]


def events_read(stats: Stats) -> int:
    """Events the process took from Redis: live messages, the hub's catch-up reads and the
    feeds' history reads (a read shared by several clients counts once)."""
    return stats["messages"] + stats["caught_up_events"] + stats["history_read_events"]


def redis_errors(stats: Stats) -> int:
    """Failed Redis commands: the hub's catch-up reads and checks, requests answered 503
    (``/ready`` included), and the gateway's registry entry. Subscriber connections that
    dropped are reader restarts, not counted here."""
    return stats["read_errors"] + stats["check_errors"] + stats["request_redis_errors"] + stats["presence_errors"]


def cuts(stats: Stats) -> dict[str, int]:
    """Clients cut, by reason. ``closed_overflow`` counts both queue bounds (as ``/stats``
    always did); ``closed_overflow_bytes`` is its part cut by bytes."""
    by_bytes = stats["closed_overflow_bytes"]
    return {"overflow": stats["closed_overflow"] - by_bytes, "bytes": by_bytes, "stall": stats["closed_stall"]}


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _by_reason(name: str, documentation: str, values: Iterable[tuple[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, documentation, labels=["reason"])
    for reason, value in values:
        family.add_metric([reason], value)
    return family


class GatewayCollector:
    """Reads one gateway's counters at scrape time (a prometheus-client custom collector)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self._gateway
        hub = gateway.hub
        stats = hub.stats
        yield _gauge("connections_open", "SSE streams open now.", len(gateway.connections))
        yield _counter("connections", "SSE streams opened.", gateway.connections_opened)
        yield _counter(
            "deliveries", "Events handed to clients (live and from history; several clients of one "
            "event count once each).", deliveries(stats),
        )
        yield _counter(
            "events_read", "Events this process took from Redis: live messages, catch-up and history reads.",
            events_read(stats),
        )
        yield _counter("bytes_written", "SSE bytes written to clients.", gateway.written_bytes())
        yield _by_reason(
            "resets", "Resets sent to clients, by reason.",
            ((reason.value, stats[f"reset_{reason.value}"]) for reason in ResetReason),
        )
        yield _by_reason("clients_cut", "Clients cut for not keeping up, by reason.", cuts(stats).items())
        yield _counter("window_hits", "Clients started from the hub's window, without a history read.", stats["window_hits"])
        yield _counter(
            "history_reads", "History reads from Redis: snapshots of a stream and pages of its history.",
            stats["history_reads"] + stats["history_pages"],
        )
        yield _counter("redis_errors", "Redis commands that failed.", redis_errors(stats))
        yield _counter(
            "reader_restarts", "Subscriber connections lost and made again, and hub loops restarted.",
            stats["link_drops"] + stats["reader_restarts"],
        )
        yield _gauge("streams_followed", "Streams the hub follows (streams with clients here).", hub.stream_count)
        yield _gauge("reader_up", "1 while live events flow (the subscriber is connected), else 0.", int(hub.reading))


class GatewayMetrics:
    """One gateway's registry: its collector and the process's."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway))
        ProcessCollector(registry=self.registry)

    def exposition(self) -> bytes:
        """Every metric, in Prometheus's text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
