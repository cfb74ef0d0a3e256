"""The ``streamcoord`` operator subcommands against real parts (issue 14, item 2).

* the tail's bookkeeping against a real redis-server: an epoch change, trimmed history, a start
  past the end, a task that is gone, events arriving live;
* every subcommand, text and ``--json``, on a running system of 2 workers and 2 gateways with
  tasks in every state, ``retry`` of a dead letter that then completes, and ``tail`` exact
  across a worker takeover (SIGKILL, short lease);
* listing on a 3-master Redis Cluster (SCAN on every master).

The commands run as the operator runs them: ``python -m streamcoord ...`` subprocesses with
only ``STREAMCOORD_REDIS_URL`` set, in a directory of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, Settings, TaskRef
from streamcoord.connection import RedisFactory
from streamcoord.jobs import Job, JobQueue
from streamcoord.keys import KeySpace
from streamcoord.ops.events import StreamEvent
from streamcoord.ops.tail import Reset, Stopped, StopReason, TailItem, follow
from streamcoord.registry import register_models
from streamcoord.resets import ResetReason

from .processes import REPO, Gateway, Project, RedisServer
from .topologies import Cluster
from .workloads import (
    Follower,
    append_progress,
    row,
    shell,
    state,
    stream,
    stream_path,
    until,
    worker_id,
)

pytestmark = pytest.mark.system

KEYS = KeySpace("sc")
REF = TaskRef("shop", "Job", "1")
LEASE = 2
#: Workers and gateways that beat every second and take a lost worker's task over within a lease.
FAST: dict[str, Any] = {"lease_seconds": LEASE, "worker_heartbeat_seconds": 1, "shutdown_grace_seconds": 2}


# -- running the command ---------------------------------------------------------------------


def command_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_", "COLUMNS"))}
    env["STREAMCOORD_REDIS_URL"] = url
    env["PYTHONPATH"] = str(REPO)
    return env


async def run_cli(url: str, cwd: Path, *args: str, expect: int = 0, within: float = 30) -> str:
    """``python -m streamcoord <args>`` to its end; its stdout (asserts the exit status)."""
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "streamcoord", *args], env=command_env(url), cwd=cwd,
        capture_output=True, text=True, timeout=within, check=False,
    )
    assert result.returncode == expect, f"streamcoord {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


async def cli_json(url: str, cwd: Path, *args: str, expect: int = 0) -> Any:
    return json.loads(await run_cli(url, cwd, *args, "--json", expect=expect))


@contextlib.asynccontextmanager
async def tail_process(url: str, cwd: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``streamcoord tail <args>`` running in the background; killed (by its pid) if it is
    still running when the block ends."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamcoord", "tail", *args, env=command_env(url), cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def tail_output(process: asyncio.subprocess.Process, within: float) -> tuple[int, list[dict[str, Any]]]:
    out, err = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    lines = out.decode().splitlines()
    assert all(line.startswith("{") for line in lines), (lines, err.decode())
    return process.returncode, [json.loads(line) for line in lines]


# -- the tail against a real redis-server ----------------------------------------------------


async def collect(redis: Redis, ref: TaskRef, within: float = 15, **kwargs: Any) -> list[TailItem]:
    items: list[TailItem] = []

    async def run() -> None:
        async for item in follow(redis, KEYS, ref, block_ms=100, **kwargs):
            items.append(item)

    await asyncio.wait_for(run(), within)
    return items


def seqs(items: list[TailItem]) -> list[int]:
    return [i.seq for i in items if isinstance(i, StreamEvent)]


async def test_the_tail_follows_live_events_to_the_end(redis: Redis, event_log: EventLog) -> None:
    await event_log.declare(REF)
    reading = asyncio.create_task(collect(redis, REF))
    await asyncio.sleep(0.3)  # the tail waits in XREAD for a stream not there yet
    for n in range(1, 6):
        await append_progress(event_log, REF, n, n)
        await asyncio.sleep(0.05)
    await event_log.writer(REF).append("complete", {"final_value": 5})
    items = await reading
    assert seqs(items) == [1, 2, 3, 4, 5, 6] and all(isinstance(i, StreamEvent) for i in items)
    assert [i.type for i in items if isinstance(i, StreamEvent)][-1] == "complete"


async def test_a_stream_started_anew_resets_the_tail(redis: Redis, event_log: EventLog) -> None:
    """Redis lost the stream under the tail (a restart without persistence): the writer starts
    a new epoch from 1, and the tail says reset and gives the new stream from its start."""
    await append_progress(event_log, REF, 1, 3)
    first_epoch = (await state(redis, REF))["epoch"]
    items: list[TailItem] = []

    async def run() -> None:
        async for item in follow(redis, KEYS, REF, block_ms=100):
            items.append(item)

    reading = asyncio.create_task(asyncio.wait_for(run(), 15))
    await until(lambda: len(items) == 3, 5, "the first three events")
    await redis.delete(KEYS.events(REF))
    writer = event_log.writer(REF)
    await writer.append("progress", {"step": "new"})
    await writer.append("complete", {"final_value": None})
    await reading
    new_epoch = (await state(redis, REF))["epoch"]
    assert new_epoch != first_epoch
    assert items[3] == Reset(ResetReason.EPOCH, first_epoch, new_epoch)
    assert seqs(items) == [1, 2, 3, 1, 2] and len(items) == 6
    assert {i.epoch for i in items[4:] if isinstance(i, StreamEvent)} == {new_epoch}


async def test_trimmed_history_is_told_and_from_starts_later(redis: Redis, settings: Settings) -> None:
    short = EventLog(redis, Settings(redis_url=settings.redis_url, max_stream_length=5))
    await append_progress(short, REF, 1, 10, complete=True)  # 11 events; 7..11 kept
    items = await collect(redis, REF)
    epoch = (await state(redis, REF))["epoch"]
    assert items[0] == Reset(ResetReason.TRIMMED, "", epoch, (1, 6)) and seqs(items) == [7, 8, 9, 10, 11]
    assert seqs(await collect(redis, REF, from_seq=9)) == [9, 10, 11]
    assert await collect(redis, REF, from_seq=20) == [Stopped(StopReason.PAST_END, "completed", 11)]


async def test_a_task_redis_does_not_know_stops_the_tail(redis: Redis) -> None:
    assert await collect(redis, TaskRef("shop", "Job", "404")) == [Stopped(StopReason.GONE, "")]


async def test_the_commands_on_one_task_without_workers(redis: Redis, redis_server: RedisServer, event_log: EventLog,
                                                        tmp_path: Path) -> None:
    """show, tail, cancel, retry of tasks written straight through the core (no Django)."""
    url = redis_server.url
    await append_progress(event_log, REF, 1, 3, complete=True)
    shown = await cli_json(url, tmp_path, "show", "Job:1")  # a bare model name no two apps share
    assert shown["task"] == "shop.Job:1" and shown["record"]["state"] == "completed"
    assert [e["seq"] for e in shown["events"]] == [1, 2, 3, 4] and shown["stream"]["length"] == 4
    text = await run_cli(url, tmp_path, "tail", "shop.Job:1")
    assert [line.split()[1] for line in text.splitlines()] == ["progress"] * 3 + ["complete"]
    await run_cli(url, tmp_path, "show", "Report:1", expect=2)  # two apps have a Report
    await run_cli(url, tmp_path, "show", "shop.Job:404", expect=1)
    assert "nothing to cancel: the task is completed" in await run_cli(url, tmp_path, "cancel", "shop.Job:1", expect=1)
    retried = await cli_json(url, tmp_path, "retry", "shop.Job:1")
    assert (retried["renewed"], retried["state_before"], retried["queued"]) == (True, "completed", True)
    assert (await state(redis, REF))["state"] == "queued" and not await redis.exists(KEYS.events(REF))
    cancelled = await cli_json(url, tmp_path, "cancel", "shop.Job:1")
    assert (cancelled["state_before"], cancelled["cancelled"]) == ("queued", True)
    assert "claims its job records the row cancelled" in cancelled["row"]
    ended = await run_cli(url, tmp_path, "tail", "shop.Job:1", "--json")
    assert [json.loads(line)["type"] for line in ended.splitlines()] == ["cancelled"]


#: The command as a terminal runs it: SIGINT raises KeyboardInterrupt (a process started in the
#: background by a non-interactive shell inherits SIGINT ignored, as this test's may).
AS_IN_A_TERMINAL = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from streamcoord.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(("args", "status"), [(["top", "--interval", "0.2"], 0), (["tail", "shop.Job:1"], 130)])
async def test_ctrl_c_quits(args: list[str], status: int, redis: Redis, redis_server: RedisServer, event_log: EventLog,
                            tmp_path: Path) -> None:
    """Ctrl-C is how top is meant to end (status 0); it interrupts a tail (130)."""
    await append_progress(event_log, REF, 1, 2)  # a task that runs on: the tail waits for more
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AS_IN_A_TERMINAL, *args, env=command_env(redis_server.url), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readline(), 15)  # it has shown something
        assert first.strip(), first
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == status, (out, err)
        assert b"Traceback" not in err, err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- the whole system ------------------------------------------------------------------------


def create_rows(project: Project, specs: dict[str, tuple[str, dict[str, Any], bool]]) -> dict[str, TaskRef]:
    """Rows made (and started) in one ``manage.py shell``: name -> ref."""
    code = "import json\nfrom django_app.coordinator import coordinator, find_model\nout = {}\n"
    for name, (model, fields, start) in specs.items():
        code += f"t = find_model({model!r}).objects.create(**{fields!r})\n"
        code += "coordinator.start_task_sync(t)\n" if start else ""
        code += f"out[{name!r}] = t.pk\n"
    ids = json.loads(shell(project, code + "print(json.dumps(out))"))
    return {name: TaskRef("examples", specs[name][0], str(pk)) for name, pk in ids.items()}


async def states_of(redis: Redis, refs: dict[str, TaskRef]) -> dict[str, dict[str, str]]:
    return {name: await state(redis, ref) for name, ref in refs.items()}


def gateway_of(project: Project, name: str) -> Gateway:
    return project.gateway(name, **FAST)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_every_subcommand_on_a_running_system(
    project: Project, redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    url, cwd = redis_server.url, tmp_path
    gateways = [gateway_of(project, "gw0"), gateway_of(project, "gw1")]
    worker_a = project.worker("wa", concurrency=8, **FAST)
    a = worker_id(worker_a)
    refs = create_rows(project, {
        "retrying": ("RetryingProgressTask", {"steps": 200, "delay": 0.05}, True),  # runs until worker a is killed
        "lost": ("ProgressTask", {"steps": 600, "delay": 0.1}, True),
        "running_cancel": ("ProgressTask", {"steps": 600, "delay": 0.1}, True),
        "completed": ("ProgressTask", {"steps": 2, "delay": 0}, True),
        "failed": ("ProgressTask", {"steps": 3, "delay": 0, "fail_at": 2}, True),
        "pending": ("ProgressTask", {"steps": 2, "delay": 0}, False),
        "pending_cancel": ("ProgressTask", {"steps": 2, "delay": 0}, False),
    })
    async with tail_process(url, cwd, refs["retrying"].label, "--json") as takeover_tail:
        async def first_phase() -> bool:
            now = await states_of(redis, refs)
            return (
                all(now[n].get("state") == "running" and now[n].get("worker") == a for n in ("retrying", "lost", "running_cancel"))
                and now["completed"].get("state") == "completed" and now["failed"].get("state") == "failed"
                and int(now["retrying"].get("last_seq", 0)) >= 5
            )

        await until(first_phase, 30, "the first tasks to run on worker a, end, or fail")

        # cancel: a running task (its worker records the row), a pending one (the row stays)
        cancelled = await cli_json(url, cwd, "cancel", refs["running_cancel"].label)
        assert (cancelled["state_before"], cancelled["worker"], cancelled["cancelled"]) == ("running", a, False)
        assert "its worker records the row cancelled" in cancelled["row"]
        text = await run_cli(url, cwd, "cancel", refs["pending_cancel"].label)
        assert "cancelled before it started" in text and "still says pending" in text
        await until(lambda: row(project, refs["running_cancel"])[0] == "cancelled", 10, "the worker to record the cancel")

        # the takeover: worker b is there when a dies; b re-runs "retrying" and gives up on "lost"
        worker_b = project.worker("wb", concurrency=1, **FAST)
        b = worker_id(worker_b)
        os.kill(worker_a.pid, signal.SIGKILL)
        worker_a.process.wait(10)
        code, lines = await tail_output(takeover_tail, 60)

    # tail, exact across the takeover: every event once, in order, one epoch, as Redis holds it
    assert code == 0, lines
    events = await stream(redis, refs["retrying"])
    assert [(line["id"], line["type"], line["data"]) for line in lines] == [
        (e.id.decode(), e.type.decode(), json.loads(e.data)) for e in events
    ]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1)) and len({line["epoch"] for line in lines}) == 1
    attempts = [line["data"]["attempt"] for line in lines if line["type"] == "attempt"]
    assert attempts == [2] and lines[-1]["type"] == "complete" and not any("reset" in line for line in lines)
    assert (await state(redis, refs["retrying"]))["worker"] == b

    # dead letter: "lost" had one attempt (ProgressTask), its worker died: WorkerLost
    await until(lambda: row(project, refs["lost"])[0] == "failed", 20, "the lost task to be given up")
    worker_c = project.worker("wc", concurrency=1, **FAST)
    c = worker_id(worker_c)
    busy = create_rows(project, {f"long{n}": ("ProgressTask", {"steps": 600, "delay": 0.1}, True) for n in range(3)})

    async def settled() -> bool:
        now = sorted(s.get("state", "") for s in (await states_of(redis, busy)).values())
        status = await cli_json(url, cwd, "status")
        return now == ["queued", "running", "running"] and {w["id"] for w in status["workers"]} == {b, c} and len(
            status["gateways"]) == 2
    await until(settled, 30, "two long tasks running on b and c, one queued, worker a forgotten", interval=0.5)
    now = await states_of(redis, busy)
    queued = next(busy[n] for n, s in now.items() if s["state"] == "queued")
    running = sorted((busy[n] for n, s in now.items() if s["state"] == "running"), key=str)
    watcher = Follower(gateways[0].socket, stream_path(running[1]))
    watching = asyncio.create_task(watcher.run(120))
    await until(lambda: watcher.events, 10, "a client of a running task on gateway 0")
    await asyncio.sleep(1.5)  # gateway 0's next heartbeat counts it

    # status: every part, every state
    status = await cli_json(url, cwd, "status")
    assert status["tasks"]["by_state"] == {
        "pending": 1, "queued": 1, "running": 2, "cancelling": 0, "completed": 2, "failed": 2, "cancelled": 2,
    }, status["tasks"]
    assert {r["task"]: r["worker"] for r in status["tasks"]["running"]}.keys() == {r.label for r in running}
    assert {r["worker"] for r in status["tasks"]["running"]} == {b, c}
    assert all(r["state"] == "running" and r["attempt"] == 1 and r["last_seq"] >= 1 for r in status["tasks"]["running"])
    assert (status["queue"]["length"], status["queue"]["pending"], status["queue"]["lag"]) == (3, 2, 1), status["queue"]
    assert status["queue"]["oldest_age_seconds"] is not None
    assert sorted((w["id"], w["pid"], w["running"], w["concurrency"]) for w in status["workers"]) == sorted(
        [(b, worker_b.pid, 1, 1), (c, worker_c.pid, 1, 1)]
    )
    # Seconds on the Redis clock (not ms, never negative); a live worker beats every second.
    assert all(0 <= w["heartbeat_age_seconds"] < 60 for w in status["workers"])
    assert sorted(g["pid"] for g in status["gateways"]) == sorted(g.pid for g in gateways)
    serving = {g["pid"]: g for g in status["gateways"]}[gateways[0].pid]
    assert serving["listeners"] >= 1 and serving["streams"] >= 1 and serving["address"], serving
    assert status["dead_letters"]["count"] == 1
    [letter] = status["dead_letters"]["latest"]
    assert (letter["task"], letter["attempts"], letter["reason"]) == (refs["lost"].label, 1, "WorkerLost")
    text = await run_cli(url, cwd, "status")
    for expected in ("workers (2)", "gateways (2)", b, c, refs["lost"].label, "waiting 1", "claimed 2",
                     "pending 1", "queued 1", "running 2", "completed 2", "failed 2", "cancelled 2", *map(str, running)):
        assert expected in text, (expected, text)

    # tasks: all, filtered by state and by model, limited
    listing = await cli_json(url, cwd, "tasks")
    every = {**refs, **busy}
    assert listing["matched"] == listing["scanned"] == len(every) == 10
    assert {t["task"] for t in listing["tasks"]} == {r.label for r in every.values()}
    failed = await cli_json(url, cwd, "tasks", "--state", "failed")
    assert {t["task"] for t in failed["tasks"]} == {refs["failed"].label, refs["lost"].label}
    retrying = await cli_json(url, cwd, "tasks", "--model", "retryingprogresstask")
    assert [(t["task"], t["state"], t["attempt"], t["worker"]) for t in retrying["tasks"]] == [
        (refs["retrying"].label, "completed", 2, b)
    ]
    assert len((await cli_json(url, cwd, "tasks", "--limit", "3"))["tasks"]) == 3
    text = await run_cli(url, cwd, "tasks", "--state", "running,queued")
    assert "3 shown of 3 matching (10 in Redis)" in text and str(queued) in text and all(str(r) in text for r in running)

    # show: the record and latest events, of the task taken over and of the dead letter
    shown = await cli_json(url, cwd, "show", refs["retrying"].label, "--events", "5")
    assert (shown["record"]["state"], shown["record"]["attempt"], shown["record"]["worker"]) == ("completed", 2, b)
    assert [e["seq"] for e in shown["events"]] == list(range(len(lines) - 4, len(lines) + 1))
    text = await run_cli(url, cwd, "show", refs["lost"].label)
    assert "failed" in text and "WorkerLost" in text and "latest events" in text

    # tail --from: the history from an event on, to the end
    from_five = await run_cli(url, cwd, "tail", refs["retrying"].label, "--from", "5")
    assert [line.split()[0] for line in from_five.splitlines()] == [line["id"] for line in lines[4:]]

    # cancel: the queued task (the worker that claims its job records the row cancelled)
    text = await run_cli(url, cwd, "cancel", str(queued))
    assert "cancelled before it started" in text and "claims its job records the row cancelled" in text
    told = await cli_json(url, cwd, "cancel", str(running[0]))
    assert told["state_before"] == "running" and told["worker"] in (b, c)
    await until(lambda: row(project, running[0])[0] == "cancelled", 15, "the cancelled task's row")
    await until(lambda: _queue_length(redis, 1), 15, "the cancelled queued task's job to be dropped")
    await until(lambda: row(project, queued)[0] == "cancelled", 15, "the claiming worker to record the row")
    assert row(project, refs["pending_cancel"])[0] == "pending"  # no job: no worker ever sees it
    await run_cli(url, cwd, "cancel", refs["failed"].label, expect=1)

    # retry: the dead letter (its row fixed first) runs again and completes, on a new epoch
    old_epoch = (await state(redis, refs["lost"]))["epoch"]
    shell(project, f"from django_app.examples.models import ProgressTask\n"
                   f"print(ProgressTask.objects.filter(pk={refs['lost'].pk}).update(steps=3, delay=0.05))")
    text = await run_cli(url, cwd, "retry", refs["lost"].label)
    assert "retried: the failed task is queued as a new run of the same stream" in text, text
    assert "the worker then records it running" in text
    # Followed from the retry on (a tail started before it could read the old run to its end
    # first): the old stream is gone, so it has the new run's events, whenever it starts.
    async with tail_process(url, cwd, refs["lost"].label, "--json") as retried_tail:
        code, retried_lines = await tail_output(retried_tail, 30)
    await until(lambda: row(project, refs["lost"])[0] == "completed", 15, "the worker to record the retried run")
    after = await state(redis, refs["lost"])
    # The worker records the new run on the row (running, the old error cleared, then completed).
    assert row(project, refs["lost"])[1] == "", row(project, refs["lost"])
    assert code == 0 and [line["type"] for line in retried_lines] == ["start", "progress", "progress", "progress", "complete"]
    assert (after["state"], after["attempt"]) == ("completed", "1") and after["epoch"] != old_epoch
    assert {line["epoch"] for line in retried_lines} == {after["epoch"]}
    retried = await cli_json(url, cwd, "retry", refs["completed"].label)
    assert (retried["renewed"], retried["state_before"], retried["queued"]) == (True, "completed", True)
    await until(lambda: row(project, refs["completed"])[0] == "completed" and _state_is(redis, refs["completed"], "completed"),
                15, "the retried completed task to complete again")
    assert "not retried: the task is running" in await run_cli(url, cwd, "retry", str(running[1]), expect=1)

    # top: renders without a terminal, once per refresh; --json gives one document a line
    text = await run_cli(url, cwd, "top", "--interval", "0.2", "--iterations", "2")
    assert text.count("workers (2)") == 2 and text.count("gateways (2)") == 2
    [line] = (await run_cli(url, cwd, "top", "--json", "--iterations", "1")).splitlines()
    assert set(json.loads(line)) == {"at", "queue", "workers", "gateways", "dead_letters", "tasks"}

    await run_cli(url, cwd, "cancel", str(running[1]))
    await watching
    assert watcher.done and watcher.events[-1].event == "cancelled"


async def _queue_length(redis: Redis, length: int) -> bool:
    return int(await redis.xlen(KEYS.jobs())) == length


async def _state_is(redis: Redis, ref: TaskRef, expected: str) -> bool:
    return (await state(redis, ref)).get("state") == expected


# -- a cluster -------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_listing_finds_the_tasks_of_every_master(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster").start()
    try:
        settings = Settings(redis_url=cluster.url)
        factory = RedisFactory(settings)
        client = factory.client("test")
        await factory.ready(client)
        try:
            await register_models(client, KEYS, [("shop", "Job")])
            log, queue = EventLog(client, settings), JobQueue(client, KEYS)
            refs = [TaskRef("shop", "Job", str(n)) for n in range(1, 31)]
            from redis.crc import key_slot

            owners = cluster.slot_owners()
            assert len({owners[key_slot(KEYS.state(ref).encode())] for ref in refs}) == 3  # on every master
            for ref in refs[:10]:
                await log.declare(ref)
            for ref in refs[10:20]:
                await append_progress(log, ref, 1, 2, complete=True)
            for ref in refs[20:]:
                await queue.start(ref)
            await queue.dead_letter(Job("1-0", refs[10]), 1, "WorkerLost")
        finally:
            await client.aclose()
        url, cwd = cluster.url, tmp_path
        status = await cli_json(url, cwd, "status")
        assert {k: v for k, v in status["tasks"]["by_state"].items() if v} == {"pending": 10, "completed": 10, "queued": 10}
        assert (status["queue"]["length"], status["queue"]["lag"], status["dead_letters"]["count"]) == (10, 10, 1)
        listing = await cli_json(url, cwd, "tasks", "--limit", "100")
        assert listing["matched"] == 30 and {t["task"] for t in listing["tasks"]} == {r.label for r in refs}
        text = await run_cli(url, cwd, "tail", refs[15].label)
        assert [line.split()[1] for line in text.splitlines()] == ["progress", "progress", "complete"]
        assert (await cli_json(url, cwd, "retry", refs[15].label))["queued"] is True
        assert (await cli_json(url, cwd, "cancel", refs[15].label))["cancelled"] is True
        assert (await cli_json(url, cwd, "show", refs[15].label))["record"]["state"] == "cancelled"
    finally:
        cluster.stop()
