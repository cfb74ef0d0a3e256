"""dispatch: ``start_task`` to the first event at a client; no-op tasks/s through one worker.

What it measures
    - Dispatch latency with an idle worker: the time from calling ``await
      coordinator.start_task(task)`` to the task's first event (``start``) arriving at an SSE
      client already connected to the task's stream through a gateway (p50/p99/max in ms;
      target p50 <= 5 ms), and how long the ``start_task`` call itself took. Each sample is a
      new ``ProgressTask(steps=0, delay=0)`` (it sends ``start``, then the worker sends
      ``complete``); the next one is started once the previous one ended and the worker went
      idle again.
    - Throughput of one worker (``runworker``, default concurrency 50) on no-op tasks: K
      ``ProgressTask(steps=0, delay=0)`` rows are created at once (``bulk_create``), all
      started concurrently with ``start_task``, and timed until every one is completed in Redis
      and acknowledged in the job queue (tasks/s; the CPU of the worker and of Redis).

How
    ``run`` starts a redis-server on a unix socket, migrates the example project into its own
    SQLite file, and starts one ``manage.py runworker`` and one gateway (``python -m streamcoord
    gateway --socket``) with ``STREAMCOORD_LAZY_START=0``, so connecting to a pending task does
    not start it and the clock measures ``start_task`` alone. The measuring child (this module
    with ``--child``: Django set up, on uvloop) creates the rows, connects a raw HTTP/1.1 SSE
    client over the gateway's unix socket, waits until the gateway's ``/stats`` (on its admin
    socket, ``--admin-socket``) shows it
    listening, starts the task, and reads until the first ``id:`` line; it prints JSON.

Run alone: ``.venv/bin/python -m tests.bench.scenarios.dispatch [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from ..procs import Child, RedisServer, python_argv
from ..sampler import host_cpu_seconds, proc_cpu_seconds
from . import Context, Row
from .publish import percentile, print_json, run_json_child, scenario_main

SCENARIO = "dispatch"
APP, MODEL = "examples", "ProgressTask"
#: Seconds the previous task gets to end, and the worker to go idle, before the next sample.
SETTLE_SECONDS = 0.05
CHILD_LIMIT = {True: 60.0, False: 240.0}
#: Worker concurrency of the throughput run (the default of ``runworker``).
CONCURRENCY = 50


# -- stand-ins for tests/bench/procs.py: the example Django project (scale uses these too) -----


def project_env(directory: Path, redis_url: str, **settings: Any) -> dict[str, str]:
    """The environment of the example project's commands, as tests/processes.py's Project.env:
    its own SQLite file and embedded-URL file in ``directory``, and a real Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_"))}
    env["DJANGO_SETTINGS_MODULE"] = "django_app.project.settings"
    env["DJANGO_DB_PATH"] = str(directory / "db.sqlite3")
    env["STREAMCOORD_EMBEDDED_URL_FILE"] = str(directory / "embedded.url")
    env["STREAMCOORD_REDIS_URL"] = redis_url
    env["STREAMCOORD_STREAM_AUTH"] = "public"  # dispatch latency, not access, is measured here
    env.update({f"STREAMCOORD_{k.upper()}": str(v) for k, v in settings.items()})
    return env


async def migrate(env: dict[str, str]) -> None:
    """``manage.py migrate`` into the project's SQLite file (bounded, stopped by pid)."""
    child = await Child.spawn("migrate", [sys.executable, "manage.py", "migrate", "--no-input"], env=env)
    try:
        code = await asyncio.wait_for(child.process.wait(), 120)
    finally:
        await child.stop()
    if code != 0:
        raise RuntimeError(f"manage.py migrate exited with {code}:\n{child.log_tail()}")


async def start_child(
    name: str, argv: list[str], env: dict[str, str], marker: str, track: list[Child]
) -> Child:
    """Start ``argv`` and wait for ``marker`` in its log. ``track`` gets the child at once, so
    whoever stops that list stops it too, however the start ends."""
    child = await Child.spawn(name, argv, env=env)
    track.append(child)
    await child.wait_for_line(marker, 30)
    return child


async def start_worker(env: dict[str, str], name: str, track: list[Child], concurrency: int = CONCURRENCY) -> Child:
    argv = [sys.executable, "manage.py", "runworker", "--concurrency", str(concurrency)]
    return await start_child(name, argv, env, "started (concurrency", track)


async def start_gateway(directory: Path, env: dict[str, str], name: str, track: list[Child]) -> Child:
    argv = python_argv("streamcoord", "gateway", "--socket", str(directory / f"{name}.sock"),
                       "--admin-socket", str(admin_socket(directory, name)))
    return await start_child(name, argv, env, "listening on", track)


def admin_socket(directory: Path, name: str) -> Path:
    """Where ``start_gateway`` puts the gateway's admin listener (its ``/stats``)."""
    return directory / f"{name}.admin.sock"


async def start_together(*starts: Coroutine[Any, Any, Child]) -> list[Child]:
    """Run several starts at once; the first failure is raised once all of them are done (the
    processes went into their ``track`` list at spawn, so the caller's cleanup stops them)."""
    results = await asyncio.gather(*starts, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[Child], results)


async def stop_children(children: list[Child]) -> None:
    """Stop the children we started, in reverse order of their start, each by its pid."""
    for child in reversed(children):
        await child.stop()


# -- the measuring child (Django set up) ---------------------------------------------------------


class FirstEvent:
    """A raw HTTP/1.1 SSE GET over a unix socket, read just far enough to time events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.seen = b""

    @classmethod
    async def open(cls, socket_path: str, path: str) -> FirstEvent:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        client = cls(reader, writer)
        await client.until(b": stream open")
        if not client.seen.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {path}: {client.seen[:200]!r}")
        return client

    async def until(self, marker: bytes, start: int = 0) -> None:
        """Read until ``marker`` appears in what was received (from ``start``)."""
        while self.seen.find(marker, start) < 0:
            data = await self.reader.read(65536)
            if not data:
                raise RuntimeError(f"the stream closed before {marker!r}: {self.seen[-300:]!r}")
            self.seen += data

    def close(self) -> None:
        self.writer.close()


class CpuMeter:
    """CPU of the scenario's processes, of this one (``client``) and of the rest of the shared
    machine (``other``) from now to :meth:`percents`, in % of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.wall, self.own, self.host = time.perf_counter(), time.process_time(), host_cpu_seconds()
        self.cpu = {name: proc_cpu_seconds(pid) for name, pid in pids.items()}

    def percents(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        used = {"client": time.process_time() - self.own}
        for name, pid in self.pids.items():
            used[name] = proc_cpu_seconds(pid) - self.cpu[name]
        used["other"] = max(0.0, host_cpu_seconds() - self.host - sum(used.values()))
        return {f"{k}_cpu_pct": 100 * v / wall for k, v in used.items()}


async def listeners(http: Any) -> int:
    response = await http.get("/stats")
    response.raise_for_status()
    return int(response.json()["listeners"])


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from redis.asyncio import Redis

    from django_app.coordinator import coordinator
    from django_app.examples.models import ProgressTask
    from streamcoord.keys import KeySpace

    keys = KeySpace(os.environ.get("STREAMCOORD_KEY_PREFIX", "sc"))
    redis = Redis.from_url(os.environ["STREAMCOORD_REDIS_URL"])
    transport = httpx.AsyncHTTPTransport(uds=args.gateway_admin_socket)  # /stats
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10)
    await coordinator.register_models()  # the gateway must know the model before the first GET

    async def stages(task: Any, began_wall: float, first_wall: float) -> dict[str, float]:
        """Where the time went, from the timestamps the task's state record keeps (same clock):
        start_task to queued, queued to running (a worker claimed and began it), running to
        the first append's timestamp, and that to the client."""
        raw: list[bytes] = await redis.hmget(  # type: ignore[assignment]
            keys.state(task.stream_ref), ["queued_at", "running_since", "started_at"]
        )
        queued, running, started = (datetime.fromisoformat(v.decode()).timestamp() for v in raw)
        return {
            "call_to_queued_ms": (queued - began_wall) * 1000,
            "queued_to_running_ms": (running - queued) * 1000,
            "running_to_first_append_ms": (started - running) * 1000,
            "first_append_to_client_ms": (first_wall - started) * 1000,
        }

    async def one_sample() -> tuple[float, float, dict[str, float]]:
        task = await ProgressTask.objects.acreate(steps=0, delay=0)  # post_save: pending in Redis
        client = await FirstEvent.open(args.gateway_socket, task.stream_path)
        try:
            async with asyncio.timeout(10):
                # The gateway cannot notify us: poll its /stats until the client listens.
                while await listeners(http) < 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                mark = len(client.seen)
                began_wall, began = time.time(), time.perf_counter()
                outcome = await coordinator.start_task(task)
                returned = time.perf_counter()
                await client.until(b"\nid: ", mark)
                first, first_wall = time.perf_counter(), time.time()
                if not outcome:
                    raise RuntimeError(f"start_task did not queue task {task.pk}: {outcome.describe()}")
                await client.until(b"event: complete", mark)
        finally:
            client.close()
        async with asyncio.timeout(10):  # its connection is gone from the gateway: idle again
            while await listeners(http) > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        return first - began, returned - began, await stages(task, began_wall, first_wall)

    pids = {"worker": args.worker_pid, "redis": args.redis_pid, "gateway": args.gateway_pid}
    try:
        for _ in range(3):  # warm-up: connections, scripts, the ORM's thread
            await one_sample()
            await asyncio.sleep(SETTLE_SECONDS)
        firsts: list[float] = []
        calls: list[float] = []
        parts: dict[str, list[float]] = {}
        meter = CpuMeter(pids)
        for _ in range(args.samples):
            first, call, split = await one_sample()
            firsts.append(first * 1000)
            calls.append(call * 1000)
            for name, value in split.items():
                parts.setdefault(name, []).append(value)
            await asyncio.sleep(SETTLE_SECONDS)
        latency_cpu = meter.percents()

        # Throughput: K no-op tasks at once through the one worker.
        tasks = await ProgressTask.objects.abulk_create(
            [ProgressTask(steps=0, delay=0) for _ in range(args.tasks)]
        )
        state_keys = [keys.state(t.stream_ref) for t in tasks]
        meter = CpuMeter(pids)
        began = time.perf_counter()
        async with asyncio.timeout(args.throughput_limit):
            outcomes = await asyncio.gather(*(coordinator.start_task(t) for t in tasks))
            enqueued = time.perf_counter()
            while True:
                pipe = redis.pipeline(transaction=False)
                for key in state_keys:
                    pipe.hget(key, "state")
                states = await pipe.execute()
                completed = sum(1 for s in states if s == b"completed")
                if completed == len(tasks):
                    pending = await redis.xpending(keys.jobs(), "workers")
                    if not pending["pending"]:
                        break
                await asyncio.sleep(0.01)
        done = time.perf_counter()
        seconds = done - began
        throughput_cpu = meter.percents()
    finally:
        await http.aclose()
        await redis.aclose()
    firsts.sort()
    calls.sort()
    return {
        "latency": {
            "samples": len(firsts),
            "p50_ms": percentile(firsts, 0.50),
            "p99_ms": percentile(firsts, 0.99),
            "max_ms": firsts[-1],
            "mean_ms": statistics.fmean(firsts),
            "start_task_call_p50_ms": percentile(calls, 0.50),
            "start_task_call_p99_ms": percentile(calls, 0.99),
            **{f"{name[:-3]}_p50_ms": statistics.median(values) for name, values in parts.items()},
            **latency_cpu,
        },
        "throughput": {
            "tasks": len(tasks),
            "queued": sum(1 for o in outcomes if o),
            "seconds": seconds,
            "enqueue_seconds": enqueued - began,
            "tasks_per_s": len(tasks) / seconds,
            "enqueue_per_s": len(tasks) / (enqueued - began),
            **throughput_cpu,
        },
    }


def child_main(args: argparse.Namespace) -> int:
    import django

    django.setup()
    from streamcoord import runtime

    return print_json(runtime.run(measure(args)))


# -- the suite side --------------------------------------------------------------------------


def r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


async def run(ctx: Context) -> list[Row]:
    quick = ctx.quick
    samples = 30 if quick else 200
    tasks = 200 if quick else 1000
    directory = ctx.workdir / SCENARIO
    directory.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(directory / "redis")
    procs: list[Child] = []
    try:
        # Every process goes into procs as it starts, so the finally stops it, however we leave.
        await redis.start()
        env = project_env(directory, redis.url)
        await migrate(env)
        worker, gateway = await start_together(
            start_worker(env, "worker", procs),
            start_gateway(directory, {**env, "STREAMCOORD_LAZY_START": "0"}, "gw", procs),
        )
        argv = [
            *python_argv("tests.bench.scenarios.dispatch"), "--child",
            "--gateway-socket", str(directory / "gw.sock"),
            "--gateway-admin-socket", str(admin_socket(directory, "gw")), "--samples", str(samples),
            "--tasks", str(tasks), "--worker-pid", str(worker.pid), "--redis-pid", str(redis.pid),
            "--gateway-pid", str(gateway.pid), "--throughput-limit", "60",
        ]
        child = await Child.spawn("dispatch child", argv, report=True, env=env)
        measured = await run_json_child(child, CHILD_LIMIT[quick])
    finally:
        await stop_children(procs)
        await redis.stop()
    latency, throughput = measured["latency"], measured["throughput"]
    return [
        Row(
            SCENARIO, "streamcoord",
            {"mode": "start_task to first event, idle worker", "samples": latency["samples"],
             "worker_concurrency": CONCURRENCY},
            {k: r(v) for k, v in latency.items() if k != "samples"},
            "1 worker, 1 gateway (lazy start off), a client already connected; target p50_ms <= 5",
        ),
        Row(
            SCENARIO, "streamcoord",
            {"mode": "no-op tasks through one worker", "tasks": throughput["tasks"],
             "worker_concurrency": CONCURRENCY},
            {"tasks_per_s": r(throughput["tasks_per_s"], 1),
             "enqueue_per_s": r(throughput["enqueue_per_s"], 1),
             "seconds": r(throughput["seconds"], 3),
             **{k: r(v, 1) for k, v in throughput.items() if k.endswith("_cpu_pct")},
             "queued": throughput["queued"]},
            "ProgressTask(steps=0, delay=0) rows bulk-created, all started at once with "
            "start_task; timed until all completed and acked (enqueue included)",
        ),
    ]


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scenarios.dispatch")
    parser.add_argument("--quick", action="store_true", help="the small, short mode")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gateway-socket", help=argparse.SUPPRESS)
    parser.add_argument("--gateway-admin-socket", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--worker-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--redis-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--gateway-pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--throughput-limit", type=float, default=60, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return scenario_main(build_parser().parse_args(argv), run, child=child_main)


if __name__ == "__main__":
    sys.exit(main())
