"""Worker metrics: what one worker process did, in Prometheus' text format on ``GET /metrics``.

The names are a contract (dashboards and alert rules are written against them); change one only
with them. Every metric lives in a registry of the worker's own, never prometheus_client's global
one: a project's own metrics, or a second worker in the same process (the embedded default, the
tests), never mix with these. ``model`` is ``app_label.Model`` (``unknown`` for a model this
worker lacks): a bounded set. Task ids never become labels.

- ``streamcoord_worker_tasks_started_total{model}``: runs begun here (a take-over's re-run too);
- ``streamcoord_worker_tasks_ended_total{model,outcome}``: terminal events written here, with
  ``outcome`` ``completed``, ``failed`` or ``cancelled``: each run's own end, and the ends recovery
  writes for runs of lost workers (given up: ``failed``; cancelled meanwhile: ``cancelled``), which
  their own worker never counts. A run lost or handed back ends on the worker that took it over;
- ``streamcoord_worker_task_duration_seconds{model}``: begin to end of each run that ended here;
- ``streamcoord_worker_queue_lag_seconds``: age of the oldest job no worker has been given yet
  (0: none; NaN: Redis refused XINFO), looked at every heartbeat, only by a worker whose metrics
  are served;
- ``streamcoord_worker_queue_wait_seconds``: how long each job delivered here had waited;
- ``streamcoord_worker_send_event_seconds``: each append a run here made (``send_event``, and the
  ``attempt`` and terminal events), successful ones only: the count is the events written;
- ``streamcoord_worker_lease_takeovers_total``: runs taken over from a worker whose lease ran out
  (it died, paused, or handed them back on shutdown);
- ``streamcoord_worker_dead_letters_total``: entries this worker listed in ``sc:dead``;
- ``streamcoord_worker_dead_letter_entries``: the entries in ``sc:dead`` now (``XLEN``), a
  Redis fact every measuring worker reports alike (NaN: not measured yet, or Redis refused
  XLEN), looked at with the queue lag. The dead-letters alert reads it, not the counter above:
  a restarted worker lists its predecessor's tasks before its first scrape, so its counter's
  series begins at 1 and ``increase()`` sees nothing. (Its name is not
  ``streamcoord_worker_dead_letters``: that is the counter's family);
- ``streamcoord_worker_running_tasks``, ``streamcoord_worker_concurrency``: runs here now, and
  at most;
- ``streamcoord_worker_redis_errors_total``: Redis failures the claims, runs and periodic rounds
  met (each then retried, or left to recovery).

Recording costs a few lock-protected additions: labelled series are looked up at a run's begin
and end only, and an append costs two clock reads and one histogram observe.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis.asyncio import Redis
from redis.exceptions import ResponseError

#: The ``model`` label of a job whose model this worker does not have.
UNKNOWN_MODEL = "unknown"
#: The ``outcome`` label's values: a row's ended statuses.
OUTCOMES = ("completed", "failed", "cancelled")

# Runs are long (seconds to hours); waits and appends short. The last finite bucket of each is
# about the longest one a healthy deployment sees (two hours; an hour in the queue; the 30 s an
# append retries while Redis is away).
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
APPEND_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)


class WorkerMetrics:
    """The metrics of one worker, in a registry of their own (``registry``, served by
    :class:`MetricsServer`)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.tasks_started = Counter(
            "streamcoord_worker_tasks_started", "Runs this worker began (a take-over's re-run counts too).",
            ["model"], registry=registry,
        )
        self.tasks_ended = Counter(
            "streamcoord_worker_tasks_ended",
            "Terminal events this worker wrote: its runs' ends, and those recovery wrote for lost workers' runs.",
            ["model", "outcome"], registry=registry,
        )
        self.task_duration = Histogram(
            "streamcoord_worker_task_duration_seconds", "Run time of each run that ended on this worker, begin to end.",
            ["model"], buckets=DURATION_BUCKETS, registry=registry,
        )
        self.queue_lag = Gauge(
            "streamcoord_worker_queue_lag_seconds",
            "Age of the oldest job not yet delivered to any worker (0 when none), as of this worker's last look.",
            registry=registry,
        )
        self.queue_wait = Histogram(
            "streamcoord_worker_queue_wait_seconds", "How long each job this worker claimed from the queue had waited.",
            buckets=WAIT_BUCKETS, registry=registry,
        )
        self.send_event = Histogram(
            "streamcoord_worker_send_event_seconds", "Latency of each event appended by a run on this worker.",
            buckets=APPEND_BUCKETS, registry=registry,
        )
        self.lease_takeovers = Counter(
            "streamcoord_worker_lease_takeovers", "Runs this worker took over from a worker whose lease ran out.",
            registry=registry,
        )
        self.dead_letters = Counter(
            "streamcoord_worker_dead_letters", "Entries this worker listed in the dead letters.", registry=registry,
        )
        self.dead_letter_entries = Gauge(
            "streamcoord_worker_dead_letter_entries",
            "Entries in the dead-letter stream (XLEN), as of this worker's last look (NaN: unknown).",
            registry=registry,
        )
        # Unknown until measured: a 0 before the first look would read as dead letters growing.
        self.dead_letter_entries.set(float("nan"))
        self.running_tasks = Gauge(
            "streamcoord_worker_running_tasks", "Runs in progress on this worker.", registry=registry,
        )
        self.concurrency = Gauge(
            "streamcoord_worker_concurrency", "Runs this worker may have at once.", registry=registry,
        )
        self.redis_errors = Counter(
            "streamcoord_worker_redis_errors",
            "Redis failures this worker's claims, runs and periodic rounds met.", registry=registry,
        )
        #: The Redis clock minus this host's (ms), as of the last queue look: job ids carry the
        #: Redis clock, so waits are measured on it, not on a host clock that may be off.
        self.clock_offset_ms = 0.0

    def declare_models(self, models: list[str]) -> None:
        """Show a zero for each model (and outcome) before its first run: a series that appears
        only on its first increment hides that increment from ``rate()`` and ``increase()``."""
        for model in models:
            self.tasks_started.labels(model)
            self.task_duration.labels(model)
            for outcome in OUTCOMES:
                self.tasks_ended.labels(model, outcome)

    def watch_running(self, running: Callable[[], int]) -> None:
        """The running gauge reads ``running()`` at each scrape (exact, nothing to keep in step)."""
        self.running_tasks.set_function(running)

    def run_ended(self, model: str, outcome: str, seconds: float) -> None:
        self.tasks_ended.labels(model, outcome).inc()
        self.task_duration.labels(model).observe(seconds)

    def job_claimed(self, entry_id: str) -> None:
        """A job delivered to this worker: observe how long it waited, on the Redis clock."""
        redis_now_ms = time.time() * 1000 + self.clock_offset_ms
        self.queue_wait.observe(max(0.0, redis_now_ms - entry_ms(entry_id)) / 1000)

    async def measure_queue(self, redis: Redis, jobs_key: str, group: str) -> None:
        """Refresh the queue lag (and the Redis clock's offset): one ``TIME``, one ``XINFO
        GROUPS``, and one ``XRANGE`` after the group's last delivered id unless the group says
        nothing waits."""
        before = time.time() * 1000
        seconds, microseconds = await redis.time()
        # The reply left Redis about halfway through the round trip.
        self.clock_offset_ms = int(seconds) * 1000 + int(microseconds) / 1000 - (before + time.time() * 1000) / 2
        oldest = await oldest_undelivered_ms(redis, jobs_key, group)
        now_ms = time.time() * 1000 + self.clock_offset_ms
        self.queue_lag.set(0.0 if oldest is None else max(0.0, now_ms - oldest) / 1000)

    async def measure_dead_letters(self, redis: Redis, dead_key: str) -> None:
        """Refresh the dead letters' count: one ``XLEN`` (0 when the stream does not exist)."""
        self.dead_letter_entries.set(await redis.xlen(dead_key))


async def oldest_undelivered_ms(redis: Redis, jobs_key: str, group: str) -> int | None:
    """When the oldest entry of the job queue not yet delivered to ``group`` was added (ms, the
    Redis clock); None when every entry was delivered (or there is no queue yet)."""
    try:
        groups: Any = await redis.xinfo_groups(jobs_key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():  # Redis lost the queue: the worker makes it again
            return None
        raise
    info = next((g for g in groups if _text(g.get("name")) == group), None)
    if info is None or info.get("lag") == 0:  # lag is nil when Redis cannot tell (deleted entries)
        return None
    entries: Any = await redis.xrange(jobs_key, min=f"({_text(info['last-delivered-id'])}", count=1)
    return entry_ms(_text(entries[0][0])) if entries else None


def entry_ms(entry_id: str) -> int:
    """The time (ms) in a stream entry's id, ``<ms>-<seq>``."""
    return int(entry_id.partition("-")[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class MetricsServer:
    """``GET /metrics`` of a registry, served by prometheus_client's threaded HTTP server in a
    daemon thread: the worker's event loop never waits for a scrape, and a scrape reads
    consistent values (the metrics lock every change)."""

    httpd: WSGIServer
    url: str

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        """Listen on ``host:port`` (port 0: the kernel picks; :attr:`url` names it). Raises
        OSError when the address cannot be bound."""
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
        bound_port = httpd.server_address[1]
        return cls(httpd, f"http://{_url_host(host)}:{bound_port}/metrics")

    def stop(self) -> None:
        """Stop serving and close the socket (waits for the serving loop's next poll, < 0.5 s)."""
        self.httpd.shutdown()
        self.httpd.server_close()


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host  # a name
