"""Turning one measurement of one contender into a :class:`Row`, whatever happens to it.

A contender that cannot be made (the predecessor's module missing) or a measurement that fails
or hits its time limit becomes a row whose notes say why, so one failure never costs a scenario
its other rows. Each row is also logged to stderr as it is made, for the long runs.
"""

from __future__ import annotations

import itertools
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .contenders import Contender
from .contenders.lineup import TITLES, Unavailable, make
from .scenarios import Context, Row

Measure = Callable[[Contender, Path], Awaitable[tuple[dict[str, Any], str]]]

_dirs = itertools.count(1)

#: Figures shown in the progress line of a row, when it has them.
PROGRESS = ("deliveries_per_s", "p50_ms", "p99_ms", "server_cpu_pct", "kb_per_client")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def describe(row: Row) -> str:
    params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.params.items())
    figures = " ".join(f"{k}={row.metrics[k]}" for k in PROGRESS if row.metrics.get(k) is not None)
    notes = f" ({row.notes})" if row.notes else ""
    return f"[{row.scenario}] {row.contender} {params}: {figures}{notes}"


async def measured_row(
    ctx: Context, scenario: str, name: str, params: dict[str, Any], measure: Measure,
    *, clients: int = 1000,
) -> Row:
    """Make contender ``name``, measure it in a fresh directory, and return the row."""
    try:
        contender = make(name, clients=clients)
    except Unavailable as exc:
        row = Row(scenario, TITLES[name], params, {}, str(exc))
    else:
        workdir = ctx.workdir / scenario / f"{next(_dirs)}-{name}"
        try:
            metrics, notes = await measure(contender, workdir)
            row = Row(scenario, contender.name, params, metrics, notes)
        except Exception as exc:  # the row records the failure; the suite goes on
            log(f"{scenario} {name} failed:\n{traceback.format_exc()}")
            row = Row(scenario, contender.name, params, {}, f"failed: {type(exc).__name__}: {exc}")
    log(describe(row))
    return row
