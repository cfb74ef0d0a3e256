"""The worker: takes tasks from the job queue and runs many ``process()`` coroutines at once.

Any number of workers, on any hosts, read the queue through one consumer group, so each task
runs once. A worker loads the task row through the ORM, runs it with a writer bound to the
task's Redis Stream, and records the outcome; every run ends with exactly one terminal event.

Failures are outcomes too. Each run holds a lease, renewed every third of
``Settings.lease_seconds``; a worker that dies stops renewing, and any other worker takes its
tasks over: it re-runs them while their class's ``max_attempts`` allows (the stream goes on with
an ``attempt`` event), else ends them with ``error`` (``WorkerLost``) and lists them in the
dead-letter stream; one asked to cancel meanwhile it ends with ``cancelled``. A worker that lost
a lease (paused past it) stops that run without writing, and leaves its job alone: the stream
refuses its run token, and the job is the other worker's now. On SIGTERM a worker stops taking
tasks, lets running ones finish within the grace period, and hands the rest back to the others.

This module is the worker's lifecycle and wiring: claiming jobs while slots are free, the loops
that keep it alive, and stopping. The parts live beside it:

* ``execution``: one run, from a claimed job to exactly one terminal event;
* ``recovery``: taking over abandoned jobs, replaying recorded outcomes, dead letters;
* ``outcomes``: how a run ended, as a terminal event and as the task's row;
* ``presence``: the heartbeat, the registry of workers, forgetting silent ones;
* ``control``: cancel requests from other processes; ``periodic``: the loops' rhythm;
* ``metrics``: what this worker did, for Prometheus (``runworker --metrics-port``).

In Redis (``redis-cli``): ``HGETALL sc:workers`` lists workers and their heartbeats,
``SMEMBERS sc:worker:<id>:running`` what one runs now, ``XRANGE sc:dead - +`` the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError

from streamcoord.backoff import Backoff
from streamcoord.connection import RedisFactory
from streamcoord.eventlog import EventLog
from streamcoord.jobs import GROUP, Job, JobQueue
from streamcoord.keys import KeySpace
from streamcoord.settings import Settings

from . import outcomes
from .control import ControlChannel
from .execution import Executor, Run, StopReason
from .metrics import WorkerMetrics
from .periodic import every
from .presence import Presence
from .recovery import Recovery

log = logging.getLogger(__name__)

__all__ = ["Run", "StopReason", "Worker"]


class Worker:
    """One worker process: claims jobs while it has free slots, runs each in a task of its
    own, and keeps its leases, heartbeat, recovery rounds and control channel going."""

    def __init__(self, settings: Settings, concurrency: int | None = None, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.concurrency = concurrency or settings.worker_concurrency
        #: Only served metrics (``runworker --metrics-port`` passes them) get the queue lag and
        #: the dead letters' count: their Redis commands are for their readers (and need XINFO
        #: and XLEN, which a worker's ACL may lack).
        self._measures_queue = metrics is not None
        #: The measurements Redis refused (each said once).
        self._refused: set[str] = set()
        #: Counted whether or not anything serves them.
        self.metrics = metrics = metrics or WorkerMetrics()
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self._factory = factory = RedisFactory(settings)
        self.redis = factory.client("worker", max_connections=8)
        # Blocking reads hold their connections: the job claim and the control channel.
        self._claim_redis = factory.client("worker-claim", max_connections=1)
        self._control_redis = factory.client("worker-control", max_connections=1)
        self.events = EventLog(self.redis, settings)
        self.keys = self.events.keys
        self.queue = CountedJobQueue(self.redis, self.keys, metrics)
        self._claimer = CountedJobQueue(self._claim_redis, self.keys, metrics)
        #: The runs in progress, by task label (``app.Model:pk``).
        self.runs: dict[str, Run] = {}
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.executor = Executor(self.id, self.queue, self.events, self.lease_ms, metrics)
        self.recovery = Recovery(
            self.id, self.queue, self.events, self.lease_ms, self._launch, self.runs.__contains__, metrics
        )
        metrics.concurrency.set(self.concurrency)
        metrics.watch_running(self.runs.__len__)
        metrics.declare_models(outcomes.model_labels())
        self.presence = Presence(
            self.redis, self.keys, self.id, self.concurrency, settings, running_count=self.runs.__len__
        )
        self.control = ControlChannel(
            self._control_redis, self.keys.worker_control(self.id), settings.block_ms, self._cancel
        )
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        #: Held by a recovery round, which may launch runs: the drain waits for it.
        self._recovering = asyncio.Lock()
        #: Every run is being handed back (a second stop, or the grace period is over).
        self._handing_back = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Work until :meth:`stop`; then let running tasks finish within the grace period and
        hand the rest back."""
        await self._factory.ready(self.redis, self._claim_redis, self._control_redis)
        await self.queue.ensure_group()
        await self.presence.heartbeat()
        if self._measures_queue:
            # At once, not a heartbeat later: claims' waits are measured on the Redis clock.
            try:
                await self._counting_redis_errors(self._measure_queue)()
            except (RedisError, OSError) as exc:
                log.warning("measuring the queue lag failed: %s", exc)
        heartbeat, renewal = self.settings.worker_heartbeat_seconds, self.settings.lease_seconds / 3
        counted = self._counting_redis_errors
        loops = [
            every(heartbeat, counted(self.presence.heartbeat), "heartbeat"),
            every(heartbeat, counted(self.presence.forget_silent_workers), "forgetting silent workers"),
            every(renewal, counted(self._renew_leases), "renewing leases"),
            every(min(renewal, 2.0), counted(self._recover_abandoned), "recovering abandoned jobs"),
            self.control.listen_forever(),
        ]
        if self._measures_queue:
            loops.append(every(heartbeat, counted(self._measure_queue), "measuring the queue lag"))
        helpers = [asyncio.create_task(loop) for loop in loops]
        log.info("worker %s started (concurrency %d)", self.id, self.concurrency)
        try:
            await self._claim_forever()
            await self._drain()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self.presence.leave()
            await self._factory.close()
            for client in (self.redis, self._claim_redis, self._control_redis):
                await client.aclose()
            log.info("worker %s stopped", self.id)

    def stop(self) -> None:
        """Stop taking tasks (running ones may finish); a second call hands them back now."""
        if self._stopping.is_set():
            self._hand_back_all()
        self._stopping.set()
        self._slot_free.set()

    async def _drain(self) -> None:
        """Give running tasks the grace period, then hand back what still runs."""
        async with self._recovering:
            pass  # a round under way may still launch runs (no round starts once stopping)
        if not self.runs:
            return
        tasks = [run.task for run in self.runs.values() if run.task is not None]
        if not self._handing_back:
            grace = self.settings.shutdown_grace_seconds
            log.info("waiting up to %ss for %d running tasks", grace, len(self.runs))
            await asyncio.wait(tasks, timeout=grace)
        self._hand_back_all()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _hand_back_all(self) -> None:
        self._handing_back = True
        for run in self.runs.values():
            run.stop(StopReason.HAND_BACK)

    # -- claiming and running ----------------------------------------------------------------

    async def _claim_forever(self) -> None:
        """Claim new jobs whenever a slot is free, until :meth:`stop`."""
        backoff = Backoff(first=0.1, cap=1.0, jitter=0.5)
        while not self._stopping.is_set():
            free = self.concurrency - len(self.runs)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            claim = asyncio.create_task(self._claimer.claim(self.id, free, self.settings.block_ms))
            stop = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait((claim, stop), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if claim not in done:
                claim.cancel()  # redis-py drops the connection of a cancelled read
                with contextlib.suppress(asyncio.CancelledError, RedisError):
                    await claim
                return
            try:
                jobs = claim.result()
            except (RedisError, OSError) as exc:
                self.metrics.redis_errors.inc()
                log.warning("claiming jobs failed (%s); retrying", exc)
                await backoff.sleep()
                continue
            backoff.reset()
            for job in jobs:
                self.metrics.job_claimed(job.entry_id)
                await self._launch(job, secrets.token_hex(8), None)

    async def _launch(self, job: Job, token: str, attempt: int | None) -> None:
        """Run a job in a task of its own; ``attempt`` is set for a run this worker took over
        (and so began already).

        A task has one run on this worker at a time, and a run is never replaced. A second
        queue entry of a task this worker has already (two entries of one start, claimed
        together) is acknowledged and dropped: its ``begin`` could only fail. A task taken over
        while a run of it is still here waits for that run to end: the record names the new
        run now, so the one here can only be a run whose ``begin`` is failing, or one that lost
        its lease (stopped here)."""
        label = job.ref.label
        while (here := self.runs.get(label)) is not None and here.task is not None:
            if attempt is None:
                log.info("task %s: a second queue entry (%s) while this worker has it; dropped", job.ref, job.entry_id)
                try:
                    await self.queue.finish(job)
                except (RedisError, OSError) as exc:  # it stays pending; recovery acknowledges it
                    log.warning("could not drop the second queue entry of %s: %s", job.ref, exc)
                return
            here.stop(StopReason.LOST)
            await asyncio.wait([here.task])
        run = Run(job, token)
        self.runs[label] = run  # before the task starts, so a cancel request finds it
        run.task = asyncio.create_task(self._run(run, attempt), name=label)

    async def _run(self, run: Run, attempt: int | None) -> None:
        """One run, with the worker's bookkeeping around it: the running set and the slot."""
        try:
            await self.presence.add_running(run.label)
            await self.executor.run(run, attempt)
        finally:
            if self.runs.get(run.label) is run:
                del self.runs[run.label]
            self._slot_free.set()
            await self.presence.remove_running(run.label)

    # -- the loops' steps --------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Renew the leases of the runs going on; stop those another worker took over. A run
        that has not begun yet has no lease to renew: the record is not its yet."""
        runs = {run.job: run for run in self.runs.values() if run.begun and run.stop_reason is None}
        for job in await self.queue.renew(self.id, {job: run.token for job, run in runs.items()}, self.lease_ms):
            if runs[job].stop(StopReason.LOST):
                log.warning("lost the lease on %s to another worker: stopping it", job.ref)

    async def _measure_queue(self) -> None:
        """The queue lag, then the dead letters' count. A Redis user refused one of them
        (deploy/users.acl before metrics) leaves that one unknown (NaN, not 0), said once;
        later rounds try again quietly (the ACL may be fixed live)."""
        try:
            await self.metrics.measure_queue(self.redis, self.keys.jobs(), GROUP)
        except NoPermissionError as exc:
            self.metrics.queue_lag.set(float("nan"))
            self._say_refused("the queue lag metric", "XINFO GROUPS", "+xinfo|groups", self.keys.jobs(), exc)
        try:
            await self.metrics.measure_dead_letters(self.redis, self.keys.dead_letters())
        except NoPermissionError as exc:
            self.metrics.dead_letter_entries.set(float("nan"))
            self._say_refused("the dead letters gauge", "XLEN", "+xlen", self.keys.dead_letters(), exc)

    def _say_refused(self, what: str, command: str, rule: str, key: str, exc: NoPermissionError) -> None:
        if what not in self._refused:
            log.warning("%s is unavailable: Redis refused %s (%s); allow %s on %s to the worker's Redis user",
                        what, command, exc, rule, key)
        self._refused.add(what)

    def _counting_redis_errors(self, step: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """``step``, counting its Redis failures (``every`` logs them and tries again)."""

        async def counted() -> None:
            try:
                await step()
            except (RedisError, OSError):
                self.metrics.redis_errors.inc()
                raise

        return counted

    async def _recover_abandoned(self) -> None:
        async with self._recovering:
            if not self._stopping.is_set():  # a leaving worker takes nothing over
                await self.recovery.recover_abandoned()

    def _cancel(self, label: str) -> None:
        """A cancel request from the control channel."""
        run = self.runs.get(label)
        if run is not None and run.stop(StopReason.CANCEL):
            log.info("cancelling task %s on request", run.job.ref)


class CountedJobQueue(JobQueue):
    """A :class:`JobQueue` that counts the malformed entries it drops into the dead letters
    (claims and recovery rounds meet them inside ``JobQueue``, which has no hook for it)."""

    def __init__(self, redis: Redis, keys: KeySpace, metrics: WorkerMetrics) -> None:
        super().__init__(redis, keys)
        self._metrics = metrics

    async def _drop_malformed(self, entry_id: str, fields: dict[bytes, bytes], problem: str) -> None:
        await super()._drop_malformed(entry_id, fields, problem)
        self._metrics.dead_letters.inc()
