"""Fan-out: one task stream, many clients on one server process, rising publish rates.

Every contender (bare ASGI, naive, predecessor, streamcoord) gets the same clients and events:
100, 1000 and 5000 clients on one stream, each at two publish rates for 10 s. Figures:
deliveries/s against the offered rate, p50/p99/max latency from send to client, CPU of the
server, Redis, load client and publisher, the host's other CPU, server RSS and the Redis
connections it holds. Quick mode: 100 clients, 100 events/s, 3 s.
"""

from __future__ import annotations

import functools

from ..contenders.lineup import ALL
from ..liverun import LiveLoad, measure_live
from ..rows import measured_row
from . import Context, Row

#: Clients on the stream, and the publish rates (events/s) each count is measured at.
FULL = {100: (100.0, 500.0), 1000: (100.0, 500.0), 5000: (20.0, 100.0)}
QUICK = {100: (100.0,)}
SECONDS, QUICK_SECONDS = 10.0, 3.0
DRAIN, QUICK_DRAIN = 15.0, 5.0


async def run(ctx: Context) -> list[Row]:
    rows = []
    plan = QUICK if ctx.quick else FULL
    for clients, rates in plan.items():
        for rate in rates:
            load = LiveLoad(
                streams=1, clients_per_stream=clients, rate=rate,
                seconds=QUICK_SECONDS if ctx.quick else SECONDS,
                drain_seconds=QUICK_DRAIN if ctx.quick else DRAIN,
            )
            for name in ALL:  # contenders interleaved, so a noisy minute hurts no one alone
                measure = functools.partial(measure_live, load=load)
                rows.append(await measured_row(
                    ctx, "fanout", name, load.params(), measure, clients=clients
                ))
    return rows
