"""Every task's state record, found with SCAN and read in bounded, pipelined batches.

A deployment may hold millions of tasks, so nothing here blocks Redis: keys are found with
``SCAN MATCH <prefix>:{*}:state COUNT 500`` (on every master of a cluster: redis-py's cluster
``scan_iter`` walks each primary's cursor in turn), never ``KEYS``, and each batch of up to
:data:`BATCH` keys is read with one pipeline of ``HMGET`` (a cluster client splits it by node).
A record may expire or change between the SCAN and the HMGET: it is then skipped or read as
it is now; SCAN may also return a key twice (a rehash), which the caller may not care about.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from ..errors import InvalidTaskRef
from ..keys import KeySpace, TaskRef
from ..taskstate import Field, State, TaskState

#: Keys asked for per SCAN call, and records read per pipeline.
BATCH = 500
#: The fields an operator's views need (never ``end_data`` or ``final_value``: they can be big).
FIELDS: tuple[Field, ...] = (
    Field.STATE, Field.ATTEMPT, Field.WORKER, Field.EPOCH, Field.LAST_SEQ, Field.LAST_TYPE,
    Field.CREATED_AT, Field.QUEUED_AT, Field.RUNNING_SINCE, Field.UPDATED_AT, Field.ENDED_AT,
)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskRecord(TaskState):
    """The operator's view of one task's state record: the record (only :data:`FIELDS` read)
    and the task it belongs to."""

    ref: TaskRef = dataclasses.field(kw_only=True)

    @property
    def since(self) -> str:
        """When the task entered its current state (ISO 8601; '' when the record does not say):
        the run's start for a running task, the end for an ended one."""
        if self.state == State.PENDING:
            chosen = self.created_at
        elif self.state in (State.QUEUED, State.CANCELLING):
            chosen = self.queued_at or self.created_at
        elif self.state == State.RUNNING:
            chosen = self.running_since
        else:
            chosen = self.ended_at
        return chosen or self.updated_at or self.created_at

    def age_seconds(self, now_ms: int) -> float | None:
        """Seconds the task has been in its current state, on ``now_ms`` (the Redis clock)."""
        return seconds_since(self.since, now_ms)


def seconds_since(iso: str, now_ms: int) -> float | None:
    """Seconds from an ISO 8601 time to ``now_ms``; None when ``iso`` is empty or no time.
    Never negative: a host clock ahead of Redis's would otherwise show ages below zero."""
    if not iso:
        return None
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if at.tzinfo is None:
        return None
    return round(max(now_ms / 1000 - at.timestamp(), 0.0), 3)


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern (a prefix may hold ``*``, ``?``, ``[``)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def state_pattern(keys: KeySpace) -> str:
    """The SCAN MATCH pattern of every task's state key under the deployment's prefix."""
    return f"{glob_escape(keys.prefix)}:{{*}}:state"


def ref_of_state_key(keys: KeySpace, key: bytes | str) -> TaskRef | None:
    """The task whose state key ``key`` is; None for a key that names no task (written by
    hand, or another deployment's prefix that happens to match)."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    head, tail = f"{keys.prefix}:{{", "}:state"
    if not (text.startswith(head) and text.endswith(tail)):
        return None
    try:
        return TaskRef.parse(text[len(head):-len(tail)])
    except InvalidTaskRef:
        return None


def record_of(ref: TaskRef, values: list[bytes | None]) -> TaskRecord | None:
    """Decode one HMGET of :data:`FIELDS` (as ``TaskState`` decodes a record); None when the
    record is gone (no state)."""
    raw = {field.value.encode(): value for field, value in zip(FIELDS, values, strict=True) if value is not None}
    record = TaskState.from_hash(raw)
    if record is None or not record.state:
        return None
    return TaskRecord(**{f.name: getattr(record, f.name) for f in dataclasses.fields(record)}, ref=ref)


async def scan_keys(redis: Redis, pattern: str, batch: int = BATCH) -> AsyncIterator[list[bytes]]:
    """The keys matching ``pattern``, in lists of up to ``batch``, SCAN ``COUNT batch`` at a
    time (each primary in turn in a cluster)."""
    found: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=batch):
        found.append(key)
        if len(found) >= batch:
            yield found
            found = []
    if found:
        yield found


async def read_records(redis: Redis, refs: list[TaskRef], keys: KeySpace) -> list[TaskRecord]:
    """The records of ``refs`` (one pipeline of HMGET); tasks without one are left out."""
    if not refs:
        return []
    pipe = redis.pipeline(transaction=False)
    for ref in refs:
        pipe.hmget(keys.state(ref), list(FIELDS))
    replies: list[Any] = await pipe.execute()
    records = (record_of(ref, values) for ref, values in zip(refs, replies, strict=True))
    return [record for record in records if record is not None]


async def scan_records(redis: Redis, keys: KeySpace, batch: int = BATCH) -> AsyncIterator[list[TaskRecord]]:
    """Every task's record, a batch at a time."""
    async for found in scan_keys(redis, state_pattern(keys), batch):
        refs = [ref for ref in (ref_of_state_key(keys, key) for key in found) if ref is not None]
        records = await read_records(redis, refs, keys)
        if records:
            yield records
