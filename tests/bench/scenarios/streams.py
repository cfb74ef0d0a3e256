"""Many streams: thousands of tasks, each with its own client or two, on one gateway process.

Every stream publishes at the same rate (each starting at a random point of its first
interval), so the gateway follows many streams at once instead of fanning one out. One loop in
the suite's process publishes for all streams (``pacing.paced_rounds``: what is due each round,
one pipeline of XADDs for naive, one call of the append script for streamcoord), so the
publisher keeps the pace at 10,000 events/s; a TaskWriter's own cost is the publish scenario's. Shapes: 1,000
streams x 2 clients at 1 and 5 events/s, then 3,000 x 1 and 10,000 x 1 at 1 event/s (the
common deployment: every export, import and report with its own progress bar). Contenders:
the naive design and streamcoord; then 100 x 1 at 2 events/s on one Redis and on a 3-master
cluster (light load: what sharded Pub/Sub across nodes adds). Quick mode: 100 streams x 2, 2 events/s each, 3 s.
"""

from __future__ import annotations

import functools

from ..liverun import LiveLoad, measure_live
from ..rows import measured_row
from . import Context, Row

CONTENDERS = ("naive", "streamcoord")
#: (streams, clients per stream, events/s per stream)
SHAPES = ((1000, 2, 1.0), (1000, 2, 5.0), (3000, 1, 1.0), (10_000, 1, 1.0))
QUICK_SHAPES = ((100, 2, 2.0),)
#: Light load on one Redis and on a 3-master cluster: what sharded Pub/Sub adds to latency.
CLUSTER_CONTENDERS = ("streamcoord", "streamcoord-cluster")
CLUSTER_SHAPE = (100, 1, 2.0)
SECONDS, QUICK_SECONDS = 10.0, 3.0


async def run(ctx: Context) -> list[Row]:
    rows = []
    runs = [(shape, CONTENDERS) for shape in (QUICK_SHAPES if ctx.quick else SHAPES)]
    if not ctx.quick:
        runs.append((CLUSTER_SHAPE, CLUSTER_CONTENDERS))
    for (streams, clients_per_stream, rate), contenders in runs:
        load = LiveLoad(
            streams=streams, clients_per_stream=clients_per_stream, rate=rate,
            seconds=QUICK_SECONDS if ctx.quick else SECONDS,
            drain_seconds=5.0 if ctx.quick else 15.0,
        )
        measure = functools.partial(measure_live, load=load)
        for name in contenders:
            rows.append(await measured_row(
                ctx, "streams", name, load.params(), measure, clients=load.clients
            ))
    return rows
