"""Tasks for operators: which exist (filtered, newest first), and everything about one of them.

Naming a task: ``app.Model:pk`` as keys and logs spell it. The model part is matched against
the models registry (``<prefix>:models``) case-insensitively, as gateways do, so
``examples.progresstask:7`` and ``ProgressTask:7`` (a name no two apps share) name
``examples.ProgressTask:7`` too.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

from redis.asyncio import Redis

from ..errors import InvalidTaskRef
from ..keys import KeySpace, TaskRef
from ..presence import redis_now_ms
from ..taskstate import State, TaskState
from .events import StreamEvent, events_of
from .records import BATCH, TaskRecord, scan_records

#: Events ``show`` lists by default (the latest).
LATEST_EVENTS = 20


async def resolve_ref(redis: Redis, keys: KeySpace, text: str) -> TaskRef:
    """The task ``text`` names (``app.Model:pk`` or ``Model:pk``), spelled as registered.
    Raises :class:`InvalidTaskRef` saying what is wrong."""
    model_part, sep, pk = text.rpartition(":")
    if not sep or not model_part:
        raise InvalidTaskRef(f"invalid task {text!r}: expected app.Model:pk, e.g. examples.ProgressTask:7")
    canonical: Any = await redis.hget(keys.models(), model_part.lower())
    if canonical:  # b"" marks a bare name two apps share: fall through to the error below
        app_label, _, model = canonical.decode().partition(".")
        return TaskRef(app_label, model, pk)
    app_label, dot, model = model_part.partition(".")
    if not dot:
        raise InvalidTaskRef(
            f"invalid task {text!r}: no registered model is named {model_part!r} alone; "
            "name it with its app, app.Model:pk"
        )
    return TaskRef(app_label, model, pk)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks to list: any of ``states`` (all when empty), of ``model`` (``Model`` or
    ``app.Model``, any case; all when empty)."""

    states: frozenset[str] = frozenset()
    model: str = ""

    def matches(self, record: TaskRecord) -> bool:
        if self.states and record.state not in self.states:
            return False
        if not self.model:
            return True
        wanted = self.model.lower()
        ref = record.ref
        return wanted in (ref.model.lower(), ref.model_label.lower())


@dataclasses.dataclass(frozen=True, slots=True)
class TaskListing:
    at_ms: int  #: the Redis clock when the listing was made
    tasks: list[TaskRecord]  #: the newest ``limit`` matching tasks, newest first
    matched: int  #: how many tasks matched in all
    scanned: int  #: how many tasks were looked at


def newest_first(records: list[TaskRecord], now_ms: int, limit: int) -> list[TaskRecord]:
    """The ``limit`` tasks that entered their state last (those with no time last), newest
    first; one per task (SCAN may return a key twice)."""
    unique = {record.ref: record for record in records}.values()

    def age(record: TaskRecord) -> tuple[float, str]:
        seconds = record.age_seconds(now_ms)
        return (seconds if seconds is not None else float("inf"), record.ref.label)

    return heapq.nsmallest(limit, unique, key=age)


async def list_tasks(redis: Redis, keys: KeySpace, task_filter: TaskFilter, limit: int = 50) -> TaskListing:
    """The tasks ``task_filter`` lets through, SCAN batch by batch (memory stays bounded by
    ``limit``, however many tasks there are)."""
    now_ms = await redis_now_ms(redis)
    kept: list[TaskRecord] = []
    matched = scanned = 0
    async for records in scan_records(redis, keys, BATCH):
        scanned += len(records)
        chosen = [record for record in records if task_filter.matches(record)]
        matched += len(chosen)
        kept = newest_first(kept + chosen, now_ms, limit)
    return TaskListing(now_ms, kept, matched, scanned)


def known_states() -> list[str]:
    return [state.value for state in State]


@dataclasses.dataclass(frozen=True, slots=True)
class TaskDetail:
    """One task as Redis holds it: its state record, and its stream's latest events."""

    ref: TaskRef
    at_ms: int
    record: TaskState | None
    events: list[StreamEvent]  #: the latest, oldest first
    length: int  #: events in the stream
    first_seq: int | None  #: the oldest retained event's sequence (earlier ones were trimmed)
    stream_ttl: int | None  #: seconds until the stream expires (None: no expiry set, or no stream)
    state_ttl: int | None
    events_key: str = ""
    state_key: str = ""

    @property
    def known(self) -> bool:
        return self.record is not None or self.length > 0

    def to_json(self) -> dict[str, Any]:
        record = None
        if self.record is not None:
            record = dataclasses.asdict(self.record)
            record["end_data"] = self.record.end_data.decode(errors="replace")
        return {
            "task": self.ref.label,
            "keys": {"events": self.events_key, "state": self.state_key},
            "record": record,
            "stream": {
                "length": self.length, "first_seq": self.first_seq, "ttl_seconds": self.stream_ttl,
            },
            "state_ttl_seconds": self.state_ttl,
            "events": [event.to_json() for event in self.events],
        }


def _ttl(value: Any) -> int | None:
    """TTL's answer: seconds, or None for no expiry (-1) or no key (-2)."""
    seconds = int(value)
    return seconds if seconds >= 0 else None


async def show_task(redis: Redis, keys: KeySpace, ref: TaskRef, events: int = LATEST_EVENTS) -> TaskDetail:
    """The task's record and latest ``events`` events, in one round trip (one hash slot)."""
    now_ms = await redis_now_ms(redis)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.state(ref))
    pipe.xrevrange(keys.events(ref), count=max(events, 0) or 1)
    pipe.xlen(keys.events(ref))
    pipe.xrange(keys.events(ref), count=1)
    pipe.ttl(keys.events(ref))
    pipe.ttl(keys.state(ref))
    raw, latest, length, first, stream_ttl, state_ttl = await pipe.execute()
    decoded = events_of(list(reversed(latest)))[-events:] if events > 0 else []
    oldest = events_of(first)
    return TaskDetail(
        ref=ref, at_ms=now_ms, record=TaskState.from_hash(raw), events=decoded, length=int(length),
        first_seq=oldest[0].seq if oldest else None, stream_ttl=_ttl(stream_ttl), state_ttl=_ttl(state_ttl),
        events_key=keys.events(ref), state_key=keys.state(ref),
    )
