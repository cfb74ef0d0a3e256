"""Resume storm: 1000 clients reconnect at once with Last-Event-ID while the task publishes.

The stream publishes 50 events/s; once it holds a history of 500 events, 1000 connections
open at once, each with the id of a random event already published (full mode repeats the storm
with ids among the last 10 events, as after a gateway restart). Figures: time from each
connect to its first event (p50/p99/max), and that nothing was lost or repeated: the first
event must be the one right after the id (``gaps``, ``repeats``) and the next 5 must follow in
order. Contenders with event ids: bare ASGI, naive, streamcoord. Quick mode: 100 reconnects
after a 50-event history.
"""

from __future__ import annotations

import asyncio
import functools
import random
from pathlib import Path
from typing import Any

from .. import stats
from ..contenders import Contender
from ..liverun import optional, sampled_pids
from ..load import Connection, LoadClients, LoadPlan, merge_reports
from ..procs import time_limit
from ..rows import measured_row
from ..sampler import ProcSampler
from . import Context, Row

CONTENDERS = ("bare", "naive", "streamcoord")
#: Events/s published throughout: low enough that fanning them out to the 1000 resumed
#: clients (50,000 deliveries/s) stays well within every contender's means, so the storm
#: measures reconnecting, not fan-out.
RATE = 50.0
RECONNECTS, QUICK_RECONNECTS = 1000, 100
HISTORY, QUICK_HISTORY = 500, 50  # events published before the storm
STORM, QUICK_STORM = 4.0, 1.5  # seconds of publishing after the history
AFTER_FIRST = 5  # events each client checks after its first
#: Full mode also storms with ids among the latest events only (clients that were following
#: live when their gateway went away): then the storm costs connections, not history.
NEAR_HEAD = 10
LIMIT = 180.0


async def run(ctx: Context) -> list[Row]:
    reconnects = QUICK_RECONNECTS if ctx.quick else RECONNECTS
    history = QUICK_HISTORY if ctx.quick else HISTORY
    rows = []
    for spread in [history] if ctx.quick else [history, NEAR_HEAD]:
        params = {"reconnects": reconnects, "history": history, "rate": RATE,
                  "last ids": "any in history" if spread == history else f"among the last {spread}"}
        measure = functools.partial(
            storm, reconnects=reconnects, history=history, spread=spread,
            storm_seconds=QUICK_STORM if ctx.quick else STORM,
        )
        for name in CONTENDERS:
            rows.append(await measured_row(ctx, "resume", name, params, measure, clients=reconnects))
    return rows


async def storm(
    contender: Contender, workdir: Path, *, reconnects: int, history: int, spread: int,
    storm_seconds: float,
) -> tuple[dict[str, Any], str]:
    if not hasattr(contender, "event_id") or not hasattr(contender, "published"):
        raise RuntimeError(f"{contender.name} has no event ids to resume from")
    clients: LoadClients | None = None
    publishing: asyncio.Task[int] | None = None
    # Long enough to publish the history, then the storm, then every client's next events.
    seconds = history / RATE + storm_seconds
    try:
        async with time_limit(LIMIT, f"the {contender.name} resume storm (its hard limit)"):
            endpoint = await contender.start(workdir / "server", 1)
            publishing = asyncio.create_task(contender.publish(1, RATE, seconds))
            while (published := await optional(contender, "published", 1)) < history:
                if publishing.done():
                    publishing.result()  # raises what stopped the publisher
                    break
                await asyncio.sleep(0.05)
            connections = []
            for _ in range(reconnects):
                n = random.randint(max(1, published - spread + 1), published)
                last_id = contender.event_id(1, n)
                connections.append(Connection(contender.stream_path(1), last_id, n + 1))
            plan = LoadPlan("resume", connections, max_seconds=60, events=AFTER_FIRST,
                            connect_concurrency=reconnects)
            clients = LoadClients(plan, endpoint, workdir / "load")
            sampler = ProcSampler(sampled_pids(endpoint, []))
            async with sampler.running():
                await clients.start()
                report = merge_reports(await clients.reports(60))
            await publishing
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
        if clients is not None:
            await clients.stop()
        await contender.stop()
    window = sampler.samples["host"]
    start, end = window[0].at, window[-1].at
    histogram = stats.merge([report.get("first_event_histogram", {})])
    metrics = {
        "resumed": stats.count(histogram),
        **stats.summary_ms(histogram),
        "gaps": report.get("gaps"),
        "repeats": report.get("repeats"),
        "out_of_order": report.get("out_of_order"),
        "server_cpu_pct": sampler.cpu_percent("server", start, end),
        "redis_cpu_pct": sampler.cpu_percent("redis", start, end),
        "other_cpu_pct": sampler.others_cpu_percent(start, end),
    }
    problems = {k: report.get(k) for k in ("connect_errors", "no_event", "incomplete")}
    bad_status = {s: c for s, c in report.get("statuses", {}).items() if s != "200"}
    notes = [f"{v} {k.replace('_', ' ')}" for k, v in problems.items() if v]
    if bad_status:
        notes.append(f"statuses {bad_status}")
    return metrics, "; ".join(notes)
