"""One live measurement: load clients on a contender's streams, events published at a rate, and
what arrived: deliveries/s, publish-to-client latency, CPU and memory of every process, Redis
connections, and whether every client got every event in order.

Deliveries/s is what the clients received divided by the window from the first delivery to the
last (plus one publish interval): while a contender keeps up that is the offered rate; once it
falls behind the window stretches past the publishing, up to the drain limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any

from . import stats
from .contenders import Contender, Endpoint
from .load import Connection, LoadClients, LoadPlan, merge_reports
from .pacing import event_count, paced_rounds
from .procs import time_limit
from .sampler import ProcSampler, proc_rss_mb

#: How long clients may take to connect, and the server to count them.
CONNECT_WITHIN = 90.0
#: Extra seconds of a whole measurement's hard limit beyond publishing and draining.
HARD_LIMIT_EXTRA = 180.0


@dataclasses.dataclass(frozen=True)
class LiveLoad:
    streams: int
    clients_per_stream: int
    rate: float  # events/s published to each stream
    seconds: float
    drain_seconds: float = 15.0  # after the last publish, how long clients get to receive it
    client_procs: int = 1

    @property
    def clients(self) -> int:
        return self.streams * self.clients_per_stream

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"clients": self.clients, "rate": self.rate, "seconds": self.seconds}
        if self.streams > 1:
            params = {"streams": self.streams, "clients_per_stream": self.clients_per_stream,
                      "rate_per_stream": self.rate, "seconds": self.seconds}
        return params


async def optional(contender: Contender, method: str, *args: Any) -> Any:
    """Call an optional extra of a contender (``redis_connections`` ...), None without it."""
    function = getattr(contender, method, None)
    return None if function is None else await function(*args)


def sampled_pids(endpoint: Endpoint, client_pids: list[int]) -> dict[str, int]:
    pids = {f"server-{i}": pid for i, pid in enumerate(endpoint.server_pids)}
    if endpoint.redis_pid is not None:
        pids["redis"] = endpoint.redis_pid
    pids.update({f"client-{i}": pid for i, pid in enumerate(client_pids)})
    pids["bench"] = os.getpid()  # the publisher (for contenders that publish from here)
    return pids


def server_rss_mb(endpoint: Endpoint) -> float:
    return round(sum(proc_rss_mb(pid) for pid in endpoint.server_pids), 1)


async def publish_all(contender: Contender, load: LiveLoad) -> int:
    """Publish to every stream at once (each starting at a random offset within one interval,
    so the streams do not publish in lockstep); returns the events per stream."""
    if load.streams == 1:
        return await contender.publish(1, load.rate, load.seconds)
    send = getattr(contender, "publish_due", None)
    if send is not None:  # many streams from one loop (see pacing.paced_rounds)
        return await paced_rounds(load.streams, load.rate, load.seconds, send)

    async def one(stream: int) -> int:
        await asyncio.sleep(random.random() / load.rate)
        return await contender.publish(stream, load.rate, load.seconds)

    counts = await asyncio.gather(*(one(s) for s in range(1, load.streams + 1)))
    return min(counts)


async def measure_live(contender: Contender, workdir: Path, load: LiveLoad) -> tuple[dict[str, Any], str]:
    """Start the contender, connect the clients, publish, and return (metrics, notes)."""
    limit = load.seconds * 3 + load.drain_seconds + HARD_LIMIT_EXTRA
    async with time_limit(limit, f"the whole {contender.name} measurement (its hard limit)"):
        return await _measure(contender, workdir, load)


async def _measure(contender: Contender, workdir: Path, load: LiveLoad) -> tuple[dict[str, Any], str]:
    clients: LoadClients | None = None
    try:
        endpoint = await contender.start(workdir / "server", load.streams)
        connections = [
            Connection(contender.stream_path(stream))
            for stream in range(1, load.streams + 1) for _ in range(load.clients_per_stream)
        ]
        max_seconds = CONNECT_WITHIN + load.seconds * 2 + load.drain_seconds + 30
        plan = LoadPlan("live", connections, max_seconds, procs=load.client_procs)
        clients = LoadClients(plan, endpoint, workdir / "load")
        await clients.start()
        connected, failed = await clients.wait_connected(CONNECT_WITHIN)
        await contender.wait_for_clients(connected, CONNECT_WITHIN)
        redis_conns = [await optional(contender, "redis_connections")]
        counters = await optional(contender, "server_counters")
        rss_ready = server_rss_mb(endpoint)
        sampler = ProcSampler(sampled_pids(endpoint, clients.pids))
        async with sampler.running():
            start = time.time()
            publisher_limit = load.seconds * 2 + 30
            try:
                async with asyncio.timeout(publisher_limit):
                    published = await publish_all(contender, load)
                cut = False
            except TimeoutError:
                # A server that publishes in its own process (the predecessor) slows its
                # publisher down when overloaded: measure what arrived until now.
                published, cut = event_count(load.rate, load.seconds), True
            publish_seconds = time.time() - start
            redis_conns.append(await optional(contender, "redis_connections"))
            report = merge_reports(await clients.reports(load.drain_seconds))
        if counters is not None:
            counters = reads_figures(counters, await optional(contender, "server_counters"))
        end = report.get("last_delivery") or time.time()
        metrics = summarize(load, published, publish_seconds, report, connected, failed)
        metrics.update({
            "server_cpu_pct": sampler.cpu_percent("server", start, end),
            "redis_cpu_pct": sampler.cpu_percent("redis", start, end),
            "client_cpu_pct": sampler.cpu_percent("client", start, end),
            "bench_cpu_pct": sampler.cpu_percent("bench", start, end),
            "other_cpu_pct": sampler.others_cpu_percent(start, end),
            "rss_ready_mb": rss_ready,
            "rss_peak_mb": sampler.peak_rss_mb("server", start, end),
            "redis_conns": max((c for c in redis_conns if c is not None), default=None),
            **(counters or {}),
        })
        notes = notes_for(report, connected, failed, load)
        if cut:
            metrics["publish_rate"] = None
            notes = "; ".join(filter(None, [
                f"the publisher had not finished after {publisher_limit:g}s (the server could "
                f"not keep up); missing counts against the {published} events planned", notes,
            ]))
        return metrics, notes
    finally:
        if clients is not None:
            await clients.stop()
        await contender.stop()


def reads_figures(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """What a server that reports its counters (streamcoord's hub) did during the measurement:
    its catch-up reads of streams (rounds of one pipeline; live events come by Pub/Sub), and
    how often its subscriber connection dropped."""
    def grew(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    return {"catch_up_reads": grew("reads"), "subscriber_drops": grew("link_drops")}


def summarize(
    load: LiveLoad, published: int, publish_seconds: float, report: dict[str, Any],
    connected: int, failed: int,
) -> dict[str, Any]:
    per_connection = published + 1  # with the terminal event
    histogram = stats.merge([report.get("latency_histogram", {})])
    got = report.get("events_per_connection", {})
    # Every connection is counted, those that failed to connect with 0 events.
    missing = sum(max(0, per_connection - int(n)) * conns for n, conns in got.items())
    first, last = report.get("first_delivery"), report.get("last_delivery")
    window = (last - first + 1 / load.rate) if first and last else 0.0
    return {
        "connected": connected,
        "offered_per_s": round(load.rate * load.clients, 1),
        "deliveries_per_s": stats.per_second(report.get("events", 0), window),
        "delivered": report.get("events", 0),
        "missing": missing,
        "out_of_order": report.get("out_of_order", 0),
        **stats.summary_ms(histogram),
        "publish_rate": stats.per_second(published * load.streams, publish_seconds),
        "window_s": round(window, 2),
    }


def notes_for(report: dict[str, Any], connected: int, failed: int, load: LiveLoad) -> str:
    notes = []
    if failed:
        notes.append(f"{failed} of {load.clients} clients failed to connect")
    unfinished = connected - report.get("completed", 0)
    if unfinished:
        notes.append(f"{unfinished} clients did not get the complete event within the drain limit "
                     f"({load.drain_seconds:g}s) or were cut")
    if report.get("out_of_order"):
        notes.append(f"{report['out_of_order']} events out of order")
    return "; ".join(notes)
