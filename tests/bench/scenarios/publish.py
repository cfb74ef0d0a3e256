"""publish: events per second from one worker process, against raw XADD and redis-benchmark.

What it measures
    The cost of ``send_event`` (``TaskWriter.append``: one atomic append script per event, run
    by the process's batching publisher) next to what Redis does with plain XADDs:

    - ``streamcoord``, awaited: one task appends N events one after another, awaiting each
      (events/s, per-append p50/p99 in µs);
    - ``streamcoord``, 100 tasks: 100 tasks of one process append in a loop at once, so the
      publisher pipelines their appends (events/s in total, events per round trip);
    - ``raw redis-py XADD (awaited)`` and ``(pipelined 100)``: ``redis.asyncio`` (hiredis) on
      the same unix socket, each entry the very fields the append script writes (``epoch``,
      ``type``, ``data`` with the same encoded JSON), no trimming, no state record;
    - ``redis-benchmark XADD``: Redis's own C client, 50 connections, with ``-P 16`` and
      without: the ceiling of this Redis on this machine.

    The ratios the targets use are in the streamcoord rows: ``cost_vs_raw_awaited_x`` (mean
    time of one awaited append over one awaited raw XADD; target <= 1.5) and
    ``share_of_raw_pipelined`` (100-task events/s over pipelined raw XADD events/s; target >=
    0.55, and >= 50k events/s absolute).

How
    ``run`` starts a redis-server on a unix socket, then this module as a child process
    (``python -m tests.bench.scenarios.publish --child ...``: the "worker process", on uvloop
    as workers run) which makes every redis-py measurement, interleaved over a few rounds,
    and prints them as JSON; the suite process only waits. The CPU of the child and of
    redis-server over each measurement comes from /proc. redis-benchmark runs after it.

Run alone: ``.venv/bin/python -m tests.bench.scenarios.publish [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO
from unittest import mock

from . import Context, Row

SCENARIO = "publish"
#: Concurrent tasks in the batched measurement, and the raw pipeline's batch size.
TASKS = 100
BATCH = 100
#: Hard limits, in seconds, of the measuring child and of one redis-benchmark run.
CHILD_LIMIT = {True: 60.0, False: 240.0}
BENCHMARK_LIMIT = 60.0


# -- stand-ins for tests/bench/procs.py (to be replaced by it; dispatch and scale use these) ---

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def host_busy_seconds() -> float:
    """CPU time all cores of this machine spent busy (not idle, not waiting for I/O) so far."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS  # user..steal minus idle, iowait


def open_log(path: Path) -> BinaryIO:
    """A log file for a child's output (the child gets the descriptor; we close ours)."""
    return open(path, "wb")


def log_tail(path: Path, chars: int | None = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if chars is None else text[-chars:]


def make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


class Proc:
    """A process this scenario started; its stdout and stderr go to a log file. Stopped by its
    own pid only (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: list[str],
        log: Path,
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        track: list[Proc] | None = None,
    ) -> Proc:
        """Start ``argv``. ``track`` gets the new process at once, so whoever stops that list
        stops it too, even when the start is cancelled before it returns."""
        with open_log(log) as out:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        proc = cls(name, process, log)
        if track is not None:
            track.append(proc)
        return proc

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_text(self, tail: int = 3000) -> str:
        return log_tail(self.log, tail)

    async def wait_for_log(self, marker: str, seconds: float) -> None:
        """Until ``marker`` appears in the log. If the process exits first, ``seconds`` pass or
        the caller is cancelled, the process is stopped (nobody else holds it yet)."""
        deadline = time.monotonic() + seconds
        try:
            while marker not in log_tail(self.log, None):
                if not self.running:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no {marker!r} within {seconds:g}s:\n{self.log_text()}")
                await asyncio.sleep(0.02)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds, or at once if we are cancelled while
        waiting (the process never outlives a cancelled cleanup)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                self.kill()
                await self.process.wait()
            except asyncio.CancelledError:
                self.kill()
                raise

    def kill(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


async def stop_all(procs: list[Proc]) -> None:
    """Stop processes we started, in reverse order of their start, each by its pid. Cancelled
    meanwhile, it kills the ones left at once (SIGKILL) and re-raises."""
    for index in range(len(procs) - 1, -1, -1):
        try:
            await procs[index].stop()
        except asyncio.CancelledError:
            for proc in procs[:index]:
                proc.kill()
            raise


async def start_redis(directory: Path, track: list[Proc] | None = None) -> Proc:
    """A redis-server of our own on ``directory/redis.sock`` (``--port 0``: no TCP at all), no
    persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    make_dir(directory)
    argv = [
        binary, "--port", "0", "--unixsocket", str(directory / "redis.sock"),
        "--unixsocketperm", "700", "--dir", str(directory), "--save", "", "--appendonly", "no",
    ]
    proc = await Proc.spawn("redis-server", argv, directory / "redis.log", cwd=directory, track=track)
    # "Ready to accept connections" (7.x) or "The server is now ready to accept connections".
    await proc.wait_for_log("eady to accept connections", 10)
    return proc


async def run_json_child(
    name: str,
    argv: list[str],
    log: Path,
    *,
    cwd: Path,
    env: dict[str, str] | None,
    seconds: float,
    pids: dict[str, int] | None = None,
) -> Any:
    """Run a child that prints one JSON document on stdout (stderr goes to ``log``); killed by
    its pid when ``seconds`` pass or the caller is cancelled. Its pid goes into ``pids[name]``
    while it runs (for CPU sampling)."""
    with open_log(log) as err:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=err,
        )
    if pids is not None:
        pids[name] = process.pid
    try:
        out, _ = await asyncio.wait_for(process.communicate(), seconds)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_tail(log)}")
    return json.loads(out)


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# -- the measuring child (the "worker process") --------------------------------------------------


def payload(step: int, total: int) -> dict[str, Any]:
    """A small progress payload: about 70 bytes of JSON."""
    return {"step": step, "total_steps": total, "message": f"processed batch {step:06d} of the job"}


class Meter:
    """CPU of this process and of redis-server over one measurement, and its wall time."""

    def __init__(self, redis_pid: int) -> None:
        self.redis_pid = redis_pid
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.redis_cpu = proc_cpu_seconds(redis_pid)
        self.host = host_busy_seconds()

    def done(self, events: int) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        redis_now = proc_cpu_seconds(self.redis_pid)
        redis_cpu = redis_now - self.redis_cpu if redis_now is not None and self.redis_cpu is not None else None
        others = host_busy_seconds() - self.host - cpu - (redis_cpu or 0.0)
        return {
            "events": events,
            "seconds": wall,
            "events_per_s": events / wall,
            "worker_cpu_pct": 100 * cpu / wall,
            "redis_cpu_pct": 100 * redis_cpu / wall if redis_cpu is not None else None,
            # Busy CPU of everything else on this shared machine, in % of one core.
            "other_cpu_pct": max(0.0, 100 * others / wall),
        }


def latency_summary(samples_ns: list[int]) -> dict[str, Any]:
    ordered = sorted(samples_ns)
    p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
    return {
        "p50_us": p50 / 1000 if p50 is not None else None,
        "p99_us": p99 / 1000 if p99 is not None else None,
        "mean_us": statistics.fmean(ordered) / 1000 if ordered else None,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from redis.asyncio import Redis

    from streamcoord.codec import DataEncoder
    from streamcoord.connection import RedisFactory
    from streamcoord.eventlog import EventLog
    from streamcoord.keys import TaskRef
    from streamcoord.publisher import APPEND_SCRIPT
    from streamcoord.settings import Settings

    settings = Settings(redis_url=f"unix://{args.redis_socket}")
    # The worker's own client (BlockingConnectionPool, 8 connections), as in worker/runner.py.
    sc_redis = RedisFactory(settings).client("worker", max_connections=8)
    raw = Redis(unix_socket_path=args.redis_socket)
    log = EventLog(sc_redis, settings)
    refs = (TaskRef("bench", "Publish", str(pk)) for pk in range(1, 1_000_000))
    sample_data = DataEncoder(TaskRef("bench", "Publish", "1"), settings.max_payload_bytes).encode(
        "progress", payload(1, args.events)
    )
    fields: dict[Any, Any] = {"epoch": "3f9a02bc", "type": "progress", "data": sample_data}
    results: dict[str, list[dict[str, Any]]] = {
        "sc_awaited": [], "sc_tasks": [], "raw_awaited": [], "raw_pipelined": [],
        "script_awaited": [], "script_pipelined": [],
    }
    sha = await raw.script_load(APPEND_SCRIPT)
    # The script's arguments exactly as the publisher sends one append (whatever they are
    # today): the call's common arguments, then the event's; the sequence is set per call.
    with mock.patch.object(log.publisher, "_call", wraps=log.publisher._call) as spy:
        await log.writer(next(refs)).append("progress", payload(1, args.events))
    common, appends = spy.call_args.args
    event_args = list(appends[0][1])

    def script_args(ref: TaskRef, seq: int) -> list[Any]:
        event = event_args.copy()
        event[1] = seq
        return [2, log.keys.events(ref), log.keys.state(ref), *common, *event]

    async def sc_awaited() -> dict[str, Any]:
        warm = log.writer(next(refs))
        for i in range(1, 201):  # warm-up: script loaded, connections open
            await warm.append("progress", payload(i, args.events))
        writer = log.writer(next(refs))
        await writer.append("start", {"total_steps": args.events})  # opens its epoch
        samples: list[int] = []
        clock = time.perf_counter_ns
        meter = Meter(args.redis_pid)
        for i in range(1, args.events + 1):
            began = clock()
            await writer.append("progress", payload(i, args.events))
            samples.append(clock() - began)
        return {**meter.done(args.events), **latency_summary(samples)}

    async def sc_tasks() -> dict[str, Any]:
        writers = [log.writer(next(refs)) for _ in range(args.tasks)]
        await asyncio.gather(*(w.append("start", {"total_steps": args.per_task}) for w in writers))

        async def loop(writer: Any) -> None:
            for i in range(1, args.per_task + 1):
                await writer.append("progress", payload(i, args.per_task))

        batches = log.publisher.batches
        meter = Meter(args.redis_pid)
        await asyncio.gather(*(loop(w) for w in writers))
        events = args.tasks * args.per_task
        result = meter.done(events)
        result["events_per_round_trip"] = events / max(1, log.publisher.batches - batches)
        return result

    async def raw_awaited() -> dict[str, Any]:
        key = f"raw-awaited-{time.monotonic_ns()}"
        for _ in range(200):
            await raw.xadd(key, fields)
        samples: list[int] = []
        clock = time.perf_counter_ns
        meter = Meter(args.redis_pid)
        for _ in range(args.events):
            began = clock()
            await raw.xadd(key, fields)
            samples.append(clock() - began)
        result = {**meter.done(args.events), **latency_summary(samples)}
        await raw.delete(key)
        return result

    async def raw_pipelined() -> dict[str, Any]:
        key = f"raw-pipelined-{time.monotonic_ns()}"
        batches = max(1, args.tasks * args.per_task // args.batch)
        meter = Meter(args.redis_pid)
        for _ in range(batches):
            pipe = raw.pipeline(transaction=False)
            for _ in range(args.batch):
                pipe.xadd(key, fields)
            await pipe.execute()
        result = meter.done(batches * args.batch)
        await raw.delete(key)
        return result

    async def script_awaited() -> dict[str, Any]:
        ref = next(refs)
        for seq in range(1, 201):
            await raw.evalsha(sha, *script_args(ref, seq))
        ref = next(refs)
        samples: list[int] = []
        clock = time.perf_counter_ns
        meter = Meter(args.redis_pid)
        for seq in range(1, args.events + 1):
            call = script_args(ref, seq)
            began = clock()
            await raw.evalsha(sha, *call)
            samples.append(clock() - began)
        return {**meter.done(args.events), **latency_summary(samples)}

    async def script_pipelined() -> dict[str, Any]:
        task_refs = [next(refs) for _ in range(args.batch)]
        meter = Meter(args.redis_pid)
        for seq in range(1, args.tasks * args.per_task // args.batch + 1):
            pipe = raw.pipeline(transaction=False)
            for ref in task_refs:
                pipe.evalsha(sha, *script_args(ref, seq))
            await pipe.execute()
        return meter.done(args.tasks * args.per_task // args.batch * args.batch)

    try:
        for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits all alike
            results["sc_awaited"].append(await sc_awaited())
            results["raw_awaited"].append(await raw_awaited())
            results["script_awaited"].append(await script_awaited())
            results["sc_tasks"].append(await sc_tasks())
            results["raw_pipelined"].append(await raw_pipelined())
            results["script_pipelined"].append(await script_pipelined())
            await sc_redis.flushdb()
    finally:
        await sc_redis.aclose()
        await raw.aclose()
    return {"payload_bytes": len(json.dumps(payload(1, args.events), separators=(",", ":"))),
            "data_bytes": len(sample_data), "rounds": results}


def child_main(args: argparse.Namespace) -> int:
    from streamcoord import runtime

    result = runtime.run(measure(args))  # uvloop, as the worker runs
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    return 0


# -- the suite side --------------------------------------------------------------------------


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


async def redis_benchmark(
    socket_path: Path, requests: int, pipeline: int, fields: list[str], workdir: Path
) -> dict[str, Any]:
    """One ``redis-benchmark -s ... XADD <key> * <fields>`` run; its CSV line parsed."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"events_per_s": None, "error": "redis-benchmark is not installed"}
    key = f"rb-{pipeline}-{time.monotonic_ns()}"
    argv = [binary, "-s", str(socket_path), "-n", str(requests), "-c", "50", "-P", str(pipeline),
            "--csv", "XADD", key, "*", *fields]
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=workdir, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), BENCHMARK_LIMIT)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    rows = list(csv.DictReader(io.StringIO(out.decode(errors="replace"))))
    if process.returncode != 0 or not rows or "rps" not in rows[-1]:
        return {"events_per_s": None, "error": out.decode(errors="replace")[-500:]}
    row = rows[-1]
    return {
        "events_per_s": float(row["rps"]),
        "p50_ms": float(row["p50_latency_ms"]),
        "p99_ms": float(row["p99_latency_ms"]),
    }


async def run(ctx: Context) -> list[Row]:
    quick = ctx.quick
    events = 3_000 if quick else 10_000
    per_task = 100 if quick else 500
    rounds = 1 if quick else 3
    directory = ctx.workdir / SCENARIO
    directory.mkdir(parents=True, exist_ok=True)
    repo = ctx.repo.resolve()
    redis: Proc | None = None
    try:
        redis = await start_redis(directory)
        socket_path = directory / "redis.sock"
        argv = [
            sys.executable, "-m", "tests.bench.scenarios.publish", "--child",
            "--redis-socket", str(socket_path), "--redis-pid", str(redis.pid),
            "--events", str(events), "--tasks", str(TASKS), "--per-task", str(per_task),
            "--batch", str(BATCH), "--rounds", str(rounds),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCOORD_")}
        measured = await run_json_child(
            "publish child", argv, directory / "child.log", cwd=repo, env=env,
            seconds=CHILD_LIMIT[quick],
        )
        entry = ["epoch", "3f9a02bc", "type", "progress", "data", "x" * measured["data_bytes"]]
        bench_requests = 50_000 if quick else 200_000
        benchmarks = [
            (pipeline, requests, await redis_benchmark(socket_path, requests, pipeline, entry, directory))
            for pipeline, requests in ((16, bench_requests), (1, bench_requests // 4))
        ]
    finally:
        if redis is not None:
            await redis.stop()
    return rows_of(measured, benchmarks, events=events, per_task=per_task)


def rows_of(
    measured: dict[str, Any],
    benchmarks: list[tuple[int, int, dict[str, Any]]],
    *,
    events: int,
    per_task: int,
) -> list[Row]:
    rounds = measured["rounds"]
    sizes = {"payload_bytes": measured["payload_bytes"], "data_bytes": measured["data_bytes"]}
    n_rounds = len(rounds["sc_awaited"])

    def figures(name: str) -> dict[str, Any]:
        keys = ["events_per_s", "p50_us", "p99_us", "mean_us", "worker_cpu_pct", "redis_cpu_pct",
                "other_cpu_pct", "events_per_round_trip"]
        out: dict[str, Any] = {}
        for key in keys:
            if any(key in r for r in rounds[name]):
                out[key] = rounded(median_of(rounds[name], key), 0 if key == "events_per_s" else 1)
        return out

    sc_awaited, raw_awaited = figures("sc_awaited"), figures("raw_awaited")
    sc_tasks, raw_pipelined = figures("sc_tasks"), figures("raw_pipelined")
    cost_x = p50_x = share = None
    if sc_awaited["events_per_s"] and raw_awaited["events_per_s"]:
        cost_x = round(raw_awaited["events_per_s"] / sc_awaited["events_per_s"], 2)
    if sc_awaited.get("p50_us") and raw_awaited.get("p50_us"):
        p50_x = round(sc_awaited["p50_us"] / raw_awaited["p50_us"], 2)
    if sc_tasks["events_per_s"] and raw_pipelined["events_per_s"]:
        share = round(sc_tasks["events_per_s"] / raw_pipelined["events_per_s"], 3)
    median_note = f"median of {n_rounds} interleaved rounds" if n_rounds > 1 else "one round"
    rows = [
        Row(SCENARIO, "streamcoord", {"mode": "awaited, 1 task", "events": events, **sizes},
            {**sc_awaited, "cost_vs_raw_awaited_x": cost_x, "p50_vs_raw_awaited_x": p50_x},
            f"TaskWriter.append awaited one by one; {median_note}; target cost_vs_raw_awaited_x <= 1.5"),
        Row(SCENARIO, "streamcoord", {"mode": f"{TASKS} concurrent tasks", "tasks": TASKS,
                                      "events_per_task": per_task, **sizes},
            {**sc_tasks, "share_of_raw_pipelined": share},
            f"each task awaits its appends; the publisher pipelines across tasks; {median_note}; "
            "targets >= 50000 events/s and share_of_raw_pipelined >= 0.55"),
        Row(SCENARIO, "raw redis-py XADD (awaited)", {"events": events, **sizes}, raw_awaited,
            f"redis.asyncio + hiredis, same socket and entry fields, no trim; {median_note}"),
        Row(SCENARIO, f"raw redis-py XADD (pipelined {BATCH})",
            {"events": TASKS * per_task, "batch": BATCH, **sizes}, raw_pipelined,
            f"one pipeline of {BATCH} XADDs at a time; {median_note}"),
        Row(SCENARIO, "raw redis-py EVALSHA append.lua (awaited)", {"events": events, **sizes},
            figures("script_awaited"),
            "streamcoord's append script called directly, awaited one by one: the server-side "
            f"part of an append without TaskWriter/Publisher; {median_note}"),
        Row(SCENARIO, f"raw redis-py EVALSHA append.lua (pipelined {BATCH})",
            {"events": TASKS * per_task, "batch": BATCH, "tasks": BATCH, **sizes},
            figures("script_pipelined"),
            f"one pipeline of {BATCH} script calls (one per task) at a time; {median_note}"),
    ]
    for pipeline, requests, result in benchmarks:
        rows.append(Row(
            SCENARIO, "redis-benchmark XADD",
            {"requests": requests, "connections": 50, "pipeline": pipeline,
             "data_bytes": measured["data_bytes"]},
            {k: v for k, v in result.items() if k != "error"},
            result.get("error", "Redis's own C client: the ceiling of this Redis here"),
        ))
    return rows


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scenarios.publish")
    parser.add_argument("--quick", action="store_true", help="the small, short mode")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-socket", help=argparse.SUPPRESS)
    parser.add_argument("--redis-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--per-task", type=int, default=500, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help=argparse.SUPPRESS)
    return parser


def run_standalone(module_run: Any, quick: bool) -> int:
    """Run one scenario on its own (a temporary workdir) and print its rows as JSON lines.
    SIGTERM and SIGINT cancel it, so it stops what it started on the way out."""
    import dataclasses
    import signal

    async def bounded(ctx: Context) -> list[Row]:
        main_task = asyncio.current_task()
        assert main_task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
        rows: list[Row] = await module_run(ctx)
        return rows

    repo = Path(__file__).resolve().parents[3]
    with tempfile.TemporaryDirectory(prefix="scbench-") as tmp:
        began = time.monotonic()
        try:
            rows = asyncio.run(bounded(Context(repo, Path(tmp), quick=quick)))
        except asyncio.CancelledError:
            print("interrupted; everything it started is stopped", file=sys.stderr)
            return 130
        for row in rows:
            print(json.dumps(dataclasses.asdict(row)))
        print(f"# {time.monotonic() - began:.1f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args)
    return run_standalone(run, args.quick)


if __name__ == "__main__":
    sys.exit(main())
