"""The benchmark suite: ``python -m tests.bench [--quick] [--only NAME ...] [--out DIR]``.

Runs every scenario of ``tests.bench.scenarios.SCENARIOS`` in order (a module that does not
exist yet gives a row saying "not implemented"), each within a hard time limit, then writes
``results.json`` (machine, parameters, every row), ``results.md`` (one table per scenario) and
``fanout.png`` to ``--out`` (default ``bench-results/``) and prints the Markdown. Every process a
scenario starts is stopped by pid when it ends, times out or fails, and on SIGINT/SIGTERM.
``--quick`` is the CI smoke mode: every scenario, small and short, under two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamcoord import runtime

from . import report
from .machine import machine_info
from .procs import REPO, stop_all_children, time_limit
from .rows import log
from .scenarios import SCENARIOS, Context, Row

#: Hard limits of whole scenarios, in seconds (full mode; quick mode gets QUICK_LIMIT each).
LIMITS = {"fanout": 1800.0}
DEFAULT_LIMIT, QUICK_LIMIT = 600.0, 75.0


def describe(module: Any) -> str:
    """A scenario's summary for the report: its docstring's first paragraph."""
    doc = (module.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


async def run_scenario(name: str, ctx: Context) -> tuple[list[Row], str, str]:
    """(rows, outcome, description) of one scenario; never raises but for cancellation."""
    try:
        module = importlib.import_module(f"tests.bench.scenarios.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"tests.bench.scenarios.{name}":
            return [Row(name, "—", {}, {}, "not implemented")], "not implemented", ""
        return [Row(name, "—", {}, {}, f"failed to import: {exc}")], "failed", ""
    except Exception as exc:
        log(f"scenario {name} failed to import:\n{traceback.format_exc()}")
        return [Row(name, "—", {}, {}, f"failed to import: {type(exc).__name__}: {exc}")], "failed", ""
    limit = QUICK_LIMIT if ctx.quick else LIMITS.get(name, DEFAULT_LIMIT)
    try:
        async with time_limit(limit, f"scenario {name} (its hard limit)"):
            rows: list[Row] = await module.run(ctx)
        outcome = "ran"
    except Exception as exc:
        log(f"scenario {name} failed:\n{traceback.format_exc()}")
        rows, outcome = [Row(name, "—", {}, {}, f"failed: {type(exc).__name__}: {exc}")], "failed"
    finally:
        await stop_all_children()
    if not rows:
        rows = [Row(name, "—", {}, {}, "the scenario returned no rows")]
    return rows, outcome, describe(module)


async def run_suite(args: argparse.Namespace) -> tuple[dict[str, Any], list[Row], dict[str, str]]:
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    started = time.time()
    result: dict[str, Any] = {
        "quick": args.quick,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "scenarios": {},
    }
    rows: list[Row] = []
    descriptions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="scbench-") as tmp:
        ctx = Context(repo=REPO, workdir=Path(tmp), quick=args.quick)
        try:
            for name in [s for s in SCENARIOS if not args.only or s in args.only]:
                log(f"scenario {name}{' (quick)' if args.quick else ''}")
                begun = time.monotonic()
                scenario_rows, outcome, descriptions[name] = await run_scenario(name, ctx)
                rows.extend(scenario_rows)
                seconds = round(time.monotonic() - begun, 1)
                result["scenarios"][name] = {"outcome": outcome, "seconds": seconds}
                log(f"scenario {name}: {outcome} in {seconds:g}s")
        finally:
            await stop_all_children()
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["duration_s"] = round(time.time() - started, 1)
    return result, rows, descriptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI smoke mode (< 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="NAME",
                        help=f"run only these scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results",
                        help="where results.json, results.md and fanout.png go")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, rows, descriptions = runtime.run(run_suite(args))
    except asyncio.CancelledError:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    text = report.write_all(args.out, result, rows, descriptions)
    print(text)
    log(f"results written to {args.out}/ ({report.MARKDOWN_NAME}, {report.JSON_NAME}, "
        f"{report.CHART_NAME}) in {result['duration_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
