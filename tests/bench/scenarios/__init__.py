"""The scenarios of the benchmark suite, one module each, run in this order.

Each module has ``async def run(ctx: Context) -> list[Row]``: it starts what it measures (its
own redis-server, servers, load clients, all on unix sockets or kernel-picked loopback ports),
bounds itself in time, stops every process it started by pid, and returns one row per
measurement: which contender, with which parameters, and the figures it measured.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

#: Module names under tests.bench.scenarios, in the order the suite runs them.
SCENARIOS = [
    "fanout",  # one stream, 100/1000/5000 clients on one gateway process, rising publish rates
    "streams",  # 1000 streams with 2 clients each on one gateway process
    "multiplex",  # 1000 clients x 20 tasks: one /streams connection each vs 20 /stream ones
    "publish",  # events/s from one worker process; raw XADD and redis-benchmark ceilings
    "latejoin",  # time to receive a 10,000-event history
    "resume",  # 1000 reconnects with Last-Event-ID: time to first event
    "dispatch",  # start_task to first event at a client; no-op tasks/s through one worker
    "memory",  # RSS per idle connection with 5000 idle clients
    "scale",  # 2 gateway processes and 2 workers on the 2 cores
]


@dataclasses.dataclass
class Context:
    repo: Path
    workdir: Path  # a temporary directory of this run; scenarios make subdirectories in it
    quick: bool  # the CI smoke mode: every scenario runs, small and short


@dataclasses.dataclass
class Row:
    scenario: str
    contender: str
    params: dict[str, Any]
    metrics: dict[str, Any]  # numbers (None when not measured), e.g. deliveries_per_s, p99_ms
    notes: str = ""
