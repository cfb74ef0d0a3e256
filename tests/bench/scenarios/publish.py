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
    - ``raw redis-py XADD + SPUBLISH (pipelined 100)``: the bare pair a live event needs (the
      entry, and its message on a shard channel), for the Redis CPU an event costs
      (``redis_cpu_us_per_event``) next to the append script's (``redis_cpu_vs_bare_pair_x``;
      target <= 2);
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
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from ..procs import REPO, Child, RedisServer, clean_env, python_argv, stop_all_children, time_limit
from ..sampler import host_cpu_seconds, proc_cpu_seconds
from . import Context, Row

SCENARIO = "publish"
#: Concurrent tasks in the batched measurement, and the raw pipeline's batch size.
TASKS = 100
BATCH = 100
#: Hard limits, in seconds, of the measuring child and of one redis-benchmark run.
CHILD_LIMIT = {True: 60.0, False: 240.0}
BENCHMARK_LIMIT = 60.0


# -- helpers dispatch and scale use too --------------------------------------------------------


async def run_json_child(child: Child, seconds: float) -> Any:
    """Wait for a ``report`` child that prints one JSON document on stdout, and parse it; the
    child is stopped by its pid when ``seconds`` pass or the caller is cancelled."""
    try:
        async with time_limit(seconds, child.name):
            code = await child.process.wait()
            out = await child.report()
    finally:
        await child.stop()
    if code != 0:
        raise RuntimeError(f"{child.name} exited with {code}:\n{child.log_tail()}")
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
        self.host = host_cpu_seconds()

    def done(self, events: int) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        redis_cpu = proc_cpu_seconds(self.redis_pid) - self.redis_cpu
        others = host_cpu_seconds() - self.host - cpu - redis_cpu
        return {
            "events": events,
            "seconds": wall,
            "events_per_s": events / wall,
            "worker_cpu_pct": 100 * cpu / wall,
            "redis_cpu_pct": 100 * redis_cpu / wall,
            "redis_cpu_us_per_event": 1e6 * redis_cpu / max(1, events),
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

    from streamcoord import scripts
    from streamcoord.codec import DataEncoder
    from streamcoord.connection import RedisFactory
    from streamcoord.eventlog import EventLog
    from streamcoord.keys import TaskRef
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
        "script_awaited": [], "script_pipelined": [], "pair_pipelined": [],
    }
    sha = await raw.script_load(scripts.source("append"))
    # The script's arguments exactly as the publisher sends one append (whatever they are
    # today): the call's common arguments, then the event's; the sequence is set per call.
    with mock.patch.object(log.publisher, "_call", wraps=log.publisher._call) as spy:
        await log.writer(next(refs)).append("progress", payload(1, args.events))
    common, appends = spy.call_args.args
    sent = appends[0]

    def script_args(ref: TaskRef, seq: int) -> list[Any]:
        event = sent._replace(events_key=log.keys.events(ref), state_key=log.keys.state(ref), seq=seq)
        return [2, *event[:2], *common, *event[2:]]

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

    async def pair_pipelined() -> dict[str, Any]:
        """XADD + SPUBLISH per event, of one task each, as many tasks as the script's rounds."""
        task_refs = [next(refs) for _ in range(args.batch)]
        message = b"1\n3f9a02bc\nprogress\n" + sample_data
        meter = Meter(args.redis_pid)
        for _ in range(args.tasks * args.per_task // args.batch):
            pipe = raw.pipeline(transaction=False)
            for ref in task_refs:
                pipe.xadd(log.keys.events(ref), fields)
                pipe.spublish(log.keys.live(ref), message)
            await pipe.execute()
        return meter.done(args.tasks * args.per_task // args.batch * args.batch)

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
            results["pair_pipelined"].append(await pair_pipelined())
            await sc_redis.flushdb()
    finally:
        await sc_redis.aclose()
        await raw.aclose()
    return {"payload_bytes": len(json.dumps(payload(1, args.events), separators=(",", ":"))),
            "data_bytes": len(sample_data), "rounds": results}


def print_json(result: Any) -> int:
    """A child's report: one JSON document on stdout (what :func:`run_json_child` reads)."""
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    return 0


def child_main(args: argparse.Namespace) -> int:
    from streamcoord import runtime

    return print_json(runtime.run(measure(args)))  # uvloop, as the worker runs


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
    redis = RedisServer(directory / "redis")
    try:
        await redis.start()
        socket_path = redis.socket
        argv = [
            *python_argv("tests.bench.scenarios.publish"), "--child",
            "--redis-socket", str(socket_path), "--redis-pid", str(redis.pid),
            "--events", str(events), "--tasks", str(TASKS), "--per-task", str(per_task),
            "--batch", str(BATCH), "--rounds", str(rounds),
        ]
        child = await Child.spawn("publish child", argv, report=True, env=clean_env())
        measured = await run_json_child(child, CHILD_LIMIT[quick])
        entry = ["epoch", "3f9a02bc", "type", "progress", "data", "x" * measured["data_bytes"]]
        bench_requests = 50_000 if quick else 200_000
        benchmarks = [
            (pipeline, requests, await redis_benchmark(socket_path, requests, pipeline, entry, directory))
            for pipeline, requests in ((16, bench_requests), (1, bench_requests // 4))
        ]
    finally:
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
                "redis_cpu_us_per_event", "other_cpu_pct", "events_per_round_trip"]
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
    script_pipelined, pair = figures("script_pipelined"), figures("pair_pipelined")
    per_event_x = None
    if script_pipelined.get("redis_cpu_us_per_event") and pair.get("redis_cpu_us_per_event"):
        per_event_x = round(script_pipelined["redis_cpu_us_per_event"] / pair["redis_cpu_us_per_event"], 2)
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
            {**script_pipelined, "redis_cpu_vs_bare_pair_x": per_event_x},
            f"one pipeline of {BATCH} script calls (one per task) at a time; {median_note}; "
            "target redis_cpu_vs_bare_pair_x <= 2"),
        Row(SCENARIO, f"raw redis-py XADD + SPUBLISH (pipelined {BATCH})",
            {"events": TASKS * per_task, "batch": BATCH, "tasks": BATCH, **sizes}, pair,
            f"the bare pair a live event needs, one pipeline of {BATCH} events (one per task) at "
            f"a time; {median_note}"),
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
        try:
            rows: list[Row] = await module_run(ctx)
        finally:
            await stop_all_children()  # whatever a failure left running, each by its pid
        return rows

    repo = REPO
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


def scenario_main(args: argparse.Namespace, module_run: Any, **modes: Callable[[argparse.Namespace], int]) -> int:
    """A scenario module's command line: the first of ``modes`` whose flag is set in ``args``
    (a child's part), else the scenario on its own."""
    for flag, mode in modes.items():
        if getattr(args, flag):
            return mode(args)
    return run_standalone(module_run, args.quick)


def main(argv: list[str] | None = None) -> int:
    return scenario_main(build_parser().parse_args(argv), run, child=child_main)


if __name__ == "__main__":
    sys.exit(main())
