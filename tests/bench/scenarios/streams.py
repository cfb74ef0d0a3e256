"""Many streams: 1000 tasks with 2 clients each on one gateway process.

Every stream publishes at the same rate (each starting at a random point of its first
interval), so the gateway reads many keys at once instead of fanning one out. Contenders:
the naive design and streamcoord. Quick mode: 100 streams, 2 events/s each, 3 s.
"""

from __future__ import annotations

import functools

from ..liverun import LiveLoad, measure_live
from ..rows import measured_row
from . import Context, Row

CONTENDERS = ("naive", "streamcoord")
STREAMS, QUICK_STREAMS = 1000, 100
CLIENTS_PER_STREAM = 2
RATES, QUICK_RATES = (1.0, 5.0), (2.0,)  # events/s per stream
SECONDS, QUICK_SECONDS = 10.0, 3.0


async def run(ctx: Context) -> list[Row]:
    rows = []
    for rate in QUICK_RATES if ctx.quick else RATES:
        load = LiveLoad(
            streams=QUICK_STREAMS if ctx.quick else STREAMS,
            clients_per_stream=CLIENTS_PER_STREAM, rate=rate,
            seconds=QUICK_SECONDS if ctx.quick else SECONDS,
            drain_seconds=5.0 if ctx.quick else 15.0,
        )
        measure = functools.partial(measure_live, load=load)
        for name in CONTENDERS:
            rows.append(await measured_row(
                ctx, "streams", name, load.params(), measure, clients=load.clients
            ))
    return rows
