"""Running load clients from the suite: plan the connections, start the processes, wait for them
to connect, collect and merge their JSON reports (tests/bench/loadclient.py is the child)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from . import stats
from .contenders import Endpoint
from .procs import Child, make_dir, python_argv, time_limit


@dataclasses.dataclass(frozen=True)
class Connection:
    path: str
    last_event_id: str | None = None
    next_n: int | None = None  # resume: the ``n`` of the event that must come first


@dataclasses.dataclass
class LoadPlan:
    mode: str  # live | latejoin | resume | idle
    connections: list[Connection]
    max_seconds: float  # each load client's own bound on its whole run
    events: int = 0  # latejoin: events to receive; resume: events after the first
    procs: int = 1  # load-client processes (the connections are split among them)
    connect_concurrency: int | None = None
    sequential: bool = False


def split_evenly(items: list[Connection], parts: int) -> list[list[Connection]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


class LoadClients:
    """The load-client processes of one measurement."""

    def __init__(self, plan: LoadPlan, endpoint: Endpoint, workdir: Path) -> None:
        self.plan = plan
        self.endpoint = endpoint
        self.workdir = workdir
        self.children: list[Child] = []

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    async def start(self) -> None:
        make_dir(self.workdir)
        target = (
            ["--socket", str(self.endpoint.socket)] if self.endpoint.socket is not None
            else ["--host", self.endpoint.host or "127.0.0.1", "--port", str(self.endpoint.port)]
        )
        for i, part in enumerate(split_evenly(self.plan.connections, max(1, self.plan.procs))):
            plan_file = self.workdir / f"plan-{i}.json"
            plan_file.write_text(json.dumps(
                {"connections": [dataclasses.asdict(c) for c in part]}
            ))
            argv = python_argv(
                "tests.bench.loadclient", self.plan.mode, *target, "--plan", str(plan_file),
                "--events", str(self.plan.events), "--max-seconds", f"{self.plan.max_seconds:g}",
            )
            if self.plan.connect_concurrency:
                argv += ["--connect-concurrency", str(self.plan.connect_concurrency)]
            if self.plan.sequential:
                argv.append("--sequential")
            self.children.append(await Child.spawn(f"load client {i}", argv, report=True))

    async def wait_connected(self, within: float) -> tuple[int, int]:
        """Wait until every load client says it has connected; returns (ok, failed)."""
        ok = failed = 0
        async with time_limit(within, "the load clients to connect"):
            for child in self.children:
                line = await child.wait_for_line("load client: connected", within)
                match = re.search(r"ok=(\d+) failed=(\d+)", line)
                if match:
                    ok += int(match[1])
                    failed += int(match[2])
        return ok, failed

    def check_running(self) -> None:
        for child in self.children:
            if not child.running and child.process.returncode != 0:
                raise RuntimeError(f"{child.name} failed:\n{child.log_tail()}")

    async def reports(self, grace: float) -> list[dict[str, Any]]:
        """Wait up to ``grace`` seconds for the clients to finish, SIGTERM those still running
        (they then report what they have), and return their reports."""
        waits = [asyncio.ensure_future(c.process.wait()) for c in self.children]
        await asyncio.wait(waits, timeout=grace)
        for child in self.children:
            child.signal()
        async with time_limit(20, "the load clients to report"):
            await asyncio.gather(*waits)
            outputs = [await c.report() for c in self.children]
        reports = []
        for child, output in zip(self.children, outputs, strict=True):
            if not output:
                raise RuntimeError(f"{child.name} reported nothing:\n{child.log_tail()}")
            reports.append(json.loads(output))
        return reports

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.children), return_exceptions=True)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several clients: counts added, histograms merged, lists joined."""
    merged: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            if key.endswith("histogram"):
                merged[key] = stats.merge([merged.get(key, {}), value])
            elif isinstance(value, bool):
                merged[key] = merged.get(key, True) and value
            elif isinstance(value, int | float) and key not in ("first_delivery", "last_delivery"):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, list):
                merged[key] = [*merged.get(key, []), *value]
            elif isinstance(value, dict):
                counts = merged.setdefault(key, {})
                for k, v in value.items():
                    counts[k] = counts.get(k, 0) + v
            else:
                merged[key] = value
    if any("first_delivery" in r for r in reports):
        firsts = [r["first_delivery"] for r in reports if r.get("first_delivery")]
        lasts = [r["last_delivery"] for r in reports if r.get("last_delivery")]
        merged["first_delivery"] = min(firsts) if firsts else None
        merged["last_delivery"] = max(lasts) if lasts else None
    return merged
