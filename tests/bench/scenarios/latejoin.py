"""Late join: how long a client takes to receive a 10,000-event history.

The stream's 10,000 events (then ``complete``) are published first; then clients connect and
the load client times each one from its connect to its 10,000th event: one client after
another, then (full mode) ten at once. Contenders with a history: bare ASGI (from memory),
naive (XREAD from the start) and streamcoord (which retains 10,000 events per stream, so its
clients get events 2..10,001). Quick mode: a 1,000-event history, two joins.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .. import stats
from ..contenders import Contender
from ..load import Connection, LoadClients, LoadPlan, merge_reports
from ..procs import time_limit
from ..rows import measured_row
from . import Context, Row

CONTENDERS = ("bare", "naive", "streamcoord")
HISTORY, QUICK_HISTORY = 10_000, 1_000
PUBLISH_RATE = 5_000.0  # events/s while the history is written
JOINS, QUICK_JOINS = 5, 2  # one after another
CONCURRENT = 10  # at once (full mode only)
LIMIT = 240.0  # seconds, per measurement


async def run(ctx: Context) -> list[Row]:
    history = QUICK_HISTORY if ctx.quick else HISTORY
    shapes = [(QUICK_JOINS if ctx.quick else JOINS, True)]
    if not ctx.quick:
        shapes.append((CONCURRENT, False))
    rows = []
    for joins, sequential in shapes:
        params = {"history": history, "clients": joins,
                  "joining": "one after another" if sequential else "at once"}
        measure = functools.partial(latejoin, history=history, joins=joins, sequential=sequential)
        for name in CONTENDERS:
            rows.append(await measured_row(ctx, "latejoin", name, params, measure))
    return rows


async def latejoin(
    contender: Contender, workdir: Path, *, history: int, joins: int, sequential: bool
) -> tuple[dict[str, Any], str]:
    clients: LoadClients | None = None
    try:
        async with time_limit(LIMIT, f"the {contender.name} late join (its hard limit)"):
            endpoint = await contender.start(workdir / "server", 1)
            published = await contender.publish(1, PUBLISH_RATE, history / PUBLISH_RATE)
            plan = LoadPlan(
                "latejoin", [Connection(contender.stream_path(1))] * joins, max_seconds=LIMIT / 2,
                events=history, sequential=sequential,
            )
            clients = LoadClients(plan, endpoint, workdir / "load")
            await clients.start()
            report = merge_reports(await clients.reports(LIMIT / 2))
    finally:
        if clients is not None:
            await clients.stop()
        await contender.stop()
    seconds = report.get("seconds", [])
    median = stats.quantile(seconds, 0.5)
    metrics = {
        "published": published,
        "received_all": len(seconds),
        "p50_ms": round(median * 1000, 1) if median is not None else None,
        "max_ms": round(max(seconds) * 1000, 1) if seconds else None,
        "client_events_per_s": stats.per_second(history, median) if median else None,
    }
    incomplete = report.get("incomplete", 0)
    notes = f"{incomplete} of {joins} clients did not receive {history} events" if incomplete else ""
    return metrics, notes
