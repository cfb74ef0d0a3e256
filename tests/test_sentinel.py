"""Sentinel end to end: a master, a replica (``--replicaof``) and three sentinels of the test's
own, selected with ``STREAMCOORD_REDIS_URL=redis+sentinel://s1,s2,s3/mymaster/0``, serving two
``runserver_stream`` gateways and two ``runworker`` processes.

``SENTINEL FAILOVER`` while ten tasks run: the replica becomes the master, gateways and workers
move to it, and every task finishes there. The replica may have missed the last writes of the
old master (and the old master keeps taking writes until Sentinel turns it into a replica), so
a client may get a ``reset`` and then the history as the new master has it, but never a silent
gap or a sequence number twice: every client ends with an exact contiguous sequence and one
terminal event, or with a ``reset`` right before any jump.

Figures (failover timings, the gap clients saw, reconnects) are printed (``pytest -s``) and kept
in ``sentinel-report.jsonl`` in the test's temporary directory; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord.taskstate import ENDED

from .processes import Gateway
from .topologies import HOST, Node, SentinelGroup
from .workloads import (
    Follower,
    as_received,
    as_sent,
    create_tasks,
    delivery_problems,
    gateway_stats,
    logs,
    payload,
    project_on,
    row,
    state,
    stream,
    stream_path,
    stream_problems,
    until,
)

pytestmark = [pytest.mark.system, pytest.mark.cluster, pytest.mark.slow]


def report(directory: Path, scenario: str, **figures: Any) -> None:
    print(f"\n[sentinel] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    with open(directory / "sentinel-report.jsonl", "a") as out:
        out.write(json.dumps({"scenario": scenario, **figures}, default=str) + "\n")


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def gap_around(follower: Follower, at: float) -> float:
    """The longest pause between two events this client received after the failover began
    (from the last event before it)."""
    before = [t for t in follower.arrived if t <= at]
    after = [t for t in follower.arrived if t > at]
    return max((b - a for a, b in itertools.pairwise(before[-1:] + after)), default=0.0)


def warnings_in(handle: Gateway) -> dict[str, int]:
    """What a process's log says about Redis trouble, by kind."""
    text = handle.log_text()
    kinds = {
        "hub read failed": "hub read failed",
        "append retried": "append to",
        "claim failed": "claiming jobs failed",
        "control read failed": "control read failed",
        "renew failed": "_renew_leases failed",
        "heartbeat failed": "_heartbeat failed",
        "recover failed": "_recover_abandoned failed",
        "fenced": "another worker owns it now",
        "redis failed under task": "Redis failed under it",
        "rewound": "was created anew",
        "traceback": "Traceback",
    }
    return {kind: text.count(needle) for kind, needle in kinds.items() if text.count(needle)}


@pytest.mark.timeout(120)
async def test_sentinel_failover_during_ten_running_tasks(tmp_path: Path) -> None:
    group = SentinelGroup(tmp_path / "sentinel").start()
    assert group.master is not None and group.replica is not None
    old, new = group.master, group.replica
    steps = 60
    try:
        with project_on(tmp_path / "project", group.url) as project:
            gateways = [project.gateway("gw1"), project.gateway("gw2")]
            workers = [project.worker("w1"), project.worker("w2")]
            refs = create_tasks(project, "ProgressTask", 10, steps=steps, delay=0.1)
            followers = [Follower(gateways[n % 2].socket, stream_path(ref)) for n, ref in enumerate(refs)]
            reading = [asyncio.create_task(f.run(45)) for f in followers]
            await until(lambda: all(len(f.events) >= 10 for f in followers), 30, "every task to be running")
            assert not any(f.done for f in followers), "a task ended before the failover"

            # The failover, and how long each of its steps took.
            began = time.monotonic()
            answer = await asyncio.to_thread(group.failover)
            assert answer == "OK", answer
            promoted_s = await until(lambda: group.role(new) == "master", 30, "the replica to become master", interval=0.05)
            announced_s = await until(lambda: _announced(group, new), 30, "every sentinel to name the new master", interval=0.05)
            demoted_s = await until(lambda: group.role(old) == "slave", 30, "the old master to become a replica", interval=0.1)
            synced_s = await until(
                lambda: old.info("replication").get("master_link_status") == "up", 30,
                "the old master to sync from the new one", interval=0.1,
            )
            await asyncio.gather(*reading)
            (tmp_path / "deliveries.jsonl").write_text("".join(
                json.dumps({"path": f.path, "ids": [e.id or e.event for e in f.events], "statuses": f.statuses}) + "\n"
                for f in followers
            ))

            problems: list[str] = []
            problems += [f"no terminal event: {f.describe()}" for f in followers if not f.done]
            for f in followers:
                problems += [f"{f.path}: {p}" for p in delivery_problems(f.events)]
            # Per task: the last event the client got, and the last the new master holds.
            positions: dict[str, tuple[str | None, int]] = {}
            async with Redis(host=HOST, port=new.port, socket_timeout=5) as master:
                for ref, f in zip(refs, followers, strict=True):
                    task_state = await state(master, ref)
                    if task_state.get("state") != "completed":
                        problems.append(f"{ref}: state on the new master {task_state}")
                    events = await stream(master, ref)
                    positions[ref.pk] = (f.last_id, len(events))
                    problems += [f"{ref}: stream on the new master: {p}" for p in stream_problems(events)]
                    if f.done and as_received(f.events) != as_sent(events):
                        problems.append(f"{ref}: the client's events (after its last reset) differ from the new master's stream")
            with contextlib.suppress(TimeoutError):  # a worker records the row just after the event
                await until(lambda: all(row(project, ref)[0] in ENDED for ref in refs), 10, "the rows to settle")
            rows = {ref: row(project, ref) for ref in refs}
            problems += [f"{ref}: row {rows[ref]}" for ref in refs if rows[ref][0] != "completed"]

            resets = {f.path: [payload(e) for e in f.events if e.event == "reset"] for f in followers}
            gaps = [gap_around(f, began) for f in followers if f.arrived]
            stats = [await gateway_stats(gw) for gw in gateways]
            figures = {
                "promoted_ms": ms(promoted_s), "sentinels_agree_ms": ms(promoted_s + announced_s),
                "old_master_writable_after_promotion_ms": ms(announced_s + demoted_s),
                "old_master_demoted_ms": ms(promoted_s + announced_s + demoted_s),
                "old_master_synced_ms": ms(promoted_s + announced_s + demoted_s + synced_s),
                "client_gap_max_ms": ms(max(gaps, default=0)),
                "client_gap_median_ms": ms(statistics.median(gaps)) if gaps else None,
                "last_event_after_failover_ms": ms(max((f.arrived[-1] for f in followers if f.arrived), default=began) - began),
                "clients_with_reset": sum(1 for r in resets.values() if r),
                "reset_reasons": sorted({r.get("reason", "?") for rs in resets.values() for r in rs}),
                "client_reconnects": sum(len(f.statuses) - 1 for f in followers),
                "client_statuses": sorted({s for f in followers for s in f.statuses}),
                "hub_read_errors": [s.get("read_errors", 0) for s in stats],
                "hub_rewinds": [s.get("rewinds", 0) for s in stats],
                "log_warnings": {h.log.stem: warnings_in(h) for h in (*gateways, *workers)},
                "rows": {ref.pk: r[0] for ref, r in rows.items()},
                "client_last_id_vs_new_master_events": positions,
            }
            report(tmp_path, "failover during 10 tasks", tasks=len(refs), **figures)
            assert not problems, "\n".join(problems[:40]) + "\n" + json.dumps(figures, default=str) + "\n" + logs(*gateways, *workers)
    finally:
        group.stop()


def _announced(group: SentinelGroup, node: Node) -> bool:
    return all(group.master_port(s) == node.port for s in group.sentinels)
