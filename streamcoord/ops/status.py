"""The whole system at a glance: the job queue, workers, gateways, dead letters and tasks.

``collect_status`` reads it from Redis (any topology) and never blocks it: registries are read
with HSCAN, tasks with SCAN in bounded batches (:mod:`streamcoord.ops.records`). Ages are
measured on the Redis server's clock (``TIME``), as leases and heartbeats are, so an operator's
laptop with a wrong clock still sees the truth. :meth:`Status.to_json` is a contract: the
``streamcoord status --json`` output and the gateway's dashboard both use it, in this shape::

    {"at": ISO time (Redis clock),
     "queue": {"length", "pending", "lag", "oldest_age_seconds"},
     "workers": [{"id", "host", "pid", "concurrency", "running", "heartbeat_age_seconds"}],
     "gateways": [{"id", "host", "pid", "address", "listeners", "streams", "deliveries",
                   "heartbeat_age_seconds"}],
     "dead_letters": {"count", "latest": [{"id", "task", "attempts", "reason", "at"}]},
     "tasks": {"by_state": {"pending": n, ...},
               "running": [{"task", "state", "attempt", "worker", "last_seq", "last_type",
                            "age_seconds", "updated_at"}]}}
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ..jobs import GROUP
from ..keys import KeySpace
from ..presence import heartbeat_ms, iso_of_ms, redis_now_ms
from ..taskstate import State
from .records import BATCH, TaskRecord, scan_records

#: Dead letters listed (the newest first).
LATEST_DEAD_LETTERS = 10
#: States whose tasks are listed as running (a worker holds them, or is told to stop them).
ACTIVE_STATES = frozenset({State.RUNNING, State.CANCELLING})


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStatus:
    """The job queue (``<prefix>:jobs``) and its consumer group."""

    #: entries in the queue stream: waiting for a worker, or claimed and not yet acknowledged
    #: (workers delete an entry when they acknowledge it)
    length: int = 0
    #: entries claimed by a worker and not yet acknowledged (running, or left by a dead worker)
    pending: int = 0
    #: entries not yet delivered to any worker (``XINFO GROUPS`` lag)
    lag: int = 0
    #: how long the oldest entry not yet delivered has waited; None when none waits
    oldest_age_seconds: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStatus:
    id: str
    host: str = ""
    pid: int | None = None
    concurrency: int | None = None
    running: int | None = None
    heartbeat_age_seconds: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayStatus:
    id: str
    host: str = ""
    pid: int | None = None
    address: str = ""
    listeners: int | None = None
    streams: int | None = None
    deliveries: int | None = None
    heartbeat_age_seconds: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    task: str
    attempts: int | None
    reason: str
    at: str


@dataclasses.dataclass(frozen=True, slots=True)
class RunningTask:
    task: str
    state: str
    attempt: int
    worker: str
    last_seq: int
    last_type: str
    age_seconds: float | None
    updated_at: str


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    """One reading of the system (see the module's docstring for its JSON)."""

    at: str
    queue: QueueStatus
    workers: list[WorkerStatus]
    gateways: list[GatewayStatus]
    dead_letter_count: int
    dead_letters: list[DeadLetter]
    by_state: dict[str, int]
    running: list[RunningTask]

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "queue": dataclasses.asdict(self.queue),
            "workers": [dataclasses.asdict(w) for w in self.workers],
            "gateways": [dataclasses.asdict(g) for g in self.gateways],
            "dead_letters": {
                "count": self.dead_letter_count,
                "latest": [dataclasses.asdict(d) for d in self.dead_letters],
            },
            "tasks": {"by_state": dict(self.by_state), "running": [dataclasses.asdict(r) for r in self.running]},
        }


# --- pure parts: registry entries, dead letters, task tallies -------------------------------


def _entry(raw: bytes) -> dict[str, Any]:
    """A registry entry's JSON object; an unreadable one reads as empty (shown, not fatal)."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def _number(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if math.isfinite(value) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def heartbeat_age(raw: bytes, now_ms: int) -> float | None:
    """Seconds since a registry entry's heartbeat (read as :mod:`streamcoord.presence` reads
    it); None for an entry with no readable heartbeat."""
    try:
        beat = heartbeat_ms(raw)
    except ValueError:
        return None
    return round(max(now_ms - beat, 0) / 1000, 3)


def worker_of(worker_id: str, raw: bytes, now_ms: int) -> WorkerStatus:
    """A ``<prefix>:workers`` entry (``django_app/worker/presence.py`` writes it)."""
    entry = _entry(raw)
    return WorkerStatus(
        id=worker_id,
        host=_text(entry.get("host")),
        pid=_number(entry.get("pid")),
        concurrency=_number(entry.get("concurrency")),
        running=_number(entry.get("running")),
        heartbeat_age_seconds=heartbeat_age(raw, now_ms),
    )


def gateway_of(gateway_id: str, raw: bytes, now_ms: int) -> GatewayStatus:
    """A ``<prefix>:gateways`` entry (each gateway process keeps its own)."""
    entry = _entry(raw)
    return GatewayStatus(
        id=gateway_id,
        host=_text(entry.get("host")),
        pid=_number(entry.get("pid")),
        address=_text(entry.get("address")),
        listeners=_number(entry.get("listeners")),
        streams=_number(entry.get("streams")),
        deliveries=_number(entry.get("deliveries")),
        heartbeat_age_seconds=heartbeat_age(raw, now_ms),
    )


def dead_letter_of(entry_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetter:
    """A ``<prefix>:dead`` entry (``task``, ``attempts``, ``reason``, ``at``)."""

    def field(name: bytes) -> str:
        return fields.get(name, b"").decode(errors="replace")

    attempts = field(b"attempts")
    return DeadLetter(
        id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        task=field(b"task"),
        attempts=int(attempts) if attempts.isdigit() else None,
        reason=field(b"reason"),
        at=field(b"at"),
    )


def running_task(record: TaskRecord, now_ms: int) -> RunningTask:
    return RunningTask(
        task=record.ref.label, state=record.state, attempt=record.attempt, worker=record.worker,
        last_seq=record.last_seq, last_type=record.last_type, age_seconds=record.age_seconds(now_ms),
        updated_at=record.updated_at,
    )


def entry_ms(entry_id: bytes | str) -> int:
    """The Redis clock's milliseconds in a stream entry id (``<ms>-<n>``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


class TaskTally:
    """Counts tasks by state and keeps the ``limit`` longest-running active ones, batch by batch
    (memory stays bounded however many tasks the SCAN finds)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.by_state: Counter[str] = Counter({state.value: 0 for state in State})
        self.active: list[TaskRecord] = []

    def add(self, records: list[TaskRecord], now_ms: int) -> None:
        self.by_state.update(record.state for record in records)
        self.active += [record for record in records if record.state in ACTIVE_STATES]
        if len(self.active) > 2 * max(self.limit, BATCH):
            self.active = self._longest(now_ms)

    def _longest(self, now_ms: int) -> list[TaskRecord]:
        """Active tasks, the longest in their state first (then by name: a stable order)."""
        unique = {record.ref: record for record in self.active}.values()  # SCAN may repeat a key
        ordered = sorted(unique, key=lambda r: (-(r.age_seconds(now_ms) or 0.0), r.ref.label))
        return ordered[: self.limit]

    def running(self, now_ms: int) -> list[RunningTask]:
        return [running_task(record, now_ms) for record in self._longest(now_ms)]


# --- reading Redis --------------------------------------------------------------------------


async def collect_queue(redis: Redis, keys: KeySpace, now_ms: int) -> QueueStatus:
    """The queue stream's length, its group's pending count and lag, and the oldest wait."""
    length = int(await redis.xlen(keys.jobs()))
    if not length:
        return QueueStatus()
    try:
        groups: Any = await redis.xinfo_groups(keys.jobs())
    except ResponseError:  # no such key (emptied meanwhile)
        groups = []
    group = next((g for g in groups if _str(g.get("name")) == GROUP), None)
    if group is None:  # no worker ever started: everything waits
        pending, lag, after = 0, length, "-"
    else:
        pending = int(group.get("pending") or 0)
        raw_lag = group.get("lag")
        # Redis reports no lag when it cannot tell (entries deleted in the undelivered range);
        # acknowledged entries are deleted, so what is not pending still waits.
        lag = int(raw_lag) if raw_lag is not None else max(length - pending, 0)
        after = f"({_str(group.get('last-delivered-id')) or '0-0'}"
    oldest: Any = await redis.xrange(keys.jobs(), min=after, max="+", count=1) if lag else []
    oldest_age = round(max(now_ms - entry_ms(oldest[0][0]), 0) / 1000, 3) if oldest else None
    return QueueStatus(length=length, pending=pending, lag=lag, oldest_age_seconds=oldest_age)


def _str(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else ("" if value is None else str(value))


async def registry(redis: Redis, key: str) -> list[tuple[str, bytes]]:
    """A registry hash's entries (HSCAN, never one huge HGETALL), sorted by id."""
    entries: dict[str, bytes] = {}
    async for field, value in redis.hscan_iter(key, count=BATCH):
        entries[_str(field)] = value
    return sorted(entries.items())


async def collect_dead_letters(redis: Redis, keys: KeySpace) -> tuple[int, list[DeadLetter]]:
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(keys.dead_letters())
    pipe.xrevrange(keys.dead_letters(), count=LATEST_DEAD_LETTERS)
    count, latest = await pipe.execute()
    return int(count), [dead_letter_of(entry_id, fields) for entry_id, fields in latest]


async def collect_status(redis: Redis, keys: KeySpace, *, running_limit: int = 50) -> Status:
    """Read the whole system's status from Redis (see :class:`Status`)."""
    now_ms = await redis_now_ms(redis)
    queue = await collect_queue(redis, keys, now_ms)
    workers = [worker_of(i, raw, now_ms) for i, raw in await registry(redis, keys.workers())]
    gateways = [gateway_of(i, raw, now_ms) for i, raw in await registry(redis, keys.gateways())]
    dead_count, dead = await collect_dead_letters(redis, keys)
    tally = TaskTally(running_limit)
    async for records in scan_records(redis, keys):
        tally.add(records, now_ms)
    return Status(
        at=iso_of_ms(now_ms), queue=queue, workers=workers, gateways=gateways,
        dead_letter_count=dead_count, dead_letters=dead, by_state=dict(tally.by_state),
        running=tally.running(now_ms),
    )
