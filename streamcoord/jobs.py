"""The job queue: tasks waiting for a worker, in one Redis Stream read by a consumer group.

A task's lifecycle lives in its state record (``<prefix>:{app.Model:pk}:state``)::

    pending ──start──▶ queued ──begin (a worker)──▶ running ──terminal event──▶ completed
       │                  │                         │  ▲                      failed
       └────cancel────────┴──▶ cancelling ──event──▶│  │ recover (lease       cancelled
                                                    │  │ expired: re-run or fail)
                                                    └──┘

Every arrow is one atomic script on that one key, so two gateways starting the same task lazily,
or a cancel racing a worker, resolve to exactly one outcome. Only then is the job added to the
queue stream (another hash slot, so a separate command).

A running task has a **lease** (``lease_until``, Redis server time) and a **run token**. Its
worker renews the lease, and keeps the job's entry fresh in the consumer group's pending list,
every third of the lease. When a worker dies both go stale; another worker claims the entry
(XAUTOCLAIM), takes the task over with a new run token, and re-runs or fails it. The old run's
token no longer matches, so a worker that comes back from a pause cannot append any more.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .keys import KeySpace, TaskRef

GROUP = "workers"

# Times come from the Redis server's clock (TIME), so leases never depend on worker clocks.
_NOW_MS = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

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
# KEYS: state. ARGV: now, worker id, run token, lease ms. A worker takes a queued task.
_BEGIN = _NOW_MS + """
local s = redis.call('HGET', KEYS[1], 'state')
if s ~= 'queued' then return {0, s or ''} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'run', ARGV[3],
           'running_since', ARGV[1], 'lease_until', now + tonumber(ARGV[4]))
return {1, attempt}
"""
# KEYS: state. ARGV: run token, lease ms, worker id. 1: still ours; 0: another run owns it.
_RENEW = _NOW_MS + """
local s = redis.call('HMGET', KEYS[1], 'run', 'state')
if s[1] == ARGV[1] then
  if s[2] == 'running' then redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2])) end
  return 1
end
if s[1] == false and (s[2] == false or s[2] == 'running') then
  -- Redis lost the record (restart without persistence), or an append rebuilt it first:
  -- the run goes on, and says so.
  redis.call('HSET', KEYS[1], 'state', 'running', 'run', ARGV[1], 'worker', ARGV[3],
             'lease_until', now + tonumber(ARGV[2]))
  return 1
end
return 0
"""
# KEYS: state. ARGV: new run token, lease ms, worker id, max attempts, now (ISO).
# For a job whose worker stopped renewing: returns {verdict, attempt}, verdict one of
#   rerun      the lease expired; this worker owns the task now and runs attempt <attempt>
#   exhausted  the lease expired on the last allowed attempt; this worker owns it, to fail it
#   alive      the lease has not expired (a paused worker may come back): try later
#   queued     never began: run it as usual        ended / missing / other: nothing to run
_RECOVER = _NOW_MS + """
local s = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'attempt')
local attempt = tonumber(s[3] or '0')
if s[1] ~= 'running' then return {s[1] or 'missing', attempt} end
if tonumber(s[2] or '0') > now then return {'alive', attempt} end
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'worker', ARGV[3], 'lease_until', now + tonumber(ARGV[2]))
if attempt < tonumber(ARGV[4]) then
  attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('HSET', KEYS[1], 'running_since', ARGV[5])
  return {'rerun', attempt}
end
return {'exhausted', attempt}
"""
# KEYS: state. ARGV: run token. Give the task up now (graceful shutdown): the lease ends at once.
_HAND_BACK = """
local s = redis.call('HMGET', KEYS[1], 'run', 'state')
if s[1] ~= ARGV[1] or s[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', 0)
return 1
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


def _now() -> str:
    return datetime.now(UTC).isoformat()


class JobQueue:
    """Start, claim, lease, recover, acknowledge and cancel tasks."""

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self.redis = redis
        self.keys = keys
        self._start = redis.register_script(_START)
        self._begin = redis.register_script(_BEGIN)
        self._renew = redis.register_script(_RENEW)
        self._recover = redis.register_script(_RECOVER)
        self._hand_back = redis.register_script(_HAND_BACK)
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
        outcome = StartOutcome(bool(flipped), _text(before))
        if outcome.queued:
            await self.redis.xadd(self.keys.jobs(), {"task": ref.label})
        return outcome

    async def claim(self, consumer: str, count: int, block_ms: int) -> list[Job]:
        """Up to ``count`` new jobs for this consumer, waiting up to ``block_ms``."""
        try:
            reply: Any = await self.redis.xreadgroup(
                GROUP, consumer, {self.keys.jobs(): ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # Redis lost the queue (restart without persistence)
            return []
        return [_job(entry_id, fields) for _key, entries in reply or () for entry_id, fields in entries]

    async def claim_abandoned(self, consumer: str, idle_ms: int, count: int = 100) -> list[Job]:
        """Jobs whose worker stopped refreshing them for ``idle_ms`` (dead, paused, or handed
        back), now this consumer's."""
        try:
            reply: Any = await self.redis.xautoclaim(
                self.keys.jobs(), GROUP, consumer, min_idle_time=idle_ms, start_id="0-0", count=count
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        return [_job(entry_id, fields) for entry_id, fields in reply[1] if fields]

    async def begin(self, ref: TaskRef, worker_id: str, run: str, lease_ms: int) -> int | None:
        """Mark a claimed task running under ``run``; its attempt number, or None when the task
        is no longer queued (cancelled meanwhile, or already taken)."""
        taken, value = await self._begin(
            keys=[self.keys.state(ref)], args=[_now(), worker_id, run, lease_ms]
        )
        return int(value) if taken else None

    async def renew(self, consumer: str, runs: dict[Job, str], lease_ms: int) -> list[Job]:
        """Renew the leases of this worker's runs, and keep their queue entries fresh; returns
        the jobs whose run another worker took over (this worker must stop them)."""
        if not runs:
            return []
        # Concurrent single calls, not a pipeline: redis-py refuses scripts in cluster pipelines.
        replies = await asyncio.gather(
            *(self._renew(keys=[self.keys.state(job.ref)], args=[run, lease_ms, consumer]) for job, run in runs.items())
        )
        kept: list[Any] = [job.entry_id for job, ok in zip(runs, replies, strict=True) if ok]
        if kept:  # only entries still ours: never pull one back from the worker that took it over
            await self.redis.xclaim(self.keys.jobs(), GROUP, consumer, 0, kept, justid=True)
        return [job for job, ok in zip(runs, replies, strict=True) if not ok]

    async def recover(self, job: Job, consumer: str, run: str, lease_ms: int, max_attempts: int) -> tuple[str, int]:
        """Judge a job taken from a stopped worker; see ``_RECOVER`` for the verdicts."""
        verdict, attempt = await self._recover(
            keys=[self.keys.state(job.ref)], args=[run, lease_ms, consumer, max_attempts, _now()]
        )
        return _text(verdict), int(attempt)

    async def hand_back(self, job: Job, consumer: str, run: str, lease_ms: int) -> bool:
        """End this worker's lease on a running task at once, and make its queue entry look
        abandoned, so another worker takes it over now (graceful shutdown)."""
        released = await self._hand_back(keys=[self.keys.state(job.ref)], args=[run])
        if released:
            await self.redis.xclaim(
                self.keys.jobs(), GROUP, consumer, 0, [job.entry_id], idle=lease_ms * 10, justid=True
            )
        return bool(released)

    async def finish(self, job: Job) -> None:
        """Acknowledge a job and drop it from the queue stream, which so stays small."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.keys.jobs(), GROUP, job.entry_id)
        pipe.xdel(self.keys.jobs(), job.entry_id)
        await pipe.execute()

    async def dead_letter(self, job: Job, attempts: int, reason: str) -> None:
        """Record a task that used up its attempts in the dead-letter stream."""
        await self.redis.xadd(
            self.keys.dead_letters(),
            {"task": job.ref.label, "attempts": attempts, "reason": reason, "at": _now()},
            maxlen=10_000, approximate=True,
        )

    async def request_cancel(self, ref: TaskRef) -> tuple[str, str]:
        """Flag the task for cancellation; returns (state before, worker id if running).
        For a pending or queued task the caller then appends the ``cancelled`` event."""
        before, worker = await self._cancel(keys=[self.keys.state(ref)], args=[_now()])
        state, worker_id = _text(before), _text(worker)
        if state == "running" and worker_id:
            await self.redis.xadd(
                self.keys.worker_control(worker_id), {"cancel": ref.label}, maxlen=1000, approximate=True
            )
        return state, worker_id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _job(entry_id: bytes, fields: dict[bytes, bytes]) -> Job:
    return Job(entry_id.decode(), TaskRef.parse(fields[b"task"].decode()))
