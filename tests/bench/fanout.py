"""Fan-out benchmark: one gateway process, N SSE clients on one task, one publisher.

What it measures
    How well ONE gateway process fans a single task's events out to many clients: delivered
    events per second (all clients together), publish-to-client latency (p50/p99/max), the
    gateway's CPU and memory, how many Redis connections the gateway holds (one hub reader plus a
    small pool, whatever the client count), and whether every client got every event.

How
    The benchmark process starts its own redis-server and one ``python -m streamcoord gateway``,
    both on unix sockets in a temporary directory (no TCP port is bound), registers the model
    and declares the task. A separate load-client process (this module with ``--client-mode``)
    opens N raw HTTP/1.1 connections to ``/stream/bench/Job/1`` and decodes the chunked SSE body
    by hand, cheaply. Once the gateway's ``/stats`` shows N listeners, the publisher appends
    ``--rate`` events per second for ``--seconds`` (payload ``{"t": time.time(), "n": i}``),
    then a ``complete`` event. Each client records ``time.time() - t`` per event in a 0.1 ms
    histogram and reports it, its event counts and its own CPU time as one JSON document on
    stdout. Gateway and Redis CPU come from ``/proc/<pid>/stat``, sampled during the run and
    interpolated to the window from the first publish to the last delivery.

    Everything shares one machine (and its cores), so a load client or publisher that saturates
    a core shows up in the latencies too: read the client CPU column before blaming the gateway.

Usage::

    .venv/bin/python -m tests.bench.fanout --clients 1000 --rate 100 --seconds 10

Prints a Markdown table (header and one row) and writes the full result as JSON to
``bench-results/fanout-<clients>-<rate>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # the load client imports none of these
    import httpx
    from redis.asyncio import Redis

    from streamcoord.eventlog import TaskWriter
    from streamcoord.ids import EventId

REPO = Path(__file__).resolve().parent.parent.parent
APP, MODEL, PK = "bench", "Job", "1"
STREAM_PATH = f"/stream/{APP}/{MODEL}/{PK}"
#: Width of one latency histogram bucket, in seconds.
BUCKET_SECONDS = 1e-4
#: Connections the load client opens at once (the rest wait), so the accept backlog never fills.
CONNECT_CONCURRENCY = 100
#: How often gateway and Redis CPU/RSS are sampled from /proc.
SAMPLE_INTERVAL = 0.2
#: After the last publish, how long the load clients get to receive everything and exit.
DRAIN_SECONDS = 30.0
#: Seconds of the hard limit (``--seconds`` + this) for a whole run.
HARD_LIMIT_EXTRA = 60.0


# -- latency histograms ------------------------------------------------------------------------


def merge_histograms(histograms: list[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for histogram in histograms:
        for bucket, count in histogram.items():
            merged[bucket] = merged.get(bucket, 0) + count
    return merged


def percentile_ms(histogram: dict[int, int], fraction: float) -> float | None:
    """The latency below which ``fraction`` of the samples fall (bucket upper edge), in ms."""
    total = sum(histogram.values())
    if not total:
        return None
    wanted = fraction * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= wanted:
            return round((bucket + 1) * BUCKET_SECONDS * 1000, 2)
    raise AssertionError("unreachable: the cumulative count reaches the total")


# -- the load client (a child process) ---------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """What all connections of one load client received, together."""

    events: int = 0
    histogram: dict[int, int] = dataclasses.field(default_factory=dict)
    first_delivery: float = 0.0
    last_delivery: float = 0.0
    cpu_at_first: float = 0.0
    out_of_order: int = 0


class StreamCounter(asyncio.Protocol):
    """One SSE connection: writes the GET, de-chunks the body and tallies each event.

    Built for many connections in one process: no StreamReader, one ``time.time()`` per read,
    and an event is parsed only as far as its ``"t"`` and ``"n"`` fields.
    """

    def __init__(self, request: bytes, tally: Tally) -> None:
        self.request = request
        self.tally = tally
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None
        self.status = 0
        self.events = 0
        self.completed = False  # the terminal event arrived
        self.ended = False  # the chunked body ended (or the connection closed)
        self._last_n = 0
        self._in_head = True
        self._raw = b""  # bytes not de-chunked yet
        self._text = b""  # de-chunked SSE text not split into frames yet
        self._chunk_left = 0
        self._skip = 0  # CRLF after a chunk's data still to skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        cast(asyncio.WriteTransport, transport).write(self.request)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        now = time.time()
        raw = self._raw + data if self._raw else data
        pos = 0
        if self._in_head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self._raw = raw
                return
            self.status = int(raw[9:12])  # "HTTP/1.1 200 OK"
            if self.status != 200:
                self._finish()
                return
            self._in_head = False
            pos = end + 4
        body = self._dechunk(raw, pos)
        if body:
            self._take_frames(body, now)
        if self.ended:
            self._finish()

    def _dechunk(self, raw: bytes, pos: int) -> bytes:
        parts = []
        size = len(raw)
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                pos += step
                self._skip -= step
            elif self._chunk_left:
                step = min(self._chunk_left, size - pos)
                parts.append(raw[pos : pos + step])
                pos += step
                self._chunk_left -= step
                if not self._chunk_left:
                    self._skip = 2
            else:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                chunk = int(raw[pos:eol], 16)
                pos = eol + 2
                if chunk == 0:  # the last chunk: the response is complete
                    self.ended = True
                    pos = size
                    break
                self._chunk_left = chunk
        self._raw = raw[pos:]
        return b"".join(parts)

    def _take_frames(self, body: bytes, now: float) -> None:
        frames = (self._text + body).split(b"\n\n")
        self._text = frames.pop()
        tally = self.tally
        for frame in frames:
            t_at = frame.find(b'"t":')
            if t_at < 0:  # a comment (stream open, heartbeat) or the retry field
                continue
            t_end = frame.find(b",", t_at)
            n_at = frame.find(b'"n":', t_end)
            n_end = frame.find(b",", n_at)
            bucket = max(0, int((now - float(frame[t_at + 4 : t_end])) / BUCKET_SECONDS))
            tally.histogram[bucket] = tally.histogram.get(bucket, 0) + 1
            n = int(frame[n_at + 4 : n_end])
            if n != self._last_n + 1:
                tally.out_of_order += 1
            self._last_n = n
            self.events += 1
            if not tally.events:
                tally.first_delivery = now
                tally.cpu_at_first = time.process_time()
            tally.events += 1
            tally.last_delivery = now
            if b"\nevent: complete\n" in frame:
                self.completed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def open_connections(
    socket_path: str, path: str, count: int, tally: Tally
) -> tuple[list[StreamCounter], int]:
    """Open ``count`` SSE connections; returns them and the number that failed to connect."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n\r\n".encode()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect() -> StreamCounter:
        async with gate:
            _, protocol = await loop.create_unix_connection(
                lambda: StreamCounter(request, tally), socket_path
            )
            return protocol

    results = await asyncio.gather(*(connect() for _ in range(count)), return_exceptions=True)
    connections = [r for r in results if isinstance(r, StreamCounter)]
    return connections, count - len(connections)


async def run_load_client(
    socket_path: str, path: str, count: int, max_seconds: float
) -> dict[str, Any]:
    """Connect, receive until every stream ends (or SIGTERM, or ``max_seconds``), and report."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    connections, connect_errors = await open_connections(socket_path, path, count, tally)
    print(f"load client: {len(connections)} connected, {connect_errors} failed", file=sys.stderr)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    all_done: asyncio.Future[Any] = asyncio.gather(*(c.done for c in connections))
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    await asyncio.wait(
        {all_done, stopped}, timeout=max_seconds, return_when=asyncio.FIRST_COMPLETED
    )
    end, cpu_end = time.time(), time.process_time()
    all_ended = all_done.done()
    stopped.cancel()
    for connection in connections:
        connection._finish()
    return {
        "connections": len(connections),
        "connect_errors": connect_errors,
        "statuses": dict(collections.Counter(c.status for c in connections)),
        "events": tally.events,
        "events_per_connection": dict(collections.Counter(c.events for c in connections)),
        "completed": sum(1 for c in connections if c.completed),
        "out_of_order": tally.out_of_order,
        "all_ended": all_ended,
        "first_delivery": tally.first_delivery,
        "last_delivery": tally.last_delivery,
        "cpu_seconds": cpu_end - tally.cpu_at_first if tally.events else 0.0,
        "cpu_wall_seconds": end - tally.first_delivery if tally.events else 0.0,
        "latency_histogram": tally.histogram,
    }


def client_main(args: argparse.Namespace) -> int:
    """``--client-mode``: run the load client and print its report as JSON on stdout."""
    coroutine = run_load_client(args.socket, args.path, args.clients, args.max_seconds)
    try:
        import uvloop  # uvicorn[standard] installs it; it makes the client cheaper
    except ImportError:
        report = asyncio.run(coroutine)
    else:
        report = uvloop.run(coroutine)
    json.dump(report, sys.stdout)
    sys.stdout.flush()
    return 0


# -- processes: start, watch, stop -------------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def host_cpu_seconds() -> float:
    """CPU time all cores of this machine spent busy (not idle, not waiting for I/O) so far."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user..steal; guest time is inside user


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclasses.dataclass(frozen=True)
class ProcSample:
    at: float  # time.time()
    cpu: float  # cumulative CPU seconds
    rss_mb: float


class ProcSampler:
    """Samples the CPU time and RSS of some processes every ``interval`` seconds, and the busy
    time of the whole machine (as ``"host"``), which is shared: other work shows up there."""

    def __init__(self, pids: dict[str, int], interval: float = SAMPLE_INTERVAL) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[ProcSample]] = {name: [] for name in [*pids, "host"]}

    def sample(self) -> None:
        now = time.time()
        self.samples["host"].append(ProcSample(now, host_cpu_seconds(), 0.0))
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, ValueError, IndexError):  # the process is gone
                self.samples[name].append(ProcSample(now, proc_cpu_seconds(pid), proc_rss_mb(pid)))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def cpu_percent(self, name: str, start: float, end: float) -> float | None:
        """Mean CPU use between two wall-clock times, as % of one core."""
        samples = self.samples[name]
        if len(samples) < 2 or end <= start:
            return None
        used = _cpu_at(samples, end) - _cpu_at(samples, start)
        return round(100 * used / (end - start), 1)

    def peak_rss_mb(self, name: str, start: float, end: float) -> float | None:
        inside = [s.rss_mb for s in self.samples[name] if start <= s.at <= end]
        return round(max(inside), 1) if inside else None


def _cpu_at(samples: list[ProcSample], at: float) -> float:
    """Cumulative CPU time at ``at``, interpolated between the samples around it."""
    if at <= samples[0].at:
        return samples[0].cpu
    for before, after in itertools.pairwise(samples):
        if before.at <= at <= after.at:
            share = (at - before.at) / (after.at - before.at) if after.at > before.at else 0.0
            return before.cpu + share * (after.cpu - before.cpu)
    return samples[-1].cpu


@contextlib.asynccontextmanager
async def time_limit(seconds: float, what: str) -> AsyncIterator[None]:
    """``asyncio.timeout`` whose TimeoutError says what was being waited for."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise TimeoutError(f"timed out after {seconds:g}s waiting for {what}") from None


class Child:
    """A subprocess we started: its stdout is kept (``report``) or logged, stderr is logged.

    Stopped by its own pid only (SIGTERM, then SIGKILL).
    """

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._readers: list[asyncio.Task[bytes]] = []

    @classmethod
    async def spawn(
        cls, name: str, argv: list[str], *, report: bool = False, env: dict[str, str] | None = None
    ) -> Child:
        """Start ``argv``. With ``report`` its stdout is collected whole (see :meth:`report`);
        otherwise stdout and stderr go to the log."""
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if report else asyncio.subprocess.STDOUT,
        )
        return cls(name, process)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.log)[-lines:])

    async def wait_for_line(self, marker: str, seconds: float) -> None:
        """Read the log output until a line contains ``marker``, then keep draining it. A child
        that exits or stays silent for ``seconds`` is stopped, and the error says why."""
        assert self.process.stdout is not None
        try:
            async with time_limit(seconds, f"{self.name} to log {marker!r}"):
                while marker not in (line := await self._log_line(self.process.stdout)):
                    if not line:
                        code = await self.process.wait()
                        raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")
        except BaseException:
            await self.stop()
            raise
        self._drain(self.process.stdout)

    async def _log_line(self, stream: asyncio.StreamReader) -> str:
        line = (await stream.readline()).decode(errors="replace")
        if line:
            self.log.append(line.rstrip())
        return line

    def collect(self) -> None:
        """Start reading stdout whole (the report) and draining stderr into the log."""
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers.append(asyncio.create_task(self.process.stdout.read()))
        self._drain(self.process.stderr)

    async def report(self) -> bytes:
        return await self._readers[0]

    def _drain(self, stream: asyncio.StreamReader) -> None:
        async def drain() -> bytes:
            async for line in stream:
                self.log.append(line.decode(errors="replace").rstrip())
            return b""

        self._readers.append(asyncio.create_task(drain()))

    async def stop(self, grace: float = 10) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def start_redis(workdir: Path) -> Child:
    """A redis-server of our own on a unix socket (``--port 0``: no TCP at all), no persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    child = await Child.spawn("redis-server", [
        binary, "--port", "0", "--unixsocket", str(workdir / "redis.sock"),
        "--unixsocketperm", "700", "--dir", str(workdir), "--save", "", "--appendonly", "no",
    ])
    # "Ready to accept connections" (7.x) or "The server is now ready to accept connections".
    await child.wait_for_line("eady to accept connections", 10)
    return child


async def start_gateway(workdir: Path, redis_url: str, queue_size: int) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCOORD_")}
    env["STREAMCOORD_REDIS_URL"] = redis_url
    env["STREAMCOORD_CLIENT_QUEUE_SIZE"] = str(queue_size)
    argv = [sys.executable, "-m", "streamcoord", "gateway", "--socket", str(workdir / "gw.sock")]
    child = await Child.spawn("gateway", argv, env=env)
    await child.wait_for_line("listening on", 20)
    return child


async def start_load_client(workdir: Path, clients: int, max_seconds: float) -> Child:
    """A ``--client-mode`` child of this module; its JSON report comes on stdout."""
    argv = [
        sys.executable, "-m", "tests.bench.fanout", "--client-mode", "--socket", str(workdir / "gw.sock"),
        "--path", STREAM_PATH, "--clients", str(clients), "--max-seconds", f"{max_seconds:g}",
    ]
    child = await Child.spawn("load client", argv, report=True)
    child.collect()
    return child


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- the benchmark process ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    clients: int
    rate: float
    seconds: float
    client_procs: int = 1
    queue_size: int = 10_000
    out_dir: Path = REPO / "bench-results"


@dataclasses.dataclass(frozen=True)
class PublishResult:
    count: int  # events published, the terminal one included
    first: float  # time.time() of the first append
    last: float  # time.time() the terminal append returned
    errors: int


async def publish(writer: TaskWriter, rate: float, seconds: float) -> PublishResult:
    """Append ``rate * seconds`` progress events on a fixed schedule, then ``complete``.

    Appends after the first are not awaited one by one (the writer numbers them at submit and
    its publisher pipelines them), so a slow round trip does not lower the offered rate.
    """
    total = max(1, round(rate * seconds))
    interval = 1.0 / rate
    first = time.time()
    await writer.append("progress", {"t": time.time(), "n": 1})  # opens the stream's epoch
    start = time.monotonic()
    pending: list[asyncio.Task[EventId]] = []
    for n in range(2, total + 1):
        delay = start + (n - 1) * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(writer.append("progress", {"t": time.time(), "n": n})))
    results = await asyncio.gather(*pending, return_exceptions=True)
    errors = sum(1 for r in results if isinstance(r, BaseException))
    await writer.append("complete", {"t": time.time(), "n": total + 1})
    return PublishResult(total + 1, first, time.time(), errors)


async def gateway_stats(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/stats")
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


async def wait_for_listeners(http: httpx.AsyncClient, expected: int, clients: list[Child]) -> None:
    """Poll the gateway's /stats until ``expected`` clients listen (wrap in a time limit)."""
    while (await gateway_stats(http))["listeners"] < expected:
        for client in clients:
            if not client.running:
                raise RuntimeError(f"a load client exited early:\n{client.log_tail()}")
        await asyncio.sleep(0.1)


async def gateway_redis_connections(redis: Redis, pid: int) -> int:
    """Redis connections a gateway holds, by the client names streamcoord gives them."""
    clients: list[dict[str, Any]] = await redis.client_list()
    return sum(1 for c in clients if str(c.get("name", "")).endswith(f":{pid}"))


async def collect_reports(clients: list[Child], grace: float) -> list[dict[str, Any]]:
    """Wait for the load clients to finish; after ``grace`` seconds SIGTERM them, which makes
    them report what they have. Returns their reports."""
    waits = [asyncio.ensure_future(c.process.wait()) for c in clients]
    _, late = await asyncio.wait(waits, timeout=grace)
    for client in clients:
        if client.running:
            print(f"fanout: load client {client.pid} still running after {grace:g}s; stopping it",
                  file=sys.stderr)
            client.process.send_signal(signal.SIGTERM)
    async with time_limit(15, "the load clients to report"):
        await asyncio.gather(*late)
        outputs = [await c.report() for c in clients]
    reports = []
    for client, output in zip(clients, outputs, strict=True):
        if not output:
            raise RuntimeError(f"load client {client.pid} reported nothing:\n{client.log_tail()}")
        reports.append(json.loads(output))
    return reports


def summarize(
    config: Config,
    published: PublishResult,
    reports: list[dict[str, Any]],
    sampler: ProcSampler,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The run's numbers, from the publisher, the load clients and the sampled processes."""
    histogram = merge_histograms(
        [{int(k): v for k, v in r["latency_histogram"].items()} for r in reports]
    )
    received = sum(r["events"] for r in reports)
    expected = published.count * config.clients
    missing = sum(
        max(0, published.count - int(got)) * conns
        for r in reports for got, conns in r["events_per_connection"].items()
    ) + published.count * sum(r["connect_errors"] for r in reports)
    last_delivery = max(
        (r["last_delivery"] for r in reports if r["events"]), default=published.last
    )
    window = max(last_delivery - published.first, 1e-9)
    client_cpu = sum(r["cpu_seconds"] for r in reports)
    client_wall = max((r["cpu_wall_seconds"] for r in reports), default=0.0)
    publish_seconds = published.last - published.first
    publish_rate = (published.count - 1) / publish_seconds if publish_seconds else 0.0
    cpu = {n: sampler.cpu_percent(n, published.first, last_delivery) for n in sampler.samples}
    ours = sum(v or 0.0 for k, v in cpu.items() if k != "host")
    return {
        "config": {**dataclasses.asdict(config), "out_dir": str(config.out_dir)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "published_events": published.count,
        "publish_errors": published.errors,
        "publish_rate_achieved": round(publish_rate, 1),
        "offered_deliveries_per_s": round(config.rate * config.clients, 1),
        "expected_deliveries": expected,
        "received_deliveries": received,
        "missing_deliveries": missing,
        "out_of_order": sum(r["out_of_order"] for r in reports),
        "clients_completed": sum(r["completed"] for r in reports),
        "window_seconds": round(window, 3),
        "deliveries_per_s": round(received / window, 1),
        "latency_ms": {
            "p50": percentile_ms(histogram, 0.50),
            "p90": percentile_ms(histogram, 0.90),
            "p99": percentile_ms(histogram, 0.99),
            "max": percentile_ms(histogram, 1.0),
            "samples": sum(histogram.values()),
        },
        "gateway_cpu_percent": cpu["gateway"],
        "gateway_rss_mb_peak": sampler.peak_rss_mb("gateway", published.first, last_delivery),
        "redis_cpu_percent": cpu["redis"],
        "client_cpu_percent": round(100 * client_cpu / client_wall, 1) if client_wall else None,
        # Sampled from /proc over the same window, in % of one core (the host's 100% per core).
        "cpu_percent_sampled": cpu,
        "other_processes_cpu_percent": round(max(0.0, (cpu["host"] or 0.0) - ours), 1),
        "client_reports": [
            {k: v for k, v in r.items() if k != "latency_histogram"} for r in reports
        ],
        **extra,
    }


MARKDOWN_HEADER = (
    "| clients | rate ev/s | offered deliv/s | delivered/s | missing | p50 ms | p99 ms | max ms "
    "| gateway CPU % | gateway RSS MB | gateway Redis conns | client CPU % |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown_row(result: dict[str, Any]) -> str:
    config, latency = result["config"], result["latency_ms"]
    cells = [
        config["clients"], f"{config['rate']:g}", f"{result['offered_deliveries_per_s']:,.0f}",
        f"{result['deliveries_per_s']:,.0f}", result["missing_deliveries"], latency["p50"],
        latency["p99"], latency["max"], result["gateway_cpu_percent"],
        f"{result['gateway_rss_mb_ready']} → {result['gateway_rss_mb_peak']}",
        result["gateway_redis_connections"], result["client_cpu_percent"],
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


async def run_benchmark(config: Config) -> dict[str, Any]:
    """One run: start Redis and a gateway, connect the clients, publish, measure, clean up."""
    import httpx
    from redis.asyncio import Redis

    from streamcoord.eventlog import EventLog
    from streamcoord.keys import KeySpace, TaskRef
    from streamcoord.registry import register_models
    from streamcoord.settings import Settings

    # The exit stack stops every process we started (load clients, gateway, Redis: the reverse
    # of their start) before the temporary directory goes, whatever happens in between.
    with tempfile.TemporaryDirectory(prefix="scbench-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            workdir = Path(tmp)
            redis_url = f"unix://{workdir / 'redis.sock'}"
            redis_server = await start_redis(workdir)
            stack.push_async_callback(redis_server.stop)
            gateway = await start_gateway(workdir, redis_url, config.queue_size)
            stack.push_async_callback(gateway.stop)
            redis = Redis(unix_socket_path=str(workdir / "redis.sock"))
            stack.push_async_callback(redis.aclose)
            transport = httpx.AsyncHTTPTransport(uds=str(workdir / "gw.sock"))
            http = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10)
            )

            settings = Settings(redis_url=redis_url)
            ref = TaskRef(APP, MODEL, PK)
            await register_models(redis, KeySpace(settings.key_prefix), [(APP, MODEL)])
            log = EventLog(redis, settings)
            await log.declare(ref)

            clients = []
            client_limit = config.seconds + HARD_LIMIT_EXTRA - 10
            for count in split_evenly(config.clients, config.client_procs):
                clients.append(await start_load_client(workdir, count, client_limit))
                stack.push_async_callback(clients[-1].stop)
            async with time_limit(60, f"{config.clients} listeners on the gateway"):
                await wait_for_listeners(http, config.clients, clients)
            redis_conns = [await gateway_redis_connections(redis, gateway.pid)]
            rss_ready = round(proc_rss_mb(gateway.pid), 1)

            pids = {"gateway": gateway.pid, "redis": redis_server.pid, "publisher": os.getpid()}
            pids.update({f"client-{i}": client.pid for i, client in enumerate(clients)})
            sampler = ProcSampler(pids)
            sampling = asyncio.create_task(sampler.run())
            try:
                published = await publish(log.writer(ref), config.rate, config.seconds)
                redis_conns.append(await gateway_redis_connections(redis, gateway.pid))
                reports = await collect_reports(clients, DRAIN_SECONDS)
                sampler.sample()
            finally:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            hub_stats = await gateway_stats(http)
    extra = {
        "gateway_rss_mb_ready": rss_ready,
        "gateway_redis_connections": max(redis_conns),
        "gateway_stats": hub_stats,
        "events_per_hub_read": round(
            hub_stats.get("events", 0) / max(1, hub_stats.get("reads", 0)), 2
        ),
    }
    return summarize(config, published, reports, sampler, extra)


async def run_bounded(config: Config) -> dict[str, Any]:
    """:func:`run_benchmark` within its hard time limit. SIGTERM and SIGINT cancel it, so the
    processes it started are stopped on the way out."""
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main_task.cancel)
    async with time_limit(config.seconds + HARD_LIMIT_EXTRA, "the whole run (its hard limit)"):
        return await run_benchmark(config)


def write_result(config: Config, result: dict[str, Any]) -> Path:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    path = config.out_dir / f"fanout-{config.clients}-{config.rate:g}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    summary = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m tests.bench.fanout", description=summary)
    parser.add_argument("--clients", type=int, default=1000, help="SSE clients on the one task")
    parser.add_argument("--rate", type=float, default=100, help="events published per second")
    parser.add_argument("--seconds", type=float, default=10, help="how long to publish")
    parser.add_argument("--client-procs", type=int, default=1, help="load-client processes")
    parser.add_argument(
        "--queue-size", type=int, default=10_000, help="the gateway's STREAMCOORD_CLIENT_QUEUE_SIZE"
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench-results")
    # Internal: the load-client child.
    parser.add_argument("--client-mode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--path", default=STREAM_PATH, help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=120, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.client_mode:
        return client_main(args)
    if min(args.clients, args.rate, args.seconds) <= 0 or not 0 < args.client_procs <= args.clients:
        print("fanout: clients, rate and seconds must be positive; 1 <= client-procs <= clients",
              file=sys.stderr)
        return 2
    config = Config(
        args.clients, args.rate, args.seconds, args.client_procs, args.queue_size, args.out_dir
    )
    try:
        result = asyncio.run(run_bounded(config))
    except TimeoutError as exc:
        print(f"fanout: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("fanout: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    path = write_result(config, result)
    print(MARKDOWN_HEADER)
    print(markdown_row(result))
    print(
        f"\n{result['received_deliveries']:,} of {result['expected_deliveries']:,} deliveries; "
        f"publish rate {result['publish_rate_achieved']}/s; "
        f"redis CPU {result['redis_cpu_percent']}%; "
        f"CPU of other processes on this {os.cpu_count()}-core host "
        f"{result['other_processes_cpu_percent']}%; "
        f"{result['events_per_hub_read']} events per hub read; written to {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
