"""The load client: a separate process holding many raw SSE connections, reporting JSON.

Usage (the suite starts it; see tests/bench/load.py)::

    python -m tests.bench.loadclient live --socket S --path /stream/1 --clients 1000
    python -m tests.bench.loadclient resume --host 127.0.0.1 --port P --plan plan.json --events 20

Modes:
    live      count events; latency histogram of ``time.time() - t``; order of ``n`` per
              connection; each connection ends at the terminal event
    latejoin  time from connect to the ``--events``-th event (the history), then close
    resume    connect with a Last-Event-ID: time to the first event, whether it is the one right
              after that id (no gap), then ``--events`` more in order, then close
    idle      hold the connections open until SIGTERM (or ``--max-seconds``)

Connections come from ``--plan`` (JSON: ``{"connections": [{"path", "last_event_id",
"next_n"}]}``) or ``--path`` repeated ``--clients`` times. Once every connection has its
connection is made (or failed) the client writes ``load client: connected ok=N failed=M`` to stderr;
at the end it prints one JSON report on stdout, with its own CPU time. SIGTERM ends any mode
early: the report says what arrived until then.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import stats
from .sseclient import SseConnection, Stamps, build_request

#: Connections attempted at once by default (the rest wait), so the accept backlog never fills.
CONNECT_CONCURRENCY = 100
UNITS_PER_SECOND = round(1 / stats.UNIT_SECONDS)
FINE = stats.bucket_of(0.1)  # below this, a bucket is a unit wide
#: Pause before connecting again to a server whose accept queue is full.
RETRY_DELAY = 0.02


class Live(SseConnection):
    def __init__(self, request: bytes, tally: dict[str, Any]) -> None:
        super().__init__(request)
        self.tally = tally
        self.last_n = 0

    def on_events(self, stamps: Stamps, terminal: bool, now: float) -> None:
        tally = self.tally
        histogram: stats.Histogram = tally["histogram"]
        last_n, out_of_order = self.last_n, 0
        for t, n in stamps:
            bucket = int((now - float(t)) * UNITS_PER_SECOND)  # stats.bucket_of, inlined
            if bucket >= FINE:
                bucket = stats.bucket_of(now - float(t))
            elif bucket < 0:
                bucket = 0
            histogram[bucket] = histogram.get(bucket, 0) + 1
            number = int(n)
            if number != last_n + 1:
                out_of_order += 1
            last_n = number
        self.last_n = last_n
        tally["out_of_order"] += out_of_order
        if not tally["first_delivery"]:
            tally["first_delivery"] = now
        tally["last_delivery"] = now
        super().on_events(stamps, terminal, now)


class LateJoin(SseConnection):
    def __init__(self, request: bytes, wanted: int) -> None:
        super().__init__(request)
        self.wanted = wanted
        self.elapsed: float | None = None

    def on_events(self, stamps: Stamps, terminal: bool, now: float) -> None:
        if self.events >= self.wanted:
            self.elapsed = now - self.started
            self.finish()
        super().on_events(stamps, terminal, now)


class Resume(SseConnection):
    def __init__(self, request: bytes, next_n: int, more: int, histogram: stats.Histogram) -> None:
        super().__init__(request)
        self.next_n = next_n
        self.more = more
        self.histogram = histogram
        self.first_n: int | None = None
        self.out_of_order = 0
        self._last_n = 0

    def on_events(self, stamps: Stamps, terminal: bool, now: float) -> None:
        numbers = [int(n) for _, n in stamps[: self.more + 1]]
        if self.first_n is None:
            self.first_n = self._last_n = numbers[0]
            stats.record(self.histogram, now - self.started)
            numbers = numbers[1:]
        for n in numbers:
            if n != self._last_n + 1:
                self.out_of_order += 1
            self._last_n = n
        if self.events > self.more:
            self.finish()
        super().on_events(stamps, terminal, now)


def make_connections(args: argparse.Namespace, plan: list[dict[str, Any]]) -> tuple[
    list[SseConnection], Callable[[list[SseConnection]], dict[str, Any]]
]:
    """One connection object per plan entry, and the function that reports on them."""
    requests = [build_request(c["path"], c.get("last_event_id")) for c in plan]
    if args.mode == "live":
        tally: dict[str, Any] = {
            "histogram": {}, "out_of_order": 0, "first_delivery": 0.0, "last_delivery": 0.0,
        }
        return [Live(r, tally) for r in requests], lambda conns: {
            **{k: v for k, v in tally.items() if k != "histogram"},
            "latency_histogram": tally["histogram"],
            "events_per_connection": dict(collections.Counter(c.events for c in conns)),
        }
    if args.mode == "latejoin":
        def latejoin_report(conns: list[SseConnection]) -> dict[str, Any]:
            times = [c.elapsed for c in conns if isinstance(c, LateJoin) and c.elapsed is not None]
            return {"seconds": times, "incomplete": len(conns) - len(times)}

        return [LateJoin(r, args.events) for r in requests], latejoin_report
    if args.mode == "resume":
        histogram: stats.Histogram = {}
        conns: list[SseConnection] = [
            Resume(r, int(c["next_n"]), args.events, histogram) for r, c in zip(requests, plan, strict=True)
        ]

        def resume_report(conns: list[SseConnection]) -> dict[str, Any]:
            resumed = [c for c in conns if isinstance(c, Resume)]
            return {
                "first_event_histogram": histogram,
                "gaps": sum(1 for c in resumed if c.first_n is not None and c.first_n > c.next_n),
                "repeats": sum(1 for c in resumed if c.first_n is not None and c.first_n < c.next_n),
                "out_of_order": sum(c.out_of_order for c in resumed),
                "no_event": sum(1 for c in resumed if c.first_n is None),
                "incomplete": sum(1 for c in resumed if c.events <= c.more and not c.completed),
            }

        return conns, resume_report
    return [SseConnection(r) for r in requests], lambda conns: {
        "open_at_end": sum(1 for c in conns if not c.done.done()),
    }


async def connect(args: argparse.Namespace, conn: SseConnection, deadline: float) -> None:
    """Connect ``conn``. A unix socket whose accept queue is full refuses at once (EAGAIN)
    where TCP would retry by itself: retry too, until ``deadline``. ``started`` is the first
    attempt, so a server slow to accept is charged for it."""
    loop = asyncio.get_running_loop()
    conn.started = time.time()
    while True:
        try:
            if args.socket:
                await loop.create_unix_connection(lambda: conn, args.socket)
            else:
                await loop.create_connection(lambda: conn, args.host, args.port)
            return
        except BlockingIOError:
            if time.time() > deadline:
                raise
            await asyncio.sleep(RETRY_DELAY)


async def until_first(futures: set[asyncio.Future[Any]], deadline: float) -> None:
    """Wait until one of ``futures`` is done, or until ``deadline`` (a ``time.time()``)."""
    timeout = max(0.0, deadline - time.time())
    await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)


async def run(args: argparse.Namespace, plan: list[dict[str, Any]]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    wall0, cpu0 = time.time(), time.process_time()
    conns, report = make_connections(args, plan)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    gate = asyncio.Semaphore(1 if args.sequential else args.connect_concurrency)
    errors: list[str] = []

    async def open_one(conn: SseConnection) -> None:
        try:
            async with gate:
                await connect(args, conn, wall0 + args.max_seconds)
                if args.sequential:
                    await conn.done
        except OSError as exc:
            errors.append(type(exc).__name__)
            conn.finish()

    opening: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*map(open_one, conns)))
    await until_first({opening, stopped}, wall0 + args.max_seconds)
    # Connected, not answered: some servers (the predecessor) send the response head only with
    # the first event. The suite asks the server itself whether it holds them all.
    ok = sum(1 for c in conns if c.transport is not None)
    print(f"load client: connected ok={ok} failed={len(conns) - ok}", file=sys.stderr, flush=True)
    wall1, cpu1 = time.time(), time.process_time()
    if args.mode == "idle":
        ending: asyncio.Future[Any] = stopped
    else:
        ending = asyncio.ensure_future(asyncio.gather(*(c.done for c in conns)))
    await until_first({ending, stopped}, wall0 + args.max_seconds)
    wall2, cpu2 = time.time(), time.process_time()
    all_ended = args.mode != "idle" and ending.done()
    result = report(conns)  # before finishing them: idle counts the connections still open
    for conn in conns:
        conn.finish()
    for future in (opening, ending, stopped):
        future.cancel()
    return {
        "mode": args.mode,
        "connections": len(conns),
        "connect_errors": len(errors),
        "connect_error_kinds": dict(collections.Counter(errors)),
        "statuses": dict(collections.Counter(c.status for c in conns)),
        "events": sum(c.events for c in conns),
        "completed": sum(1 for c in conns if c.completed),
        "all_ended": all_ended,
        "stopped_early": stop.is_set(),
        "connect_seconds": round(wall1 - wall0, 3),
        "connect_cpu_seconds": round(cpu1 - cpu0, 3),
        "run_seconds": round(wall2 - wall1, 3),
        "run_cpu_seconds": round(cpu2 - cpu1, 3),
        **result,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.loadclient", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("mode", choices=["live", "latejoin", "resume", "idle"])
    parser.add_argument("--socket", help="unix socket of the server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--path", help="the stream path every connection GETs (without --plan)")
    parser.add_argument("--clients", type=int, default=1, help="connections (without --plan)")
    parser.add_argument("--plan", help="JSON file listing the connections")
    parser.add_argument("--events", type=int, default=0, help="latejoin: events; resume: after the first")
    parser.add_argument("--connect-concurrency", type=int, default=CONNECT_CONCURRENCY)
    parser.add_argument("--sequential", action="store_true", help="one connection after another")
    parser.add_argument("--max-seconds", type=float, default=120, help="the whole run's bound")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.socket and not args.port:
        print("loadclient: --socket or --port is required", file=sys.stderr)
        return 2
    if not args.plan and not args.path:
        print("loadclient: --plan or --path is required", file=sys.stderr)
        return 2
    if args.plan:
        plan: list[dict[str, Any]] = json.loads(Path(args.plan).read_text())["connections"]
    else:
        plan = [{"path": args.path}] * args.clients
    try:
        import uvloop  # uvicorn[standard] installs it; it makes the client cheaper
    except ImportError:
        result = asyncio.run(run(args, plan))
    else:
        result = uvloop.run(run(args, plan))
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
