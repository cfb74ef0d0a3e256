"""Memory: what one idle SSE connection costs a server, with 5000 idle clients.

Each contender starts, settles, and its RSS is read; then 5000 clients connect to one stream
where nothing is published, and once the server counts them all (and a moment later) its RSS
is read again: (RSS with clients - RSS idle) / clients. For the naive design the Redis server's
growth (one connection per client) is shown as well. Full mode adds a capacity check:
streamcoord with 8000 clients on one gateway process receiving live events. Quick mode:
500 idle clients, no capacity check.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

from ..contenders import Contender
from ..contenders.lineup import ALL
from ..liverun import LiveLoad, measure_live, optional, server_rss_mb
from ..load import Connection, LoadClients, LoadPlan, merge_reports
from ..procs import time_limit
from ..rows import measured_row
from ..sampler import proc_rss_mb
from . import Context, Row

IDLE, QUICK_IDLE = 5000, 500
SETTLE, QUICK_SETTLE = 2.0, 0.5  # seconds before each RSS reading
CAPACITY = LiveLoad(streams=1, clients_per_stream=8000, rate=10.0, seconds=5.0, drain_seconds=15.0)
LIMIT = 240.0


async def run(ctx: Context) -> list[Row]:
    clients = QUICK_IDLE if ctx.quick else IDLE
    settle = QUICK_SETTLE if ctx.quick else SETTLE
    measure = functools.partial(idle, clients=clients, settle=settle)
    rows = [
        await measured_row(ctx, "memory", name, {"clients": clients, "mode": "idle"}, measure,
                           clients=clients)
        for name in ALL
    ]
    if not ctx.quick:
        params = {"clients": CAPACITY.clients, "mode": f"live, {CAPACITY.rate:g} events/s"}
        rows.append(await measured_row(ctx, "memory", "streamcoord", params, capacity,
                                       clients=CAPACITY.clients))
    return rows


async def capacity(contender: Contender, workdir: Path) -> tuple[dict[str, Any], str]:
    """8000 clients receiving live events: the idle table's columns, and whether they all got
    every event, how fast, and at what CPU."""
    live, notes = await measure_live(contender, workdir, CAPACITY)
    return {
        "connected": live["connected"],
        "rss_clients_mb": live["rss_peak_mb"],
        "redis_conns": live["redis_conns"],
        **{k: live[k] for k in ("offered_per_s", "deliveries_per_s", "missing", "p50_ms",
                                "p99_ms", "server_cpu_pct", "other_cpu_pct")},
    }, notes


async def idle(
    contender: Contender, workdir: Path, *, clients: int, settle: float
) -> tuple[dict[str, Any], str]:
    load: LoadClients | None = None
    try:
        async with time_limit(LIMIT, f"the {contender.name} idle clients (its hard limit)"):
            endpoint = await contender.start(workdir / "server", 1)
            await asyncio.sleep(settle)
            rss_idle = server_rss_mb(endpoint)
            redis_idle = proc_rss_mb(endpoint.redis_pid) if endpoint.redis_pid else None
            plan = LoadPlan("idle", [Connection(contender.stream_path(1))] * clients, LIMIT / 2)
            load = LoadClients(plan, endpoint, workdir / "load")
            await load.start()
            connected, failed = await load.wait_connected(LIMIT / 3)
            await contender.wait_for_clients(connected, LIMIT / 3)
            await asyncio.sleep(settle)
            rss_clients = server_rss_mb(endpoint)
            redis_clients = proc_rss_mb(endpoint.redis_pid) if endpoint.redis_pid else None
            redis_conns = await optional(contender, "redis_connections")
            report = merge_reports(await load.reports(0))
    finally:
        if load is not None:
            await load.stop()
        await contender.stop()
    growth = rss_clients - rss_idle
    metrics = {
        "connected": connected,
        "rss_idle_mb": rss_idle,
        "rss_clients_mb": rss_clients,
        "kb_per_client": round(growth * 1024 / connected, 1) if connected else None,
        "redis_rss_growth_mb": (
            round(redis_clients - redis_idle, 1)
            if redis_clients is not None and redis_idle is not None else None
        ),
        "redis_conns": redis_conns,
    }
    notes = []
    if failed:
        notes.append(f"{failed} of {clients} clients failed to connect")
    if report.get("open_at_end", connected) < connected:
        notes.append(f"{connected - report['open_at_end']} connections closed while idle")
    return metrics, "; ".join(notes)
