"""The job queue: tasks waiting for a worker, in one Redis Stream read by a consumer group.

A task's life is its state record (:mod:`streamcoord.taskstate` draws it). Every move is one
atomic script on that one key (``start.lua``, ``job_added.lua``, ``start_failed.lua``,
``begin.lua``, ``renew.lua``, ``recover.lua``, ``hand_back.lua``, ``cancel.lua``), so two
gateways starting the same task lazily, or a cancel racing a worker, resolve to exactly one
outcome. Only then is the job added to the queue stream
(another hash slot, so a separate command); a start whose job never got there is completed by
the next start (see ``start.lua``).

A running task has a **lease** (``lease_until``, Redis server time) and a **run token**. Its
worker renews the lease, and keeps the job's entry fresh in the consumer group's pending list,
every third of the lease. When a worker dies both go stale; another worker claims the entry
(XAUTOCLAIM), takes the task over with a new run token, and re-runs or fails it. The old run's
token no longer matches, so a worker that comes back from a pause cannot append any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from . import scripts
from .keys import KeySpace, TaskRef
from .taskstate import State

log = logging.getLogger(__name__)

GROUP = "workers"
#: The pending list is paged through this many entries a call (Redis examines at most ten
#: times as many per XAUTOCLAIM).
ABANDONED_PAGE = 100
#: How long a start may take to add its job before another start adds it instead (ms): far
#: above one XADD, short enough that a start cut off midway is completed soon.
START_GRACE_MS = 5000


class Verdict(enum.StrEnum):
    """What ``recover.lua`` found for a job taken from a stopped worker (the task's own state
    comes back as the verdict when it is none of these)."""

    RERUN = "rerun"  #: the lease expired: run the next attempt
    EXHAUSTED = "exhausted"  #: the lease expired on the last attempt: fail the task
    ALIVE = "alive"  #: the lease has not expired: leave it, look again later
    QUEUED = "queued"  #: never began: run it as usual
    MISSING = "missing"  #: no record: nothing to run
    #: the lease expired with a cancel asked for (it went to the stopped worker): end the task
    #: with ``cancelled``
    CANCEL = "cancel"


@dataclasses.dataclass(frozen=True, slots=True)
class StartOutcome:
    """What a start did: ``queued`` is True when this call queued the task; ``state`` is the
    task's state before the call ('' when Redis knew nothing of it). ``deferred``: the start
    waits for the caller's database transaction to commit (the Django side)."""

    queued: bool
    state: str
    deferred: bool = False

    def __bool__(self) -> bool:
        return self.queued or self.deferred

    def describe(self) -> str:
        if self.queued:
            return "queued"
        if self.deferred:
            return "queued when the transaction commits"
        return f"not started: the task is already {self.state or 'unknown'}"

    __str__ = describe


@dataclasses.dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What a cancel did: ``state`` is the task's state before the call ('' when Redis knew
    nothing of it), ``worker`` the worker told to stop a running task, and ``cancelled`` is
    True when the call ended a task that had not begun."""

    state: str
    worker: str = ""
    cancelled: bool = False
    #: the cancel waits for the caller's database transaction to commit (the Django side)
    deferred: bool = False

    def __bool__(self) -> bool:
        return self.cancelled or bool(self.worker) or self.deferred

    def describe(self) -> str:
        if self.deferred:
            return "cancelled when the transaction commits"
        if self.cancelled:
            return "cancelled before it started"
        if self.worker:
            return f"cancellation sent to worker {self.worker}"
        return f"nothing to cancel: the task is {self.state or 'unknown to Redis'}"

    __str__ = describe


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
        self._start = scripts.register(redis, "start")
        self._job_added = scripts.register(redis, "job_added")
        self._start_failed = scripts.register(redis, "start_failed")
        self._begin = scripts.register(redis, "begin")
        self._renew = scripts.register(redis, "renew")
        self._recover = scripts.register(redis, "recover")
        self._hand_back = scripts.register(redis, "hand_back")
        self._cancel = scripts.register(redis, "cancel")
        self._retry = scripts.register(redis, "retry")
        self._forget = scripts.register(redis, "forget")
        self._finish_if_ours = scripts.register(redis, "finish_if_ours")
        #: Where the next look for abandoned jobs goes on in the pending list.
        self._abandoned_cursor = "0-0"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.jobs(), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def start(self, ref: TaskRef, *, lazy: bool = False) -> StartOutcome:
        """Queue the task unless it is already queued, running or ended (idempotent). ``lazy``
        starts only a task recorded as pending (the gateway's start on first connect).

        When adding the job fails, this raises and the task stays queued without a job; the
        next start (a retry, a reconnecting client's lazy start) adds it (``start.lua``)."""
        try:
            add, before = await self._start(
                keys=[self.keys.state(ref)], args=[_now(), "lazy" if lazy else "start", START_GRACE_MS]
            )
            if add:
                entry_id = await self.redis.xadd(self.keys.jobs(), {"task": ref.label})
        except BaseException:
            # Flipped or not (a cancelled call may have run), give the turn up: the next start
            # then adds the job at once instead of after the grace.
            with contextlib.suppress(RedisError, OSError):
                await self._start_failed(keys=[self.keys.state(ref)], args=[])
            raise
        if add:
            await self._job_added(keys=[self.keys.state(ref)], args=[entry_id])
        return StartOutcome(bool(add), _text(before))

    async def claim(self, consumer: str, count: int, block_ms: int) -> list[Job]:
        """Up to ``count`` new jobs for this consumer, waiting up to ``block_ms``. A malformed
        entry among them is dropped, not returned (see :meth:`_jobs_of`)."""
        try:
            reply: Any = await self.redis.xreadgroup(
                GROUP, consumer, {self.keys.jobs(): ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # Redis lost the queue (restart without persistence)
            return []
        return await self._jobs_of([entry for _key, entries in reply or () for entry in entries])

    async def claim_abandoned(self, consumer: str, idle_ms: int, limit: int = 100) -> list[Job]:
        """Up to ``limit`` jobs whose worker stopped refreshing them for ``idle_ms`` (dead,
        paused, or handed back), now this consumer's.

        XAUTOCLAIM examines at most ten entries per entry asked for, so one call from the start
        never reaches abandoned jobs behind a thousand live ones. This pages on through the
        whole pending list, and a round that stops at ``limit`` leaves a cursor where the next
        one goes on. A malformed entry is dropped, not returned (see :meth:`_jobs_of`)."""
        jobs: list[Job] = []
        cursor = self._abandoned_cursor
        while len(jobs) < limit:
            try:
                reply: Any = await self.redis.xautoclaim(
                    self.keys.jobs(), GROUP, consumer, min_idle_time=idle_ms, start_id=cursor,
                    count=min(ABANDONED_PAGE, limit - len(jobs)),
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()
                cursor = "0-0"
                break
            jobs += await self._jobs_of([(entry_id, fields) for entry_id, fields in reply[1] if fields])
            cursor = _text(reply[0])
            if cursor == "0-0":  # the whole list was seen
                break
        self._abandoned_cursor = cursor
        return jobs

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
        """Judge a job taken from a stopped worker; see :class:`Verdict` and ``recover.lua``."""
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

    async def finish_if_ours(self, job: Job, consumer: str) -> bool:
        """:meth:`finish` only while the job is pending under ``consumer`` (atomically: see
        ``finish_if_ours.lua``); False when another worker holds it now."""
        done = await self._finish_if_ours(keys=[self.keys.jobs()], args=[GROUP, consumer, job.entry_id])
        return bool(done)

    async def dead_letter(self, job: Job, attempts: int, reason: str) -> None:
        """Record a task that used up its attempts in the dead-letter stream."""
        await self.redis.xadd(
            self.keys.dead_letters(), _dead_letter(job.ref.label, attempts, reason), maxlen=10_000, approximate=True
        )

    async def _jobs_of(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Job]:
        """The jobs of claimed entries. A malformed entry (no ``task``, or one that names no
        task: a hand edit, a producer of another version) is dropped from the queue and listed
        in the dead letters, with a warning: it could never run, and raising here would stop
        the worker's claims or its recovery rounds at every turn."""
        jobs: list[Job] = []
        for entry_id, fields in entries:
            try:
                jobs.append(_job(entry_id, fields))
            except ValueError as problem:
                await self._drop_malformed(entry_id.decode(errors="replace"), fields, str(problem))
        return jobs

    async def _drop_malformed(self, entry_id: str, fields: dict[bytes, bytes], problem: str) -> None:
        task = fields.get(b"task", b"").decode(errors="replace")[:200]
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(
            self.keys.dead_letters(), _dead_letter(task, 0, f"malformed job {entry_id}: {problem}"),
            maxlen=10_000, approximate=True,
        )
        pipe.xack(self.keys.jobs(), GROUP, entry_id)
        pipe.xdel(self.keys.jobs(), entry_id)
        await pipe.execute()
        log.warning(
            "dropped the malformed job %s of %s (%s): %r; listed in %s",
            entry_id, self.keys.jobs(), problem, {k.decode(errors="replace"): v[:200] for k, v in fields.items()},
            self.keys.dead_letters(),
        )

    async def request_cancel(self, ref: TaskRef) -> tuple[str, str]:
        """Flag the task for cancellation; returns (state before, worker id if running).
        For a pending or queued task the caller then appends the ``cancelled`` event."""
        before, worker = await self._cancel(keys=[self.keys.state(ref)], args=[_now()])
        state, worker_id = _text(before), _text(worker)
        if state == State.RUNNING and worker_id:
            await self.redis.xadd(
                self.keys.worker_control(worker_id), {"cancel": ref.label}, maxlen=1000, approximate=True
            )
        return state, worker_id


    async def renew_ended(self, ref: TaskRef) -> tuple[bool, str]:
        """Make an ended task pending again, its old stream gone (``retry.lua``); returns
        (whether it was ended, state before). The caller starts it afterwards."""
        retried, before = await self._retry(keys=[self.keys.state(ref), self.keys.events(ref)], args=[_now()])
        return bool(retried), _text(before)

    async def forget(self, ref: TaskRef) -> str:
        """Remove the task's keys (its row is gone); a running task is cancelled instead, and
        its keys expire once it has ended (``forget.lua``). Returns the state before."""
        before = _text(await self._forget(keys=[self.keys.state(ref), self.keys.events(ref)], args=[]))
        if before == State.RUNNING:
            await self.request_cancel(ref)
        return before


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _job(entry_id: bytes, fields: dict[bytes, bytes]) -> Job:
    """The job of a queue entry; raises ValueError saying what is wrong with a malformed one."""
    if b"task" not in fields:
        raise ValueError("no task field")
    return Job(entry_id.decode(), TaskRef.parse(fields[b"task"].decode()))  # both raise ValueError


def _dead_letter(task: str, attempts: int, reason: str) -> dict[FieldT, EncodableT]:
    """A dead letter's fields: ``task`` (its label), ``attempts``, ``reason``, ``at``."""
    return {"task": task, "attempts": attempts, "reason": reason, "at": _now()}
