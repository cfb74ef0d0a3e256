"""The job queue: tasks waiting for a worker, in one Redis Stream read by a consumer group.

A task's lifecycle lives in its state record (``<prefix>:{app.Model:pk}:state``)::

    pending ──start──▶ queued ──begin (a worker)──▶ running ──terminal event──▶ completed
       │                  │                            │                        failed
       └────cancel────────┴──▶ cancelling ──event──▶ cancelled ◀──(worker)──────┘

Every arrow is one atomic script on that one key, so two gateways starting the same task lazily,
or a cancel racing a worker, resolve to exactly one outcome. Only then is the job added to the
queue stream (another hash slot, so a separate command).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .keys import KeySpace, TaskRef

GROUP = "workers"

# KEYS: state. ARGV: now, mode ("start": from nothing or pending; "lazy": from pending only).
_START = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'pending' or (s == false and ARGV[2] == 'start') then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'queued_at', ARGV[1])
  if s == false then redis.call('HSET', KEYS[1], 'created_at', ARGV[1]) end
  return {1, s or ''}
end
return {0, s or ''}
"""
# KEYS: state. ARGV: now, worker id. A worker takes a queued task; anything else is not its.
_BEGIN = """
local s = redis.call('HGET', KEYS[1], 'state')
if s ~= 'queued' then return {0, s or ''} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'running_since', ARGV[1])
return {1, attempt}
"""
# KEYS: state. ARGV: now. Returns {state before, worker}; the caller finishes what it started.
_CANCEL = """
local s = redis.call('HMGET', KEYS[1], 'state', 'worker')
if s[1] == 'pending' or s[1] == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelling', 'cancel_requested_at', ARGV[1])
elseif s[1] == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested_at', ARGV[1])
end
return {s[1] or '', s[2] or ''}
"""


@dataclasses.dataclass(frozen=True, slots=True)
class StartOutcome:
    """What a start did: ``queued`` is True when this call queued the task; ``state`` is the
    task's state before the call ('' when Redis knew nothing of it)."""

    queued: bool
    state: str

    def __bool__(self) -> bool:
        return self.queued

    def describe(self) -> str:
        if self.queued:
            return "queued"
        return f"not started: the task is already {self.state or 'unknown'}"


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    entry_id: str
    ref: TaskRef
    deliveries: int = 1


def _now() -> str:
    return datetime.now(UTC).isoformat()


class JobQueue:
    """Start, claim, acknowledge and cancel tasks."""

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self._start = redis.register_script(_START)
        self._begin = redis.register_script(_BEGIN)
        self._cancel = redis.register_script(_CANCEL)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.jobs(), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def start(self, ref: TaskRef, *, lazy: bool = False) -> StartOutcome:
        """Queue the task unless it is already queued, running or ended (idempotent). ``lazy``
        starts only a task recorded as pending (the gateway's start on first connect)."""
        flipped, before = await self._start(
            keys=[self.keys.state(ref)], args=[_now(), "lazy" if lazy else "start"]
        )
        outcome = StartOutcome(bool(flipped), before.decode() if isinstance(before, bytes) else str(before))
        if outcome.queued:
            await self.redis.xadd(self.keys.jobs(), {"task": ref.label})
        return outcome

    async def claim(self, consumer: str, count: int, block_ms: int) -> list[Job]:
        """Up to ``count`` new jobs for this consumer, waiting up to ``block_ms``."""
        reply: Any = await self.redis.xreadgroup(
            GROUP, consumer, {self.keys.jobs(): ">"}, count=count, block=block_ms
        )
        jobs = []
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                jobs.append(Job(entry_id.decode(), TaskRef.parse(fields[b"task"].decode())))
        return jobs

    async def begin(self, ref: TaskRef, worker_id: str) -> int | None:
        """Mark a claimed task running on this worker; its attempt number, or None when the task
        is no longer queued (cancelled meanwhile, or already taken)."""
        taken, value = await self._begin(keys=[self.keys.state(ref)], args=[_now(), worker_id])
        return int(value) if taken else None

    async def ack(self, job: Job) -> None:
        await self.redis.xack(self.keys.jobs(), GROUP, job.entry_id)

    async def request_cancel(self, ref: TaskRef) -> tuple[str, str]:
        """Flag the task for cancellation; returns (state before, worker id if running).
        For a pending or queued task the caller then appends the ``cancelled`` event."""
        before, worker = await self._cancel(keys=[self.keys.state(ref)], args=[_now()])
        state = before.decode() if isinstance(before, bytes) else str(before)
        worker_id = worker.decode() if isinstance(worker, bytes) else str(worker)
        if state == "running" and worker_id:
            await self.redis.xadd(
                self.keys.worker_control(worker_id), {"cancel": ref.label}, maxlen=1000, approximate=True
            )
        return state, worker_id

    async def is_running(self, ref: TaskRef) -> bool:
        return await self.redis.hget(self.keys.state(ref), "state") == b"running"
