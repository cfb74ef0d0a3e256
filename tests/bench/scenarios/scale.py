"""scale: 2 gateway processes and 2 workers on the machine's cores, many tasks, many clients.

What it measures
    The whole system at once: N ``ProgressTask`` rows (``steps`` progress events ``delay``
    seconds apart, plus ``start`` and ``complete``) run by two ``runworker`` processes, each
    task watched by M SSE clients split evenly across two gateway processes. Reported: total
    deliveries per second (all clients together, first to last delivery), latency (the
    client's ``time.time()`` minus the event's ``_timestamp``, which the worker stamps when it
    encodes the event, so it includes the append round trip) p50/p99/max, the CPU of every
    process (both gateways, both workers, Redis, the load client, and the rest of this shared
    machine), and whether every client got every event of its task exactly once, in order
    (sequence 1, 2, 3, ... without a gap, ending with ``complete``).

How
    ``run`` starts a redis-server on a unix socket, migrates the example project into its own
    SQLite file, starts two gateways (``python -m streamcoord gateway --socket``, lazy start
    off so no client starts a task) and two workers, all at once. A driver child (this module
    with ``--driver create``) creates the rows; one load-client child (``--client``) opens the
    connections, raw HTTP/1.1 over the gateways' unix sockets, de-chunked and parsed by hand;
    once both gateways' ``/stats`` (on their admin sockets) count every listener, the driver
    (``--driver start``) starts every task at once with ``coordinator.start_task``. The load
    client prints its report as JSON when every stream ended. CPU comes from /proc, sampled
    every 0.2 s and interpolated to the delivery window.

Run alone: ``.venv/bin/python -m tests.bench.scenarios.scale [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from ..procs import Child, RedisServer, python_argv
from ..sampler import ProcSampler
from ..sseclient import SseConnection, build_request
from . import Context, Row
from .dispatch import (
    admin_socket,
    migrate,
    project_env,
    start_gateway,
    start_together,
    start_worker,
    stop_children,
)
from .publish import print_json, run_json_child, scenario_main

SCENARIO = "scale"
#: Width of one latency histogram bucket, in seconds.
BUCKET_SECONDS = 1e-4
#: Connections the load client opens at once (the rest wait), so accept backlogs never fill.
CONNECT_CONCURRENCY = 100


@dataclasses.dataclass(frozen=True)
class Shape:
    tasks: int
    steps: int
    delay: float
    clients_per_task: int

    @property
    def clients(self) -> int:
        return self.tasks * self.clients_per_task

    @property
    def events_per_task(self) -> int:
        return self.steps + 2  # start, the steps, complete

    @property
    def task_seconds(self) -> float:
        return self.steps * self.delay


SHAPES = {True: Shape(tasks=4, steps=100, delay=0.01, clients_per_task=10),
          False: Shape(tasks=20, steps=500, delay=0.01, clients_per_task=50)}


# -- the load client (a child process) ---------------------------------------------------------


@dataclasses.dataclass
class Tally:
    events: int = 0
    histogram: dict[int, int] = dataclasses.field(default_factory=dict)
    first_delivery: float = 0.0
    last_delivery: float = 0.0
    cpu_at_first: float = 0.0
    stamps: dict[bytes, float] = dataclasses.field(default_factory=dict)  # _timestamp -> epoch s


class Watcher(SseConnection):
    """One SSE connection (sseclient's, which writes the GET and de-chunks the body) that checks
    each event's sequence and latency. Parses only the ``id:`` line, the event type and
    ``"_timestamp"``."""

    def __init__(self, request: bytes, tally: Tally) -> None:
        super().__init__(request)
        self.tally = tally
        self.last_seq = 0
        self.gaps = 0  # events whose sequence was not the previous one plus one

    def _take_frames(self, body: bytes, now: float) -> None:
        frames = (self._text + body).split(b"\n\n")
        self._text = frames.pop()
        tally = self.tally
        for frame in frames:
            at = 0 if frame.startswith(b"id: ") else frame.find(b"\nid: ") + 1
            if at == 0 and not frame.startswith(b"id: "):
                continue  # comments and retry only (they normally join the next event's block)
            eol = frame.find(b"\n", at)
            seq = int(frame[frame.rfind(b"-", at, eol) + 1 : eol])
            if seq != self.last_seq + 1:
                self.gaps += 1
            self.last_seq = seq
            t_at = frame.find(b'"_timestamp":"', eol)
            if t_at >= 0:
                stamp = frame[t_at + 14 : frame.find(b'"', t_at + 14)]
                sent = tally.stamps.get(stamp)
                if sent is None:
                    if len(tally.stamps) > 200_000:
                        tally.stamps.clear()
                    sent = tally.stamps[stamp] = datetime.fromisoformat(stamp.decode()).timestamp()
                bucket = max(0, int((now - sent) / BUCKET_SECONDS))
                tally.histogram[bucket] = tally.histogram.get(bucket, 0) + 1
            self.events += 1
            if not tally.events:
                tally.first_delivery = now
                tally.cpu_at_first = time.process_time()
            tally.events += 1
            tally.last_delivery = now
            if frame.find(b"\nevent: complete\n", eol - 1) >= 0:
                self.completed = True


async def run_load_client(targets: list[tuple[str, str]], max_seconds: float) -> dict[str, Any]:
    """Connect to every (socket, path), receive until every stream ends (or SIGTERM, or
    ``max_seconds``), and report."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(socket_path: str, path: str) -> Watcher:
        request = build_request(path)
        async with gate:
            _, protocol = await loop.create_unix_connection(lambda: Watcher(request, tally), socket_path)
            return protocol

    results = await asyncio.gather(*(connect(s, p) for s, p in targets), return_exceptions=True)
    watchers = [w for w in results if isinstance(w, Watcher)]
    print(f"load client: {len(watchers)} connected, {len(targets) - len(watchers)} failed", file=sys.stderr)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    all_done: asyncio.Future[Any] = asyncio.gather(*(w.done for w in watchers))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({all_done, stopped}, timeout=max_seconds, return_when=asyncio.FIRST_COMPLETED)
    end, cpu_end = time.time(), time.process_time()
    stopped.cancel()
    for watcher in watchers:
        watcher.finish()
    return {
        "connections": len(watchers),
        "connect_errors": len(targets) - len(watchers),
        "statuses": dict(collections.Counter(w.status for w in watchers)),
        "events": tally.events,
        "events_per_connection": dict(collections.Counter(w.events for w in watchers)),
        "completed": sum(1 for w in watchers if w.completed),
        "gaps": sum(w.gaps for w in watchers),
        "gap_free": [w.completed and not w.gaps for w in watchers].count(True),
        "all_ended": all_done.done(),
        "first_delivery": tally.first_delivery,
        "last_delivery": tally.last_delivery,
        "cpu_seconds": cpu_end - tally.cpu_at_first if tally.events else 0.0,
        "cpu_wall_seconds": end - tally.first_delivery if tally.events else 0.0,
        "latency_histogram": tally.histogram,
    }


def client_main(args: argparse.Namespace) -> int:
    from streamcoord import runtime

    targets = [tuple(t) for t in json.loads(Path(args.targets).read_text())]
    return print_json(runtime.run(run_load_client(cast(list[tuple[str, str]], targets), args.max_seconds)))


# -- the driver (a child process with Django set up) -------------------------------------------


def driver_main(args: argparse.Namespace) -> int:
    import django

    django.setup()
    from django_app.coordinator import coordinator
    from django_app.examples.models import ProgressTask
    from streamcoord import runtime

    if args.driver == "create":  # post_save records each row as pending in Redis
        rows = [ProgressTask.objects.create(steps=args.steps, delay=args.delay) for _ in range(args.tasks)]
        return print_json([{"id": t.pk, "stream": t.stream_path} for t in rows])

    async def start_all() -> dict[str, Any]:
        tasks = [t async for t in ProgressTask.objects.filter(pk__in=args.ids)]
        began = time.time()
        outcomes = await asyncio.gather(*(coordinator.start_task(t) for t in tasks))
        return {"started": sum(1 for o in outcomes if o), "at": began, "seconds": time.time() - began}

    return print_json(runtime.run(start_all()))


# -- the suite side --------------------------------------------------------------------------


def percentile_ms(histogram: dict[int, int], fraction: float) -> float | None:
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= fraction * total:
            return round((bucket + 1) * BUCKET_SECONDS * 1000, 2)
    return None


async def total_listeners(http: list[Any]) -> int:
    total = 0
    for client in http:
        response = await client.get("/stats")
        response.raise_for_status()
        total += int(response.json()["listeners"])
    return total


async def run(ctx: Context) -> list[Row]:
    import httpx

    shape = SHAPES[ctx.quick]
    directory = ctx.workdir / SCENARIO
    directory.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(directory / "redis")
    procs: list[Child] = []
    http: list[httpx.AsyncClient] = []
    client_task: asyncio.Task[Any] | None = None
    try:
        # Every process goes into procs as it starts, so the finally stops it, however we leave.
        await redis.start()
        env = project_env(directory, redis.url)
        await migrate(env)
        gw_env = {**env, "STREAMCOORD_LAZY_START": "0"}
        gw1, gw2, w1, w2 = await start_together(
            start_gateway(directory, gw_env, "gw1", procs),
            start_gateway(directory, gw_env, "gw2", procs),
            start_worker(env, "w1", procs),
            start_worker(env, "w2", procs),
        )

        driver = [*python_argv("tests.bench.scenarios.scale"), "--driver"]
        created = await run_json_child(await Child.spawn(
            "driver (create)", [*driver, "create", "--tasks", str(shape.tasks), "--steps",
                                str(shape.steps), "--delay", str(shape.delay)],
            report=True, env=env,
        ), 60)
        sockets = [str(directory / "gw1.sock"), str(directory / "gw2.sock")]
        targets = [(sockets[i % 2], task["stream"]) for task in created for i in range(shape.clients_per_task)]
        (directory / "targets.json").write_text(json.dumps(targets))
        max_seconds = shape.task_seconds * 3 + 60
        client_argv = [*python_argv("tests.bench.scenarios.scale"), "--client",
                       "--targets", str(directory / "targets.json"), "--max-seconds", str(max_seconds)]
        client = await Child.spawn("client", client_argv, report=True, env=env)
        procs.append(client)
        client_task = asyncio.create_task(run_json_child(client, max_seconds + 30))
        admins = [str(admin_socket(directory, name)) for name in ("gw1", "gw2")]  # their /stats
        http = [httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=s), base_url="http://gateway",
                                  timeout=10) for s in admins]
        async with asyncio.timeout(60):
            while await total_listeners(http) < shape.clients:
                if client_task.done():
                    client_task.result()  # raises its error
                    raise RuntimeError("the load client ended before connecting every client")
                await asyncio.sleep(0.1)

        pids = {"gw1": gw1.pid, "gw2": gw2.pid, "w1": w1.pid, "w2": w2.pid, "redis": redis.pid,
                "client": client.pid}
        sampler = ProcSampler(pids)
        async with sampler.running():
            start = await run_json_child(await Child.spawn(
                "driver (start)", [*driver, "start", "--ids", *(str(t["id"]) for t in created)],
                report=True, env=env,
            ), 60)
            report = await client_task
    finally:
        try:
            # A cancelled helper is awaited with wait(), which lets a cancellation of this
            # coroutine through (suppressing CancelledError around it would swallow it).
            if client_task is not None:
                client_task.cancel()  # it stops the load client's child by pid on the way out
                await asyncio.wait([client_task])
                if not client_task.cancelled():
                    client_task.exception()  # retrieved: its error, if any, was raised above
            for http_client in http:
                await http_client.aclose()
        finally:
            await stop_children(procs)
            await redis.stop()
    return [summarize(shape, report, start, sampler)]


def summarize(shape: Shape, report: dict[str, Any], start: dict[str, Any], sampler: ProcSampler) -> Row:
    histogram = {int(k): v for k, v in report["latency_histogram"].items()}
    expected = shape.events_per_task * shape.clients
    first, last = report["first_delivery"], report["last_delivery"]
    window = max(last - first, 1e-9)
    cpu = {f"{name}_cpu_pct": sampler.cpu_percent(name, first, last) for name in sampler.pids}
    metrics: dict[str, Any] = {
        "deliveries_per_s": round(report["events"] / window, 1),
        "events_per_s": round(shape.events_per_task * shape.tasks / window, 1),
        "expected_deliveries": expected,
        "received_deliveries": report["events"],
        "missing_deliveries": max(0, expected - report["events"]),
        "clients_gap_free": report["gap_free"],
        "clients_completed": report["completed"],
        "gaps": report["gaps"],
        "connect_errors": report["connect_errors"],
        "window_s": round(window, 3),
        "start_all_s": round(start["seconds"], 3),
        "p50_ms": percentile_ms(histogram, 0.50),
        "p99_ms": percentile_ms(histogram, 0.99),
        "max_ms": percentile_ms(histogram, 1.0),
        **cpu,
        "other_cpu_pct": sampler.others_cpu_percent(first, last),
    }
    gap_free = report["gap_free"] == shape.clients and not report["connect_errors"]
    return Row(
        SCENARIO, "streamcoord",
        {"gateways": 2, "workers": 2, "tasks": shape.tasks, "steps": shape.steps,
         "delay_s": shape.delay, "clients_per_task": shape.clients_per_task,
         "clients": shape.clients},
        metrics,
        ("every client gap-free and complete" if gap_free else
         f"NOT every client gap-free: statuses {report['statuses']}, events per connection "
         f"{report['events_per_connection']}")
        + "; latency = client time.time() - the event's _timestamp (worker's encode time); "
        "CPU in % of one core over the delivery window",
    )


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scenarios.scale")
    parser.add_argument("--quick", action="store_true", help="the small, short mode")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=120, help=argparse.SUPPRESS)
    parser.add_argument("--driver", choices=["create", "start"], help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=0.01, help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return scenario_main(build_parser().parse_args(argv), run, client=client_main, driver=driver_main)


if __name__ == "__main__":
    sys.exit(main())
