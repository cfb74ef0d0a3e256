"""Fault injection: workers killed, paused or stopped mid-task, poison tasks, cancellations,
Redis killed (with and without persistence), a reconnect storm, and Redis memory after retention.

Every scenario keeps what producers had acknowledged (where the test is the producer; for tasks
run by workers the stream in Redis is the record) and every event each client received, and
checks the deliveries with one checker (:func:`delivery_problems`): per task, sequence numbers
contiguous and unique, a jump or a new epoch only right after a ``reset``, and exactly one
terminal event, the last. Times are measured and printed (``pytest -s``; also appended to
``faults-report.jsonl`` in the test's temporary directory) but never asserted on, apart from
generous timeouts that tell a hang from a slow machine.

Processes run with short leases (2 s), so a lost worker is noticed within seconds; every process
is one the test started, stopped by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, Settings, TaskRef, WriterFenced
from streamcoord.connection import RedisFactory
from streamcoord.ids import EventId
from streamcoord.registry import register_models
from streamcoord.taskstate import ENDED

from .processes import Gateway, Project, RedisServer, gateway_redis_connections
from .rawsse import RawSSE, SSEEvent
from .workloads import (
    KEYS,
    TERMINAL,
    Event,
    Follower,
    as_received,
    as_sent,
    create_tasks,
    delivery_problems,
    gateway_stats,
    payload,
    project_on,
    row,
    state,
    stream,
    stream_path,
    stream_problems,
    until,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]

LEASE = 2.0
#: Worker settings: a lost worker's tasks are taken over within about a lease.
FAST: dict[str, Any] = {
    "lease_seconds": LEASE,
    "worker_heartbeat_seconds": 1,
    "shutdown_grace_seconds": 2,
}


# -- measuring and recording ---------------------------------------------------------------


def report(directory: Path, scenario: str, **figures: Any) -> None:
    """Print one scenario's measurements and keep them beside its logs."""
    print(f"\n[faults] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    with open(directory / "faults-report.jsonl", "a") as out:
        out.write(json.dumps({"scenario": scenario, **figures}, default=str) + "\n")


def record_deliveries(directory: Path, deliveries: dict[str, Sequence[SSEEvent]]) -> None:
    """Every event each client received, one JSON line per event, for post-mortems."""
    with open(directory / "deliveries.jsonl", "a") as out:
        for client, events in deliveries.items():
            for event in events:
                out.write(json.dumps({"client": client, "id": event.id, "event": event.event, "data": event.data}) + "\n")


def record_acked(directory: Path, acked: dict[str, Sequence[EventId]]) -> None:
    """Every id a producer's append returned (what it was told is stored), one line per task."""
    with open(directory / "acked.jsonl", "a") as out:
        for task, ids in acked.items():
            out.write(json.dumps({"task": task, "ids": [str(i) for i in ids]}) + "\n")


def ms(seconds: float) -> int:
    return round(seconds * 1000)


# -- the checker -----------------------------------------------------------------------------




def types(events: Sequence[SSEEvent] | Sequence[Event]) -> list[str]:
    return [e.event if isinstance(e, SSEEvent) else e.type.decode() for e in events]


def stamp(event: SSEEvent | Event) -> datetime:
    return datetime.fromisoformat(payload(event)["_timestamp"])


def check_one_run(events: Sequence[Event], steps: int, terminal: str = "complete") -> list[str]:
    """A run that went from start to end by itself: start, progress 1..steps, terminal."""
    expected = ["start"] + ["progress"] * steps + [terminal]
    problems = []
    if types(events) != expected:
        problems.append(f"types {types(events)} != {expected}")
    progress = [payload(e)["step"] for e in events if e.type == b"progress"]
    if progress != list(range(1, len(progress) + 1)):
        problems.append(f"steps out of order: {progress}")
    return problems


def check_broken_run(events: Sequence[Event]) -> list[str]:
    """The part a lost run wrote: start, then progress 1..k in order, nothing else."""
    problems = []
    if not events or events[0].type != b"start":
        problems.append(f"does not begin with start: {types(events)}")
    rest = events[1:]
    if any(e.type != b"progress" for e in rest):
        problems.append(f"more than progress events: {types(events)}")
    steps = [payload(e)["step"] for e in rest if e.type == b"progress"]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"steps out of order: {steps}")
    return problems


# -- clients -----------------------------------------------------------------------------------


def follow(gateway: Gateway, refs: Sequence[TaskRef], within: float = 90) -> tuple[list[Follower], list[asyncio.Task[Follower]]]:
    followers = [Follower(gateway.socket, stream_path(ref)) for ref in refs]
    return followers, [asyncio.create_task(f.run(within)) for f in followers]


async def all_done(followers: Sequence[Follower], reading: Sequence[asyncio.Task[Follower]]) -> None:
    await asyncio.gather(*reading)
    unfinished = [f.describe() for f in followers if not f.done]
    assert not unfinished, "clients that never got a terminal event:\n" + "\n".join(unfinished)


# -- the project and Redis ---------------------------------------------------------------------


ENDED_ROWS = frozenset(ENDED)


async def settled_rows(project: Project, refs: Sequence[TaskRef], within: float = 15) -> dict[TaskRef, tuple[str, str]]:
    """The rows once every one has recorded an outcome (a worker writes the row just after the
    terminal event, so a client may see the event a moment before the row says so)."""
    await until(lambda: all(row(project, ref)[0] in ENDED_ROWS for ref in refs), within,
                f"the rows of {[str(r) for r in refs]} to record an outcome")
    return {ref: row(project, ref) for ref in refs}


async def pending_jobs(redis: Redis) -> int:
    info: Any = await redis.xpending(KEYS.jobs(), "workers")
    return int(info["pending"])


async def _pending_is(redis: Redis, count: int) -> bool:
    return await pending_jobs(redis) == count


async def dead_letters(redis: Redis) -> list[dict[str, str]]:
    entries: Any = await redis.xrange(KEYS.dead_letters(), "-", "+")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def ran_on(worker: Gateway, task_state: dict[str, str]) -> bool:
    """True when the state's ``worker`` (``host-pid-xxxx``) is that process."""
    return f"-{worker.pid}-" in task_state.get("worker", "")


def log_lines(process: Gateway, *needles: str) -> list[str]:
    return [line for line in process.log_text().splitlines() if all(n in line for n in needles)]


# -- 1. a worker killed mid-run ------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["ProgressTask", "RetryingProgressTask"])
async def test_sigkill_of_a_worker_mid_run(model: str, project: Project, redis: Redis, tmp_path: Path) -> None:
    """20 tasks on w1; w1 is SIGKILLed mid-run; w2 takes every task over: a plain ProgressTask
    fails with one WorkerLost error, a RetryingProgressTask runs again and completes."""
    steps = 20
    gateway = project.gateway()
    refs = create_tasks(project, model, 20, steps=steps, delay=0.2)
    w1 = project.worker("w1", concurrency=20, **FAST)
    followers, reading = follow(gateway, refs)
    await until(lambda: all(len(f.events) >= 4 for f in followers), 30, "every task to be a few steps in")
    before = [await state(redis, ref) for ref in refs]
    assert all(s["state"] == "running" and ran_on(w1, s) for s in before), before
    assert not any(f.done for f in followers), "a task ended before the kill: the test ran too slowly"
    os.kill(w1.pid, signal.SIGKILL)
    killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
    await asyncio.to_thread(w1.process.wait, 10)
    w2 = await asyncio.to_thread(project.worker, "w2", 20, **FAST)
    w2_ready = time.monotonic() - killed_at
    await all_done(followers, reading)
    record_deliveries(tmp_path, {f.path: f.events for f in followers})

    rows = await settled_rows(project, refs)
    takeover = [f.arrival("attempt" if model == "RetryingProgressTask" else "error") - killed_at for f in followers]
    ended = [f.arrived[-1] - killed_at for f in followers]
    problems: list[str] = []
    for ref, f in zip(refs, followers, strict=True):
        events = await stream(redis, ref)
        after_kill = [e for e in events if e.type != b"attempt" and e.type != b"error" and stamp(e) > killed_wall]
        problems += [f"{ref}: client: {p}" for p in delivery_problems(f.events)]
        problems += [f"{ref}: stream: {p}" for p in stream_problems(events)]
        if as_received(f.events) != as_sent(events):
            problems.append(f"{ref}: the client's events differ from the stream's")
        final = await state(redis, ref)
        if not ran_on(w2, final):
            problems.append(f"{ref}: state names worker {final.get('worker')}, not w2 (pid {w2.pid})")
        attempts = [n for n, e in enumerate(events) if e.type == b"attempt"]
        if model == "ProgressTask":
            problems += [f"{ref}: {p}" for p in check_broken_run(events[:-1])]
            error = payload(events[-1])
            if (error.get("error_type"), error.get("attempt")) != ("WorkerLost", 1):
                problems.append(f"{ref}: last event {error}")
            if (final.get("state"), final.get("attempt")) != ("failed", "1"):
                problems.append(f"{ref}: state {final}")
            status, message = rows[ref]
            if status != "failed" or not message.startswith("WorkerLost"):
                problems.append(f"{ref}: row {status} {message!r}")
            # w1 wrote nothing after it was killed; the error is w2's.
            if after_kill:
                problems.append(f"{ref}: events of the killed run after the kill: {as_sent(after_kill)}")
        else:
            if len(attempts) != 1:
                problems.append(f"{ref}: {len(attempts)} attempt events: {types(events)}")
                continue
            old, attempt, new = events[:attempts[0]], events[attempts[0]], events[attempts[0] + 1:]
            problems += [f"{ref}: old run: {p}" for p in check_broken_run(old)]
            problems += [f"{ref}: new run: {p}" for p in check_one_run(new, steps)]
            if payload(attempt).get("attempt") != 2:
                problems.append(f"{ref}: attempt event {payload(attempt)}")
            if any(stamp(e) > killed_wall for e in old):
                problems.append(f"{ref}: the old run wrote after the kill")
            if (final.get("state"), final.get("attempt")) != ("completed", "2"):
                problems.append(f"{ref}: state {final}")
            if rows[ref][0] != "completed":
                problems.append(f"{ref}: row {rows[ref]}")
    assert not problems, "\n".join(problems)
    await until(lambda: _pending_is(redis, 0), 10, "the consumer group's pending list to empty")
    letters = await dead_letters(redis)
    expected_letters = {ref.label for ref in refs} if model == "ProgressTask" else set()
    assert {d["task"] for d in letters} == expected_letters
    assert len(letters) == len(expected_letters)
    report(
        tmp_path, f"1 SIGKILL worker ({model})", tasks=len(refs), lease_s=LEASE, w2_ready_ms=ms(w2_ready),
        takeover_ms_min=ms(min(takeover)), takeover_ms_max=ms(max(takeover)),
        all_ended_ms=ms(max(ended)), lost_events=0, pending_after=0,
    )


# -- 2. a poison task ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_poison_task_gets_three_attempts_then_a_dead_letter(project: Project, redis: Redis, tmp_path: Path) -> None:
    """PoisonTask kills whichever worker runs it. Workers are restarted as they die: after
    exactly three attempts it ends with one WorkerLost error and lands in ``sc:dead``."""
    gateway = project.gateway()
    [ref] = create_tasks(project, "PoisonTask", 1)
    began = time.monotonic()
    alive = [project.worker(f"p{n}", **FAST) for n in range(2)]
    [follower], reading = follow(gateway, [ref])
    deaths: list[tuple[int, int | None, float]] = []
    started = len(alive)
    deadline = time.monotonic() + 90
    while not reading[0].done() and time.monotonic() < deadline:
        for worker in list(alive):
            if worker.process.poll() is not None:
                alive.remove(worker)
                deaths.append((worker.pid, worker.process.returncode, time.monotonic() - began))
                alive.append(await asyncio.to_thread(project.worker, f"p{started}", 20, **FAST))
                started += 1
        await asyncio.sleep(0.05)
    await all_done([follower], reading)
    await asyncio.sleep(LEASE + 1)  # no fourth run comes along later
    deaths += [(w.pid, w.process.returncode, time.monotonic() - began) for w in alive if w.process.poll() is not None]
    record_deliveries(tmp_path, {follower.path: follower.events})
    rows = await settled_rows(project, [ref])

    assert delivery_problems(follower.events) == []
    assert types(follower.events) == ["start", "attempt", "start", "attempt", "start", "error"]
    assert [payload(e)["attempt"] for e in follower.events if e.event == "attempt"] == [2, 3]
    error = payload(follower.events[-1])
    assert (error["error_type"], error["attempt"]) == ("WorkerLost", 3), error
    assert [code for _, code, _ in deaths] == [-signal.SIGKILL] * 3, deaths
    final = await state(redis, ref)
    assert (final["state"], final["attempt"]) == ("failed", "3"), final
    events = await stream(redis, ref)
    assert stream_problems(events) == [] and as_received(follower.events) == as_sent(events)
    assert sum(e.type == b"error" for e in events) == 1
    letters = await dead_letters(redis)
    assert [(d["task"], d["attempts"], d["reason"]) for d in letters] == [(ref.label, "3", "WorkerLost")]
    assert rows[ref][0] == "failed" and rows[ref][1].startswith("WorkerLost"), rows
    await until(lambda: _pending_is(redis, 0), 10, "the consumer group's pending list to empty")
    report(
        tmp_path, "2 poison task", attempts=final["attempt"], worker_deaths=len(deaths),
        deaths_at_ms=[ms(t) for _, _, t in deaths], ended_after_ms=ms(follower.arrived[-1] - began),
        dead_letters=len(letters),
    )


# -- 3. cancellation from another process ------------------------------------------------------------


async def cancel(project: Project, ref: TaskRef) -> tuple[str, float, float]:
    """``manage.py cancel_task``: its output, and when it began and returned (monotonic)."""
    began = time.monotonic()
    out = await asyncio.to_thread(project.manage, "cancel_task", ref.model, ref.pk)
    return out.strip(), began, time.monotonic()


@pytest.mark.timeout(90)
async def test_cancel_a_running_and_a_queued_task_from_another_process(project: Project, redis: Redis, tmp_path: Path) -> None:
    gateway = project.gateway()
    worker = project.worker("w", concurrency=1, **FAST)
    [running] = create_tasks(project, "ProgressTask", 1, steps=600, delay=0.05)
    await until(lambda: _state_is(redis, running, "running"), 15, "the first task to run")
    # The worker's one slot is taken: the second task waits in the queue.
    [queued] = create_tasks(project, "ProgressTask", 1, steps=3, delay=0.05)
    followers, reading = follow(gateway, [running, queued])
    run_client, queued_client = followers
    seen: set[str] = set()

    async def watch_queued() -> None:
        while not queued_client.done or not reading[1].done():
            seen.add((await state(redis, queued)).get("state", ""))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_queued())
    await until(lambda: len(run_client.events) >= 5, 15, "the running task's first events")
    await until(lambda: _listeners(gateway, 2), 10, "both clients to listen")

    queued_out, _, queued_returned = await cancel(project, queued)
    await asyncio.wait_for(reading[1], 15)
    running_out, running_began, running_returned = await cancel(project, running)
    await asyncio.wait_for(reading[0], 15)
    await asyncio.wait_for(watcher, 5)
    await all_done(followers, reading)
    record_deliveries(tmp_path, {f.path: f.events for f in followers})
    rows = await settled_rows(project, [running, queued])

    queued_latency = queued_client.arrival("cancelled") - queued_returned
    running_latency = run_client.arrival("cancelled") - running_returned
    assert queued_out == "cancelled before it started"
    assert running_out.startswith("cancellation sent to worker"), running_out
    for client in followers:
        assert delivery_problems(client.events) == [], client.describe()
    # The running task's process() was cancelled: it got CancelledError, the row says so.
    assert types(run_client.events)[0] == "start" and types(run_client.events)[-1] == "cancelled"
    assert set(types(run_client.events)[1:-1]) == {"progress"}
    assert rows[running] == ("cancelled", "cancelled")
    assert log_lines(worker, "cancelling task", running.label, "on request")
    # The queued one never started: no start event, never running, never begun by a worker.
    assert types(queued_client.events) == ["cancelled"]
    assert "running" not in seen and seen <= {"queued", "cancelling", "cancelled"}, seen
    queued_state = await state(redis, queued)
    assert queued_state["state"] == "cancelled"
    assert not {"attempt", "worker", "run", "running_since"} & set(queued_state), queued_state
    assert rows[queued][0] == "cancelled"
    # Once its slot freed up, the worker claimed the queued job and skipped it.
    await until(lambda: log_lines(worker, queued.label, "no longer queued"), 10, "the worker to skip the cancelled job")
    await until(lambda: _pending_is(redis, 0), 10, "the consumer group's pending list to empty")
    for event_stream in (await stream(redis, running), await stream(redis, queued)):
        assert stream_problems(event_stream) == []
    assert queued_latency < 10 and running_latency < 10, (queued_latency, running_latency)
    report(
        tmp_path, "3 cancel", running_cancel_latency_ms=ms(running_latency),
        running_command_ms=ms(running_returned - running_began),
        running_command_start_to_cancelled_ms=ms(run_client.arrival("cancelled") - running_began),
        queued_cancel_latency_ms=ms(queued_latency), queued_states_seen=sorted(seen),
    )


async def _state_is(redis: Redis, ref: TaskRef, value: str) -> bool:
    return (await state(redis, ref)).get("state") == value


async def _listeners(gateway: Gateway, count: int) -> bool:
    return bool((await gateway_stats(gateway))["listeners"] == count)


@pytest.mark.timeout(60)
async def test_a_run_past_its_time_limit_ends_with_a_timeout_error(project: Project, redis: Redis, tmp_path: Path) -> None:
    """SlowTask (time_limit 1 s) would sleep 30 s: its run is cancelled at the limit and ends
    with one ``error`` (TimeoutError), recorded failed."""
    gateway = project.gateway()
    project.worker("w", **FAST)
    [ref] = create_tasks(project, "SlowTask", 1)
    [client], reading = follow(gateway, [ref], within=30)
    await all_done([client], reading)
    rows = await settled_rows(project, [ref])
    assert delivery_problems(client.events) == []
    assert types(client.events) == ["start", "error"]
    error = payload(client.events[-1])
    assert error["error_type"] == "TimeoutError" and "time limit of 1s" in error["message"], error
    assert rows[ref][0] == "failed" and rows[ref][1].startswith("TimeoutError"), rows
    assert (await state(redis, ref))["state"] == "failed"
    await until(lambda: _pending_is(redis, 0), 10, "the consumer group's pending list to empty")
    report(tmp_path, "3b time limit", start_to_error_ms=ms(client.arrival("error") - client.arrival("start")))


# -- 4. SIGTERM: finish what fits in the grace period, hand the rest back ------------------------


@pytest.mark.timeout(120)
async def test_sigterm_lets_short_tasks_finish_and_hands_long_ones_back(project: Project, redis: Redis, tmp_path: Path) -> None:
    gateway = project.gateway()
    short = create_tasks(project, "ProgressTask", 3, steps=6, delay=0.2)  # ~1.2 s: within the grace
    retrying = create_tasks(project, "RetryingProgressTask", 2, steps=25, delay=0.2)  # ~5 s
    plain = create_tasks(project, "ProgressTask", 2, steps=25, delay=0.2)
    refs = short + retrying + plain
    w1 = project.worker("w1", **FAST)
    followers, reading = follow(gateway, refs)
    by_ref = dict(zip(refs, followers, strict=True))
    await until(lambda: all(f.events for f in followers), 15, "every task to start")
    assert all([ran_on(w1, await state(redis, ref)) for ref in refs])
    assert not any(f.done for f in followers), "a task ended before SIGTERM: the test ran too slowly"
    w1.process.send_signal(signal.SIGTERM)
    term_at = time.monotonic()
    w2 = await asyncio.to_thread(project.worker, "w2", 20, **FAST)
    exit_code = await asyncio.to_thread(w1.process.wait, 30)
    exited_after = time.monotonic() - term_at
    await all_done(followers, reading)
    record_deliveries(tmp_path, {f.path: f.events for f in followers})
    rows = await settled_rows(project, refs)

    assert exit_code == 0, w1.log_text()
    problems: list[str] = []
    for ref, f in by_ref.items():
        problems += [f"{ref}: client: {p}" for p in delivery_problems(f.events)]
        events = await stream(redis, ref)
        problems += [f"{ref}: stream: {p}" for p in stream_problems(events)]
        if as_received(f.events) != as_sent(events):
            problems.append(f"{ref}: the client's events differ from the stream's")
        final = await state(redis, ref)
        attempts = [n for n, e in enumerate(events) if e.type == b"attempt"]
        if ref in short:  # finished on w1 within the grace period
            problems += [f"{ref}: {p}" for p in check_one_run(events, 6)]
            if not ran_on(w1, final) or final.get("attempt") != "1" or rows[ref][0] != "completed":
                problems.append(f"{ref}: state {final}, row {rows[ref]}")
            if f.arrived[-1] - term_at > FAST["shutdown_grace_seconds"] + 1:
                problems.append(f"{ref}: completed {f.arrived[-1] - term_at:.1f}s after SIGTERM")
        elif ref in retrying:  # handed back, run again on w2
            if len(attempts) != 1:
                problems.append(f"{ref}: {len(attempts)} attempt events: {types(events)}")
                continue
            problems += [f"{ref}: old run: {p}" for p in check_broken_run(events[:attempts[0]])]
            problems += [f"{ref}: new run: {p}" for p in check_one_run(events[attempts[0] + 1:], 25)]
            if not ran_on(w2, final) or final.get("attempt") != "2" or rows[ref][0] != "completed":
                problems.append(f"{ref}: state {final}, row {rows[ref]}")
        else:  # handed back, one attempt only: failed by w2
            problems += [f"{ref}: {p}" for p in check_broken_run(events[:-1])]
            error = payload(events[-1])
            if (error.get("error_type"), error.get("attempt")) != ("WorkerLost", 1):
                problems.append(f"{ref}: last event {error}")
            if not ran_on(w2, final) or final.get("state") != "failed" or rows[ref][0] != "failed":
                problems.append(f"{ref}: state {final}, row {rows[ref]}")
    assert not problems, "\n".join(problems)
    # Each long task left w1 by its hand-back, or (on a machine so busy that w1's lease lapsed
    # during the grace period) by a takeover that fenced w1 off: both are clean, as checked above.
    handed = log_lines(w1, "handed back to the other workers")
    fenced = log_lines(w1, "another worker owns it now")
    left = sorted(line.split("task ")[1].split(" ")[0].rstrip(":") for line in handed + fenced)
    assert left == sorted(r.label for r in retrying + plain), handed + fenced
    await until(lambda: _pending_is(redis, 0), 10, "the consumer group's pending list to empty")
    takeovers = [by_ref[r].arrival("attempt") - term_at for r in retrying] + [by_ref[r].arrival("error") - term_at for r in plain]
    report(
        tmp_path, "4 SIGTERM", grace_s=FAST["shutdown_grace_seconds"], w1_exit_code=exit_code,
        w1_exited_after_ms=ms(exited_after),
        short_completed_after_ms=[ms(by_ref[r].arrived[-1] - term_at) for r in short],
        long_taken_over_after_ms=[ms(t) for t in takeovers],
        all_ended_after_ms=ms(max(f.arrived[-1] for f in followers) - term_at),
    )


# -- 5 and 6. Redis restarts under running tasks -------------------------------------------------


@dataclass
class Producer:
    """Publishes one task's events from this process with the core API, keeping every id an
    append returned (what the producer was told is stored)."""

    log: EventLog
    ref: TaskRef
    count: int
    acked: list[EventId] = field(default_factory=list)
    slowest_append: float = 0.0

    async def run(self) -> None:
        writer = self.log.writer(self.ref)
        for n in range(1, self.count + 1):
            await self._append(writer, "progress", {"n": n})
            await asyncio.sleep(0.02)
        await self._append(writer, "complete", {"message": "done"})

    async def _append(self, writer: Any, event_type: str, data: dict[str, Any]) -> None:
        began = time.monotonic()
        self.acked.append(await writer.append(event_type, data))
        self.slowest_append = max(self.slowest_append, time.monotonic() - began)


@pytest.mark.timeout(120)
async def test_redis_killed_with_aof_loses_no_acknowledged_event(tmp_path: Path) -> None:
    """kill -9 of an AOF redis-server (everysec) while 10 tasks publish, restarted on the same
    directory a second later: every acknowledged event survives, every client gets exact,
    contiguous sequences ending in one terminal event, with no reset."""
    server = RedisServer(tmp_path / "redis", extra=["--appendonly", "yes", "--appendfsync", "everysec"]).start()
    client = Redis(unix_socket_path=str(server.socket))
    producer_redis = Redis(unix_socket_path=str(server.socket))
    try:
        with project_on(tmp_path / "project", server.url) as project:
            gateway = project.gateway()
            # One worker: a lease longer than the outage, so nothing is taken over meanwhile.
            worker = project.worker("w", lease_seconds=10, worker_heartbeat_seconds=1)
            refs = create_tasks(project, "ProgressTask", 8, steps=40, delay=0.1)
            await register_models(client, KEYS, [("shop", "Job")])
            log = EventLog(producer_redis, Settings(redis_url=server.url))
            producers = [Producer(log, TaskRef("shop", "Job", str(n)), 200) for n in (1, 2)]
            for producer in producers:
                await log.declare(producer.ref)
            producing = [asyncio.create_task(p.run()) for p in producers]
            all_refs = refs + [p.ref for p in producers]
            followers, reading = follow(gateway, all_refs)
            await until(lambda: all(len(f.events) >= 5 for f in followers), 20, "every task to publish")
            acked_before = sum(len(p.acked) for p in producers)
            server.process.kill()  # type: ignore[union-attr]
            killed_at = time.monotonic()
            await asyncio.to_thread(server.process.wait, 10)  # type: ignore[union-attr]
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)
            back_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*producing), 60)
            await all_done(followers, reading)
            record_deliveries(tmp_path, {f.path: f.events for f in followers})
            record_acked(tmp_path, {p.ref.label: p.acked for p in producers})
            rows = await settled_rows(project, refs)

            problems: list[str] = []
            lost = 0
            for ref, f in zip(all_refs, followers, strict=True):
                events = await stream(client, ref)
                problems += [f"{ref}: client: {p}" for p in delivery_problems(f.events)]
                problems += [f"{ref}: stream: {p}" for p in stream_problems(events)]
                if "reset" in types(f.events):
                    problems.append(f"{ref}: the client got a reset")
                if as_received(f.events) != as_sent(events):
                    problems.append(f"{ref}: the client's events differ from the stream's")
            for producer in producers:
                stored = {e.id.decode() for e in await stream(client, producer.ref)}
                received = {e.id for e in followers[all_refs.index(producer.ref)].events}
                missing = [str(i) for i in producer.acked if str(i) not in stored or str(i) not in received]
                lost += len(missing)
                if missing:
                    problems.append(f"{producer.ref}: acknowledged but lost: {missing}")
                if [i.seq for i in producer.acked] != list(range(1, producer.count + 2)):
                    problems.append(f"{producer.ref}: acknowledged ids {[str(i) for i in producer.acked]}")
            problems += [f"{ref}: row {rows[ref]}" for ref in refs if rows[ref][0] != "completed"]
            assert not problems, "\n".join(problems)
            report(
                tmp_path, "5 kill -9 redis (AOF everysec)", tasks=len(all_refs),
                acked_by_producers=sum(len(p.acked) for p in producers), acked_before_kill=acked_before,
                lost=lost, outage_ms=ms(back_at - killed_at),
                slowest_append_ms=ms(max(p.slowest_append for p in producers)),
                clients_done_after_restart_ms=ms(max(f.arrived[-1] for f in followers) - back_at),
                client_reconnects=sum(len(f.statuses) - 1 for f in followers),
                worker_append_retries=len(log_lines(worker, "retrying in")),
            )
    finally:
        await client.aclose()
        await producer_redis.aclose()
        server.stop()


@pytest.mark.timeout(120)
async def test_redis_restarted_without_persistence_resets_every_client(tmp_path: Path) -> None:
    """A redis-server without persistence restarts mid-stream: the streams are gone, so every
    client gets ``reset`` (epoch) and then the new stream; none sees a silent gap, and every
    task still ends with a terminal event or a recorded failure."""
    server = RedisServer(tmp_path / "redis").start()
    client = Redis(unix_socket_path=str(server.socket))
    try:
        with project_on(tmp_path / "project", server.url) as project:
            gateway = project.gateway()
            # One worker, so no other can take a task over; a lease (10 s, renewed every 3.3 s)
            # longer than the outage, as in production (30 s by default).
            worker = project.worker("w", lease_seconds=10, worker_heartbeat_seconds=1)
            refs = create_tasks(project, "ProgressTask", 5, steps=40, delay=0.1)
            # Tasks of 4 s: a client still waiting after 25 s waits for a task that never ends.
            followers, reading = follow(gateway, refs, within=25)
            await until(lambda: all(len(f.events) >= 5 for f in followers), 20, "every task to publish")
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            back_at = time.monotonic()
            await asyncio.gather(*reading)
            record_deliveries(tmp_path, {f.path: f.events for f in followers})

            problems: list[str] = []
            for ref, f in zip(refs, followers, strict=True):
                problems += [f"{ref}: client: {p}" for p in delivery_problems(f.events) if f.done]
                resets = [payload(e) for e in f.events if e.event == "reset"]
                if len(resets) != 1 or resets[0]["reason"] not in ("lost", "epoch"):  # one reset, honest about why
                    problems.append(f"{ref}: resets {resets}")
                status, _ = row(project, ref)
                if not f.done and status != "failed":
                    task_state = await state(client, ref)
                    said = [line.split(" - ")[-1] for line in log_lines(worker, ref.label)]
                    problems.append(
                        f"{ref}: no terminal event and no recorded failure: client {f.describe()}; "
                        f"row {status!r}; Redis state {task_state}; worker log: {said}"
                    )
                if f.done:
                    events = await stream(client, ref)
                    problems += [f"{ref}: stream: {p}" for p in stream_problems(events)]
                    if as_received(f.events) != as_sent(events):
                        problems.append(f"{ref}: the client's events after the reset differ from the new stream")
            assert not problems, "\n".join(problems)
            report(
                tmp_path, "6 redis restart without persistence", tasks=len(refs),
                resets=sum(types(f.events).count("reset") for f in followers),
                clients_done_after_restart_ms=ms(max(f.arrived[-1] for f in followers) - back_at),
            )
    finally:
        await client.aclose()
        server.stop()


# -- 7. a zombie worker --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_paused_worker_cannot_write_after_its_task_was_taken_over(project: Project, redis: Redis, tmp_path: Path) -> None:
    """w1 is SIGSTOPped past its lease while running a RetryingProgressTask; w2 takes it over;
    SIGCONT: w1's run is fenced off (it writes nothing more) and stops; one terminal event."""
    steps = 30
    gateway = project.gateway()
    [ref] = create_tasks(project, "RetryingProgressTask", 1, steps=steps, delay=0.2)
    w1 = project.worker("w1", **FAST)
    [client], reading = follow(gateway, [ref])
    await until(lambda: len(client.events) >= 4, 15, "the task to be a few steps in on w1")
    first_run = await state(redis, ref)
    assert ran_on(w1, first_run)
    w2 = await asyncio.to_thread(project.worker, "w2", 20, **FAST)
    os.kill(w1.pid, signal.SIGSTOP)
    stopped_at, stopped_wall = time.monotonic(), datetime.now(UTC)
    try:
        taken_over = await until(lambda: _run_by(redis, ref, w2), 15, "w2 to take the task over")
        # What the zombie would do, done deterministically: append with the old run's token.
        zombie = EventLog(redis, Settings()).writer(ref, first_run["run"])
        with pytest.raises(WriterFenced):
            await zombie.append("progress", {"step": 999, "total_steps": steps})
        await asyncio.sleep(max(0.0, 5 - (time.monotonic() - stopped_at)))
    finally:
        os.kill(w1.pid, signal.SIGCONT)
    resumed_wall = datetime.now(UTC)
    await all_done([client], reading)
    said = await _wait_log(w1, ref, 10)
    rows = await settled_rows(project, [ref])
    record_deliveries(tmp_path, {client.path: client.events})

    events = await stream(redis, ref)
    assert delivery_problems(client.events) == []
    assert stream_problems(events) == [] and as_received(client.events) == as_sent(events)
    attempts = [n for n, e in enumerate(events) if e.type == b"attempt"]
    assert len(attempts) == 1, types(events)
    old, new = events[:attempts[0]], events[attempts[0] + 1:]
    assert check_broken_run(old) == []
    assert check_one_run(new, steps) == []  # nothing of the zombie's among the new run's events
    assert all(stamp(e) < stopped_wall for e in old)
    final = await state(redis, ref)
    assert ran_on(w2, final) and (final["state"], final["attempt"]) == ("completed", "2"), final
    assert rows[ref][0] == "completed"
    assert w1.process.poll() is None  # the zombie lives on, and let go of the task
    await until(lambda: _pending_is(redis, 0), 10, "the consumer group's pending list to empty")
    report(
        tmp_path, "7 zombie worker", paused_s=round((resumed_wall - stopped_wall).total_seconds(), 2),
        taken_over_after_ms=ms(taken_over), old_run_events=len(old), new_run_events=len(new),
        zombie_log=said,
    )


async def _run_by(redis: Redis, ref: TaskRef, worker: Gateway) -> bool:
    current = await state(redis, ref)
    return current.get("state") == "running" and ran_on(worker, current) and current.get("attempt") == "2"


async def _wait_log(worker: Gateway, ref: TaskRef, within: float) -> list[str]:
    """The zombie's own account of stopping the run: a lost lease or a fenced write."""
    def lines() -> list[str]:
        return [
            line for line in worker.log_text().splitlines()
            if ref.label in line and ("lost the lease" in line or "another worker owns it now" in line)
        ]
    await until(lines, within, f"{worker.log} to say it let go of {ref}")
    return lines()


# -- 8. a reconnect storm ------------------------------------------------------------------------------


@dataclass
class StormClient:
    """Reads a random number of events, drops the connection, reconnects with its last id;
    a few rounds, then reads to the end. Like streamcoord.client, it retries a 503 (gateway
    busy) with its last id, and reconnects when the gateway ends a response early."""

    socket: Path
    path: str
    rng: random.Random
    after: int = 0
    last_id: str | None = None
    events: list[SSEEvent] = field(default_factory=list)
    connects: int = 0
    statuses: list[int] = field(default_factory=list)
    cut_by_gateway: int = 0
    task: asyncio.Task[StormClient] | None = None

    async def run(self) -> StormClient:
        drops = self.rng.randint(2, 5)
        while True:
            headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
            client = await RawSSE.open(self.socket, self.path, headers)
            self.connects += 1
            try:
                await client.read_head()
                self.statuses.append(client.status)
                if client.status == 503:
                    await asyncio.sleep(0.1 + self.rng.random() * 0.2)
                    continue
                if client.status != 200:
                    return self
                budget = self.rng.randint(1, 150) if drops > 0 else -1
                while budget != 0:
                    event = await client.next_event()
                    if event is None:
                        self.cut_by_gateway += 1
                        break
                    self.events.append(event)
                    if event.id is not None:
                        self.last_id = event.id
                    if event.event in TERMINAL:
                        return self
                    budget -= 1
                else:
                    drops -= 1
            finally:
                client.writer.close()
                with contextlib.suppress(OSError):
                    await client.writer.wait_closed()
            await asyncio.sleep(self.rng.random() * 0.05)


def record_ids(directory: Path, clients: Sequence[StormClient]) -> None:
    """What each storm client received, as ids only (half a million events in all)."""
    with open(directory / "deliveries.jsonl", "w") as out:
        for n, client in enumerate(clients):
            out.write(json.dumps({"client": n, "after": client.after, "statuses": client.statuses,
                                  "ids": [e.id or e.event for e in client.events]}) + "\n")


#: The most Redis connections one gateway process holds (its reader and its pool), by design.
GATEWAY_REDIS_CONNECTIONS = 4


async def _gateway_footprint(gateway: Gateway, redis: Redis) -> dict[str, Any]:
    stats = await gateway_stats(gateway)
    return {
        "listeners": stats["listeners"], "asyncio_tasks": stats["asyncio_tasks"], "open_fds": stats["open_fds"],
        "redis_connections": gateway_redis_connections(await redis.client_list(), gateway.pid),
    }


@pytest.mark.timeout(180)
async def test_a_reconnect_storm_loses_and_repeats_nothing_and_leaks_nothing(
    gateway_factory: Any, event_log: EventLog, redis: Redis, tmp_path: Path
) -> None:
    """500 clients read a random number of events, drop, and reconnect with their last id,
    several rounds, while one task publishes 1000 events: no gaps, no duplicates; afterwards
    the gateway's tasks, descriptors, listeners and Redis connections are back at baseline."""
    gateway: Gateway = gateway_factory()
    job, warm = TaskRef("shop", "Job", "1"), TaskRef("shop", "Job", "2")
    await event_log.declare(job)
    # Warm-up: many clients at once, so the gateway's pools are at their working size.
    warm_writer = event_log.writer(warm)
    for n in range(5):
        await warm_writer.append("progress", {"n": n})
    await warm_writer.append("complete", {})
    warmers = [Follower(gateway.socket, "/stream/shop/Job/2") for _ in range(200)]
    await asyncio.gather(*(w.run(30) for w in warmers))
    assert all(w.done for w in warmers)
    await until(lambda: _listeners(gateway, 0), 15, "the warm-up clients to leave")
    await asyncio.sleep(0.5)
    baseline = await _gateway_footprint(gateway, redis)

    acked: list[EventId] = []
    count = 1000

    async def publish() -> None:
        writer = event_log.writer(job)
        for n in range(1, count + 1):
            acked.append(await writer.append("progress", {"n": n}))
            await asyncio.sleep(0.005)
        acked.append(await writer.append("complete", {"message": "done"}))

    rng = random.Random(20261129)
    began = time.monotonic()
    publishing = asyncio.create_task(publish())
    clients: list[StormClient] = []
    for n in range(500):
        client = StormClient(gateway.socket, "/stream/shop/Job/1", random.Random(rng.random()))
        if n % 2 and acked:  # half begin at a random id already published
            start = rng.choice(acked)
            client.after, client.last_id = start.seq, str(start)
        clients.append(client)
        client.task = asyncio.create_task(client.run())
        await asyncio.sleep(0.004)  # connect over ~2 s, while the task publishes
    await asyncio.wait_for(publishing, 60)
    await asyncio.wait_for(asyncio.gather(*(c.task for c in clients if c.task)), 90)
    storm_seconds = time.monotonic() - began

    gaps = duplicates = 0
    problems: list[str] = []
    expected_last = acked[-1].seq
    for n, client in enumerate(clients):
        found = delivery_problems(client.events, after=client.after)
        seqs = [e.seq for e in client.events if e.id is not None]
        duplicates += len(seqs) - len(set(seqs))
        gaps += len(set(range(client.after + 1, expected_last + 1)) - set(seqs))
        if found or client.statuses[-1] != 200:
            problems.append(f"client {n} (from {client.after}, statuses {client.statuses}): {found[:3]}")
    record_acked(tmp_path, {job.label: acked})
    record_ids(tmp_path, clients)
    # A client that already has the terminal event gets 204: nothing more to send.
    done_client = await RawSSE.open(gateway.socket, "/stream/shop/Job/1", {"Last-Event-ID": str(acked[-1])})
    await done_client.read_head()
    done_client.writer.close()
    await done_client.writer.wait_closed()
    assert done_client.status == 204

    def settled_to(footprint: dict[str, Any]) -> dict[str, Any]:
        """The footprint, with the Redis pool's growth taken out: the pool keeps connections it
        opened for concurrent reads (never more than the gateway's bound), and each is one fd."""
        grown = footprint["redis_connections"] - baseline["redis_connections"]
        if grown > 0 and footprint["redis_connections"] <= GATEWAY_REDIS_CONNECTIONS:
            return {**footprint, "redis_connections": baseline["redis_connections"],
                    "open_fds": footprint["open_fds"] - grown}
        return footprint

    async def back_to_baseline() -> bool:
        return settled_to(await _gateway_footprint(gateway, redis)) == baseline

    settled: float | None = None
    with contextlib.suppress(TimeoutError):
        settled = await until(back_to_baseline, 20, "the gateway to return to its baseline", interval=0.2)
    after = await _gateway_footprint(gateway, redis)
    log = gateway.log_text()
    report(
        tmp_path, "8 reconnect storm", clients=len(clients), connections=sum(c.connects for c in clients),
        events_published=len(acked), events_delivered=sum(len(c.events) for c in clients),
        gaps=gaps, duplicates=duplicates, storm_s=round(storm_seconds, 1),
        answered_503=sum(c.statuses.count(503) for c in clients),
        cut_by_gateway=sum(c.cut_by_gateway for c in clients),
        log_no_connection_available=log.count("No connection available"),
        log_task_destroyed_but_pending=log.count("Task was destroyed but it is pending"),
        baseline=baseline, after=after, back_to_baseline_ms=ms(settled) if settled is not None else None,
        gateway_stats=await gateway_stats(gateway),
    )
    assert not problems and gaps == 0 and duplicates == 0, "\n".join(problems[:20])
    assert settled_to(after) == baseline, f"the gateway did not return to its baseline within 20 s: baseline {baseline}, after {after}"


# -- 9. Redis memory is bounded by retention ---------------------------------------------------------


async def _memory(redis: Redis) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


@pytest.mark.timeout(120)
async def test_redis_memory_after_10000_finished_tasks_returns_to_baseline(tmp_path: Path) -> None:
    """10,000 tasks (start + complete each) with a 1 s stream and 2 s state retention: once the
    retention passes, their keys are gone and used_memory is back near where it started."""
    server = RedisServer(tmp_path / "redis").start()
    settings = Settings(redis_url=server.url, stream_ttl_seconds=1, state_ttl_seconds=2)
    # A bounded pool, as a producer process has: concurrent appends wait for a connection.
    redis = RedisFactory(settings).client("memory-test", max_connections=8)
    try:
        log = EventLog(redis, settings)

        async def one_task(ref: TaskRef) -> None:
            writer = log.writer(ref)
            await writer.append("start", {"total_steps": 1})
            await writer.append("complete", {"message": "done"}, final_value={"n": ref.pk})

        # Warm-up: the append script is loaded and cached before the baseline is taken.
        await one_task(TaskRef("shop", "Job", "warm-up"))
        await until(lambda: _dbsize_is(redis, 0), 15, "the warm-up task to expire")
        baseline = await _memory(redis)
        began = time.monotonic()
        count, batch = 10_000, 500
        for first in range(0, count, batch):
            await asyncio.gather(*(one_task(TaskRef("shop", "Job", str(n))) for n in range(first, first + batch)))
        published_s = time.monotonic() - began
        peak, peak_keys = await _memory(redis), int(await redis.dbsize())
        # Every key left is bound to expire (the earliest tasks' streams may be gone already).
        keys = [key async for key in redis.scan_iter(count=1000)]
        pipe = redis.pipeline(transaction=False)
        for key in keys:
            pipe.ttl(key)
        without_ttl = [key for key, ttl in zip(keys, await pipe.execute(), strict=True) if ttl == -1]  # -2: gone
        ttl_events = await redis.ttl(KEYS.events(TaskRef("shop", "Job", str(count - 1))))
        ttl_state = await redis.ttl(KEYS.state(TaskRef("shop", "Job", str(count - 1))))
        expired_after = await until(lambda: _dbsize_is(redis, 0), 20, "every task's keys to expire", interval=0.1)
        within = 2 * 1024 * 1024

        async def near_baseline() -> bool:
            return await _memory(redis) - baseline < within

        with contextlib.suppress(TimeoutError):
            await until(near_baseline, 15, "used_memory to return near its baseline", interval=0.2)
        final = await _memory(redis)
        report(
            tmp_path, "9 memory after retention", tasks=count, published_s=round(published_s, 1),
            keys_without_ttl=len(without_ttl),
            used_memory_baseline=baseline, used_memory_peak=peak, keys_at_peak=peak_keys,
            ttl_events_s=ttl_events, ttl_state_s=ttl_state,
            keys_gone_after_ms=ms(expired_after), used_memory_final=final,
            final_minus_baseline=final - baseline, peak_minus_baseline=peak - baseline,
        )
        assert without_ttl == [], without_ttl[:10]
        assert 0 < ttl_events <= 1 and 0 < ttl_state <= 2, (ttl_events, ttl_state)
        assert await redis.dbsize() == 0
        assert final - baseline < within, f"used_memory {final} is {final - baseline} bytes above its baseline {baseline}"
    finally:
        await redis.aclose()
        await redis.connection_pool.disconnect()  # a pool passed in is not closed by aclose()
        server.stop()


async def _dbsize_is(redis: Redis, count: int) -> bool:
    return int(await redis.dbsize()) == count


# -- the checker itself --------------------------------------------------------------------------------


def _events(*specs: str) -> list[SSEEvent]:
    """``"a-1 start"`` -> an event with that id and type; ``"reset"`` -> a reset."""
    out = []
    for spec in specs:
        if spec == "reset":
            out.append(SSEEvent(None, "reset", '{"reason":"epoch"}'))
        else:
            event_id, event_type = spec.split()
            out.append(SSEEvent(event_id, event_type, "{}"))
    return out


def test_the_checker_catches_gaps_duplicates_silent_epochs_and_missing_terminals() -> None:
    assert delivery_problems(_events("a-1 start", "a-2 progress", "a-3 complete")) == []
    assert delivery_problems(_events("a-5 progress", "a-6 complete"), after=4) == []
    assert delivery_problems(_events("a-1 start", "a-2 progress", "reset", "b-1 progress", "b-2 error")) == []
    assert delivery_problems(_events("a-1 start", "a-3 complete"))  # a gap
    assert delivery_problems(_events("a-1 start", "a-2 progress", "a-2 progress", "a-3 complete"))  # twice
    assert delivery_problems(_events("a-1 start", "b-2 complete"))  # another epoch, silently
    assert delivery_problems(_events("a-1 start", "b-1 complete"))  # another epoch, silently
    assert delivery_problems(_events("a-2 start", "a-3 complete"))  # the first event is missing
    assert delivery_problems(_events("a-1 start", "a-2 progress"))  # no terminal event
    assert delivery_problems(_events("a-1 complete", "a-2 error"))  # two terminal events
