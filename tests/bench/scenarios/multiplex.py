"""multiplex: 1,000 clients following 20 tasks each, on one connection vs on 20 connections each.

What it measures
    The same clients, tasks and publishing, served two ways in one run: every client follows
    its 20 tasks on one ``GET /streams?task=...`` connection (1,000 connections), or on 20
    ``GET /stream/...`` connections (20,000). Reported per variant: deliveries/s (events the
    clients received, first to last delivery), publish-to-client latency p50/p99/max (the
    client's ``time.time()`` minus the publisher's ``"t"``), the CPU of the gateways (and of
    Redis, the load clients, the publisher, the rest of the machine) and the gateways' CPU
    per delivery, the gateways' memory per client and per connection (their RSS once every
    client is connected and live, minus their RSS before any client, divided by clients and by
    connections), and SSE bytes per delivery (composite ids name every task of the connection:
    they are longer than a single task's id). Every client checks it got every event of each of
    its tasks once, in order, ending with ``complete``.

Which tasks
    20,000 tasks, each client its own 20, one watcher per task: the project's common load
    (thousands of tasks, a watcher or two each; a page following the 20 jobs its user started).
    The two variants then differ only in how the same 20,000 listeners reach their clients: the
    hub follows the same 20,000 streams, Redis and the publisher do exactly the same work, and
    deliveries equal publishes, so what changes is the gateway's cost per connection (sockets,
    HTTP responses, writes) against what multiplexing adds (merging, rewriting ids). Clients
    sharing the same 20 tasks would instead measure fan-out of a few streams, the fanout
    scenario's subject, where the per-connection composite id (every client's own) is the
    only difference left.

How
    For each variant: a fresh redis-server, three gateway processes, the tasks declared
    ``running``; client ``c`` connects to gateway ``c % 3``. 20,000 connections do not fit one
    process: ``ulimit -n`` is 20,000 and a gateway sheds load (503) past
    ``max_connections``, 10,000 by default, which two gateways at exactly 10,000 each already
    hit; both variants get the same three. Load clients are children of this module
    (``--client``), one process per gateway, on raw sockets (sseclient's parser). Once both gateways' ``/stats`` count every listener, every task
    publishes at the same rate from one loop in the suite's process (``pacing.paced_rounds``,
    one call of the append script per round, as the streams scenario does): 0.25 events/s
    per task, 5,000 events/s in all, for 16 s. At 10,000/s the publisher, Redis, three
    gateways and the load clients saturated the 2 shared cores and the rows measured the
    host, not the two designs. CPU and RSS come from /proc, sampled every 0.2 s. The variants
    run A B B A (two rounds), each on fresh processes. Quick mode: 8 clients x 5 tasks on two
    gateways, 2 events/s, 3 s, one round.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from streamcoord.client import streams_path
from streamcoord.tokens import mint

from .. import stats
from ..contenders import Endpoint
from ..contenders.streamcoord import SECRET, TOKEN_SECONDS, GatewayApp, Streamcoord
from ..load import LoadClients, LoadPlan, merge_reports
from ..loadclient import CONNECT_CONCURRENCY, RETRY_DELAY, until_first
from ..pacing import event_count, paced_rounds
from ..procs import Child, clean_env, make_dir, python_argv, time_limit
from ..rows import log
from ..sampler import ProcSampler, proc_rss_mb
from ..sseclient import SseConnection, build_request
from . import Context, Row


@dataclasses.dataclass(frozen=True)
class Shape:
    clients: int
    tasks_per_client: int
    rate: float  # events/s published to each task
    seconds: float
    gateways: int
    client_procs: int
    connect_within: float
    drain: float
    settle: float  # seconds before each RSS reading

    @property
    def tasks(self) -> int:
        return self.clients * self.tasks_per_client


SHAPE = Shape(clients=1000, tasks_per_client=20, rate=0.25, seconds=16.0, gateways=3,
              client_procs=3, connect_within=150.0, drain=20.0, settle=2.0)
QUICK_SHAPE = Shape(clients=8, tasks_per_client=5, rate=2.0, seconds=3.0, gateways=2,
                    client_procs=1, connect_within=20.0, drain=5.0, settle=0.5)
#: The variants (does a client follow its tasks on one connection?), round by round: A B B A,
#: so a drift of the shared machine's load weighs on both alike. Quick mode runs the first.
ROUNDS = ((True, False), (False, True))
#: A second round starts only this early in the scenario (its limit is __main__'s 600 s).
SECOND_ROUND_BY = 240.0


# -- the load client (a child process) ---------------------------------------------------------

#: The publisher's fields (pacing.stamped_data): its time, the event's number, the task.
_STAMP = re.compile(rb'"t":([-+.0-9eE]+),"n":(\d+),"_task_id":"?(\d+)')


@dataclasses.dataclass
class Tally:
    events: int = 0
    sse_bytes: int = 0
    out_of_order: int = 0
    first_delivery: float = 0.0
    last_delivery: float = 0.0
    histogram: stats.Histogram = dataclasses.field(default_factory=dict)


class Follower(SseConnection):
    """One connection following ``tasks`` tasks (one, or many multiplexed): each task's events
    in order, 1, 2, ..., ``final`` (its ``complete``); done when every task got its last."""

    def __init__(self, request: bytes, tasks: int, final: int, tally: Tally) -> None:
        super().__init__(request)
        self.tasks = tasks
        self.final = final
        self.tally = tally
        self.last: dict[bytes, int] = {}
        self.ended = 0
        #: Resolved when the response head has come (or the connection is done with).
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.status and not self.answered.done():
            self.answered.set_result(None)

    def finish(self) -> None:
        super().finish()
        if not self.answered.done():
            self.answered.set_result(None)

    def _take_frames(self, body: bytes, now: float) -> None:
        whole = self._whole_frames(body)
        if not whole:
            return
        tally = self.tally
        tally.sse_bytes += len(whole)
        stamps = _STAMP.findall(whole)
        if not stamps:
            return
        last = self.last
        for t, n, task in stamps:
            stats.record(tally.histogram, now - float(t))
            number = int(n)
            if number != last.get(task, 0) + 1:
                tally.out_of_order += 1
            last[task] = number
            if number == self.final:
                self.ended += 1
        self.events += len(stamps)
        tally.events += len(stamps)
        tally.first_delivery = tally.first_delivery or now
        tally.last_delivery = now
        if self.ended >= self.tasks:
            self.completed = True
            self.finish()


async def follow_all(plan: dict[str, Any], max_seconds: float) -> dict[str, Any]:
    """Open every connection of ``plan`` to its gateway, receive until each has all its tasks'
    events (or SIGTERM, or ``max_seconds``), and report."""
    loop = asyncio.get_running_loop()
    begun = time.time()
    tally = Tally()
    final, socket = plan["final"], plan["socket"]
    conns = [Follower(build_request(c["path"]), c["tasks"], final, tally) for c in plan["connections"]]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(conn: Follower) -> None:
        # The gate is held until the answer: a gateway sees at most CONNECT_CONCURRENCY
        # requests at once per load client, as a steady state would, not a reconnect storm.
        async with gate:
            while True:
                try:
                    await loop.create_unix_connection(lambda: conn, socket)
                    await conn.answered
                    return
                except BlockingIOError:  # the accept queue is full: a unix socket does not wait
                    if time.time() > begun + max_seconds:
                        conn.finish()
                        return
                    await asyncio.sleep(RETRY_DELAY)
                except OSError:
                    conn.finish()
                    return

    opening = asyncio.ensure_future(asyncio.gather(*map(open_one, conns)))
    await until_first({opening, stopped}, begun + max_seconds)
    ok = sum(1 for c in conns if c.transport is not None)
    print(f"load client: connected ok={ok} failed={len(conns) - ok}", file=sys.stderr, flush=True)
    cpu0 = time.process_time()
    ending = asyncio.ensure_future(asyncio.gather(*(c.done for c in conns)))
    await until_first({ending, stopped}, begun + max_seconds)
    expected = [c.tasks * final for c in conns]
    report = {
        "connections": len(conns),
        "events": tally.events,
        "sse_bytes": tally.sse_bytes,
        "out_of_order": tally.out_of_order,
        "missing": sum(max(0, e - c.events) for c, e in zip(conns, expected, strict=True)),
        "completed": sum(1 for c in conns if c.completed),
        "statuses": {str(s): n for s, n in _count(c.status for c in conns).items()},
        "first_delivery": tally.first_delivery,
        "last_delivery": tally.last_delivery,
        "latency_histogram": tally.histogram,
        "run_cpu_seconds": round(time.process_time() - cpu0, 3),
    }
    for conn in conns:
        conn.finish()
    for future in (opening, ending, stopped):
        future.cancel()
    return report


def _count(values: Any) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


class FollowerClients(LoadClients):
    """The load-client children of one variant (this module with ``--client``), one plan file
    each; LoadClients waits for them, collects their reports and stops them."""

    def __init__(self, plans: list[dict[str, Any]], max_seconds: float, workdir: Path) -> None:
        super().__init__(LoadPlan("live", [], max_seconds), Endpoint(), workdir)
        self.plans = plans

    async def start(self) -> None:
        make_dir(self.workdir)
        for i, plan in enumerate(self.plans):
            plan_file = self.workdir / f"plan-{i}.json"
            plan_file.write_text(json.dumps(plan))
            argv = python_argv("tests.bench.scenarios.multiplex", "--client", str(plan_file),
                               "--max-seconds", f"{self.plan.max_seconds:g}")
            self.children.append(await Child.spawn(f"load client {i}", argv, report=True))


# -- the suite side ----------------------------------------------------------------------------


async def run(ctx: Context) -> list[Row]:
    shape = QUICK_SHAPE if ctx.quick else SHAPE
    begun = time.monotonic()
    rows = []
    for number, variants in enumerate(ROUNDS[:1] if ctx.quick else ROUNDS, start=1):
        if number > 1 and time.monotonic() - begun > SECOND_ROUND_BY:
            log(f"multiplex: no round {number} (the first took {time.monotonic() - begun:.0f}s)")
            break
        for multiplexed in variants:
            rows.append(await measured(ctx, shape, multiplexed, number))
    return rows


def variant_name(shape: Shape, multiplexed: bool) -> str:
    if multiplexed:
        return f"streamcoord, 1 connection x {shape.tasks_per_client} tasks (/streams)"
    return f"streamcoord, {shape.tasks_per_client} connections x 1 task (/stream)"


async def measured(ctx: Context, shape: Shape, multiplexed: bool, number: int) -> Row:
    """One variant's row; a failure becomes a row saying why."""
    name = variant_name(shape, multiplexed)
    connections = shape.clients * (1 if multiplexed else shape.tasks_per_client)
    params = {"round": number, "clients": shape.clients, "tasks_per_client": shape.tasks_per_client,
              "connections": connections, "rate_per_task": shape.rate, "seconds": shape.seconds}
    workdir = ctx.workdir / "multiplex" / f"{number}-{'mux' if multiplexed else 'single'}"
    limit = shape.connect_within * 2 + shape.seconds * 2 + shape.drain + 120
    try:
        async with time_limit(limit, f"the multiplex variant {name!r} (its hard limit)"):
            metrics, notes = await measure(shape, multiplexed, workdir)
        row = Row("multiplex", name, params, metrics, notes)
    except Exception as exc:  # the row records the failure; the other variant still runs
        log(f"multiplex {name} failed: {type(exc).__name__}: {exc}")
        row = Row("multiplex", name, params, {}, f"failed: {type(exc).__name__}: {exc}")
    log(f"[multiplex] {name}: " + " ".join(
        f"{k}={row.metrics.get(k)}" for k in ("deliveries_per_s", "p50_ms", "p99_ms",
                                              "server_cpu_pct", "kb_per_client", "bytes_per_delivery")
    ))
    return row


def client_plans(shape: Shape, multiplexed: bool, sockets: list[Path]) -> list[dict[str, Any]]:
    """One plan per load-client process: client ``c`` follows tasks ``c * k + 1 .. c * k + k``
    on gateway ``c % gateways``; each load client talks to one gateway only."""
    k, gateways = shape.tasks_per_client, shape.gateways
    per_gateway = max(1, shape.client_procs // gateways)  # load clients per gateway
    final = event_count(shape.rate, shape.seconds) + 1  # the ``complete`` event's number
    plans: list[dict[str, Any]] = [
        {"socket": str(sockets[g]), "final": final, "connections": []}
        for g in range(gateways) for _ in range(per_gateway)
    ]
    for c in range(shape.clients):
        refs = [Streamcoord.ref(n) for n in range(c * k + 1, c * k + k + 1)]
        gateway, turn = c % gateways, c // gateways % per_gateway
        plan = plans[gateway * per_gateway + turn]
        if multiplexed:
            token = mint(SECRET, refs, expires_in=TOKEN_SECONDS)
            plan["connections"].append({"path": f"{streams_path(refs)}&token={token}", "tasks": k})
        else:
            for ref in refs:
                token = mint(SECRET, [ref], expires_in=TOKEN_SECONDS)
                path = f"/stream/{ref.app_label}/{ref.model}/{ref.pk}?token={token}"
                plan["connections"].append({"path": path, "tasks": 1})
    return [p for p in plans if p["connections"]]


async def start_gateway(index: int, workdir: Path, contender: Streamcoord) -> GatewayApp:
    """Another gateway on the contender's Redis, configured as its own (Streamcoord.serve)."""
    assert contender.redis_server is not None
    socket = make_dir(workdir / f"gw{index}") / "gw.sock"
    admin = socket.with_name("gw.admin.sock")
    gateway = GatewayApp(socket, admin, python_argv(
        "streamcoord", "gateway", "--socket", str(socket), "--admin-socket", str(admin)
    ))
    await gateway.start(clean_env(
        STREAMCOORD_REDIS_URL=contender.redis_server.url,
        STREAMCOORD_CLIENT_QUEUE_SIZE=str(contender.queue_size),
        STREAMCOORD_LAZY_START="0", STREAMCOORD_SECRET=SECRET,
    ))
    return gateway


async def diagnosis(gateways: list[GatewayApp], clients: FollowerClients) -> str:
    """Why the listeners did not all come: what the clients were answered, what each gateway
    counts, and the end of its log."""
    reports = merge_reports(await clients.reports(0))
    parts = [f"clients: statuses {reports.get('statuses')}, connections {reports.get('connections')}"]
    for i, gateway in enumerate(gateways):
        counts = await gateway.get("/stats")
        tail = gateway.child.log_tail(5) if gateway.child is not None else ""
        parts.append(f"gateway {i}: {counts}; log: {tail}")
    return " | ".join(parts)


async def measure(shape: Shape, multiplexed: bool, workdir: Path) -> tuple[dict[str, Any], str]:
    contender = Streamcoord()
    gateways: list[GatewayApp] = []
    clients: FollowerClients | None = None
    try:
        endpoint = await contender.start(workdir / "server", shape.tasks)
        assert contender.gateway is not None and endpoint.redis_pid is not None
        gateways = [contender.gateway]
        gateways += await asyncio.gather(*(
            start_gateway(i, workdir / "server", contender) for i in range(1, shape.gateways)
        ))
        pids = [g.pid for g in gateways]
        await asyncio.sleep(shape.settle)
        rss_idle = sum(proc_rss_mb(pid) for pid in pids)
        plans = client_plans(shape, multiplexed, [g.socket for g in gateways])
        max_seconds = shape.connect_within + shape.seconds * 2 + shape.drain + 60
        clients = FollowerClients(plans, max_seconds, workdir / "load")
        await clients.start()
        connected, failed = await clients.wait_connected(shape.connect_within)
        per_gateway = [shape.clients // shape.gateways + (g < shape.clients % shape.gateways)
                       for g in range(shape.gateways)]
        try:
            await asyncio.gather(*(
                g.wait_for_listeners(n * shape.tasks_per_client, shape.connect_within)
                for g, n in zip(gateways, per_gateway, strict=True)
            ))
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}: {await diagnosis(gateways, clients)}") from None
        await asyncio.sleep(shape.settle)
        rss_clients = sum(proc_rss_mb(pid) for pid in pids)
        gateway_stats = [await g.get("/stats") for g in gateways]
        sampler = ProcSampler({
            **{f"server-{i}": pid for i, pid in enumerate(pids)}, "redis": endpoint.redis_pid,
            **{f"client-{i}": pid for i, pid in enumerate(clients.pids)}, "bench": os.getpid(),
        })
        async with sampler.running():
            start = time.time()
            per_task = await paced_rounds(shape.tasks, shape.rate, shape.seconds, contender.publish_due)
            publish_seconds = time.time() - start
            report = merge_reports(await clients.reports(shape.drain))
    finally:
        if clients is not None:
            await clients.stop()
        for gateway in gateways[1:]:
            await gateway.stop()
        await contender.stop()
    end = report.get("last_delivery") or time.time()
    events = report.get("events", 0)
    first, last = report.get("first_delivery"), report.get("last_delivery")
    window = (last - first + 1 / shape.rate) if first and last else 0.0
    server_cpu = sampler.cpu_percent("server", start, end)
    connections = sum(s["stream_connections"] for s in gateway_stats)
    growth_kb = (rss_clients - rss_idle) * 1024
    metrics = {
        "connected": connected,
        "stream_connections": connections,
        "listeners": sum(s["listeners"] for s in gateway_stats),
        "offered_per_s": round(shape.rate * shape.tasks, 1),
        "deliveries_per_s": stats.per_second(events, window),
        "missing": report.get("missing"),
        "out_of_order": report.get("out_of_order"),
        **stats.summary_ms(stats.merge([report.get("latency_histogram", {})])),
        "publish_rate": stats.per_second(per_task * shape.tasks, publish_seconds),
        "server_cpu_pct": server_cpu,
        "server_cpu_us_per_delivery": (
            round(server_cpu / 100 * (end - start) / events * 1e6, 1) if server_cpu and events else None
        ),
        "redis_cpu_pct": sampler.cpu_percent("redis", start, end),
        "client_cpu_pct": sampler.cpu_percent("client", start, end),
        "bench_cpu_pct": sampler.cpu_percent("bench", start, end),
        "other_cpu_pct": sampler.others_cpu_percent(start, end),
        "rss_idle_mb": round(rss_idle, 1),
        "rss_clients_mb": round(rss_clients, 1),
        "rss_peak_mb": sampler.peak_rss_mb("server", start, end),
        "kb_per_client": round(growth_kb / shape.clients, 1),
        "kb_per_connection": round(growth_kb / connections, 1) if connections else None,
        "bytes_per_delivery": round(report.get("sse_bytes", 0) / events, 1) if events else None,
        "window_s": round(window, 2),
    }
    notes = []
    refused = {s: n for s, n in report.get("statuses", {}).items() if s not in ("200", "0")}
    if refused:
        notes.append(f"answers other than 200: {refused}")
    if failed:
        notes.append(f"{failed} connections failed to connect")
    unfinished = connected - report.get("completed", 0)
    if unfinished:
        notes.append(f"{unfinished} connections did not get every task's complete event within "
                     f"the drain limit ({shape.drain:g}s)")
    return metrics, "; ".join(notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scenarios.multiplex",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", required=True, help="a load client's plan (JSON)")
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args(argv)
    plan = json.loads(Path(args.client).read_text())
    json.dump(uvloop.run(follow_all(plan, args.max_seconds)), sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
