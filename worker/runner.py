"""The worker: takes tasks from the job queue and runs many ``process()`` coroutines at once.

Any number of workers, on any hosts, read the queue through one consumer group, so each task
runs once. A worker loads the task row through the ORM, runs it with a writer bound to the
task's Redis Stream, and records the outcome; every run ends with exactly one terminal event.

Failures are outcomes too. Each run holds a lease, renewed every third of
``Settings.lease_seconds``; a worker that dies stops renewing, and any other worker takes its
tasks over: it re-runs them while their class's ``max_attempts`` allows (the stream goes on with
an ``attempt`` event), else ends them with ``error`` (``WorkerLost``) and lists them in the
dead-letter stream. A worker that lost a lease (paused past it) stops that run without writing:
the stream refuses its run token. On SIGTERM a worker stops taking tasks, lets running ones
finish within the grace period, and hands the rest back to the others.

In Redis (``redis-cli``): ``HGETALL sc:workers`` lists workers and their heartbeats,
``SMEMBERS sc:worker:<id>:running`` what one runs now, ``XRANGE sc:dead - +`` the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
from datetime import UTC, datetime
from typing import Any

from django.apps import apps
from django.core.exceptions import ObjectDoesNotExist
from redis.exceptions import RedisError

from django_app.models import Status, StreamTask
from streamcoord.connection import RedisFactory
from streamcoord.errors import EventRejected, WriterFenced
from streamcoord.eventlog import EventLog, TaskWriter
from streamcoord.jobs import Job, JobQueue
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Run:
    """One task this worker runs now."""

    job: Job
    token: str
    task: asyncio.Task[None] | None = None
    #: Why the run is being stopped from outside, if it is: "cancel" (a user asked), "lost"
    #: (another worker took the task over), "hand back" (this worker shuts down).
    stop_reason: str = ""


class Worker:
    """One worker process's loops: claim, recover, renew leases, heartbeat, take cancels."""

    def __init__(self, settings: Settings, concurrency: int | None = None) -> None:
        self.settings = settings
        self.concurrency = concurrency or settings.worker_concurrency
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self._factory = factory = RedisFactory(settings)
        self.redis = factory.client("worker", max_connections=8)
        # Blocking reads hold their connections: the job claim and the control channel.
        self._claim_redis = factory.client("worker-claim", max_connections=1)
        self._control_redis = factory.client("worker-control", max_connections=1)
        self.log = EventLog(self.redis, settings)
        self.keys = self.log.keys
        self.queue = JobQueue(self.redis, self.keys)
        self._claimer = JobQueue(self._claim_redis, self.keys)
        self.runs: dict[str, Run] = {}
        self.lease_ms = int(settings.lease_seconds * 1000)
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self.started_at = datetime.now(UTC).isoformat()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Work until :meth:`stop`; then let running tasks finish within the grace period and
        hand the rest back."""
        await self._factory.ready(self.redis, self._claim_redis, self._control_redis)
        await self.queue.ensure_group()
        await self._heartbeat()
        loops = [
            self._every(self.settings.worker_heartbeat_seconds, self._heartbeat),
            self._every(self.settings.lease_seconds / 3, self._renew_leases),
            self._every(min(self.settings.lease_seconds / 3, 2.0), self._recover_abandoned),
            self._control_forever(),
        ]
        helpers = [asyncio.create_task(loop) for loop in loops]
        log.info("worker %s started (concurrency %d)", self.id, self.concurrency)
        try:
            await self._claim_forever()
            await self._drain()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._unregister()
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
        if not self.runs:
            return
        grace = self.settings.shutdown_grace_seconds
        log.info("waiting up to %ss for %d running tasks", grace, len(self.runs))
        tasks = [run.task for run in self.runs.values() if run.task is not None]
        await asyncio.wait(tasks, timeout=grace)
        self._hand_back_all()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _hand_back_all(self) -> None:
        for run in self.runs.values():
            if run.task is not None and not run.task.done() and not run.stop_reason:
                run.stop_reason = "hand back"
                run.task.cancel()

    async def _every(self, seconds: float, step: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except (RedisError, OSError) as exc:
                log.warning("%s failed: %s", step.__name__, exc)
            except Exception:
                log.exception("%s failed", step.__name__)

    # -- claiming and recovering -------------------------------------------------------------

    async def _claim_forever(self) -> None:
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
                log.warning("claiming jobs failed (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            for job in jobs:
                self._launch(job, secrets.token_hex(8))

    def _launch(self, job: Job, token: str, attempt: int | None = None) -> None:
        """Run a job in a task of its own; ``attempt`` is set for a run this worker took over."""
        run = Run(job, token)
        self.runs[job.ref.label] = run  # before begin, so a cancel request finds it
        run.task = asyncio.create_task(self._run_job(run, attempt), name=job.ref.label)

    async def _recover_abandoned(self) -> None:
        """Take over the jobs of workers that stopped renewing them (dead, paused, leaving)."""
        if self._stopping.is_set():
            return
        await self._forget_dead_workers()
        for job in await self.queue.claim_abandoned(self.id, self.lease_ms):
            if job.ref.label in self.runs:
                continue  # ours, handed back while we leave
            model = _model(job.ref)
            max_attempts = max(1, getattr(model, "max_attempts", 1)) if model else 1
            token = secrets.token_hex(8)
            verdict, attempt = await self.queue.recover(job, self.id, token, self.lease_ms, max_attempts)
            log.info("recovered %s from a stopped worker: %s (attempt %d)", job.ref, verdict, attempt)
            if verdict in ("rerun", "exhausted") and await self._replay_recorded_outcome(job, token):
                continue
            if verdict == "rerun":
                self._launch(job, token, attempt)
            elif verdict == "exhausted":
                await self._give_up(job, token, attempt)
            elif verdict == "queued":
                self._launch(job, token)
            elif verdict != "alive":  # ended, missing, pending, cancelling: nothing to run
                await self.queue.finish(job)

    async def _replay_recorded_outcome(self, job: Job, token: str) -> bool:
        """When the database says the task already ended (Redis lost the end, e.g. in a
        failover), write that outcome as the terminal event instead of running or failing the
        task again. True when it did."""
        model = _model(job.ref)
        row = await model.objects.filter(pk=job.ref.pk).only("status", "final_value", "error").afirst() if model else None
        if row is None or row.status not in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
            return False
        writer = self.log.writer(job.ref, token)
        with contextlib.suppress(WriterFenced):
            if row.status == Status.COMPLETED:
                await writer.append("complete", {"final_value": row.final_value}, final_value=row.final_value)
            elif row.status == Status.FAILED:
                error_type, _, message = row.error.partition(": ")
                await writer.append("error", {"message": message or row.error, "error_type": error_type or "Error"})
            else:
                await writer.append("cancelled", {"message": row.error or "cancelled"})
        log.info("task %s had ended (%s) before Redis lost it: its outcome is written again", job.ref, row.status)
        await self.queue.finish(job)
        return True

    async def _give_up(self, job: Job, token: str, attempt: int) -> None:
        """End a task whose last allowed run was lost with its worker: one ``error``, recorded
        failed, listed in the dead letters."""
        writer = self.log.writer(job.ref, token)
        message = f"the worker running it stopped (attempt {attempt})"
        with contextlib.suppress(WriterFenced):
            await writer.append("error", {"message": message, "error_type": "WorkerLost", "attempt": attempt})
            model = _model(job.ref)
            if model is not None:
                await model.objects.filter(pk=job.ref.pk).aupdate(
                    status=Status.FAILED, error=f"WorkerLost: {message}"
                )
            await self.queue.dead_letter(job, attempt, "WorkerLost")
        await self.queue.finish(job)

    async def _renew_leases(self) -> None:
        runs = {run.job: run.token for run in self.runs.values() if not run.stop_reason}
        for job in await self.queue.renew(self.id, runs, self.lease_ms):
            run = self.runs.get(job.ref.label)
            if run is not None and run.task is not None and not run.stop_reason:
                log.warning("lost the lease on %s to another worker: stopping it", job.ref)
                run.stop_reason = "lost"
                run.task.cancel()

    # -- running one task --------------------------------------------------------------------

    async def _run_job(self, run: Run, attempt: int | None) -> None:
        job, label = run.job, run.job.ref.label
        try:
            if attempt is None:
                attempt = await self.queue.begin(job.ref, self.id, run.token, self.lease_ms)
                if attempt is None:
                    log.info("task %s is no longer queued; skipped", label)
                    await self.queue.finish(job)
                    return
            await self.redis.sadd(self.keys.worker_running(self.id), label)
            log.info("task %s started (attempt %d)", label, attempt)
            await self._execute(run, attempt)
            if run.stop_reason not in ("lost", "hand back"):
                await self.queue.finish(job)
        except (RedisError, OSError) as exc:
            # The job stays pending: once its lease runs out, a worker takes it over.
            log.error("task %s: Redis failed under it (%s); leaving it to recovery", label, exc)
        finally:
            self.runs.pop(label, None)
            self._slot_free.set()
            with contextlib.suppress(RedisError):
                await self.redis.srem(self.keys.worker_running(self.id), label)

    async def _execute(self, run: Run, attempt: int) -> None:
        ref = run.job.ref
        writer = self.log.writer(ref, run.token)
        model = _model(ref)
        try:
            if model is None:
                raise LookupError(f"no StreamTask model {ref.model_label}")
            task: StreamTask = await model.objects.aget(pk=ref.pk)
        except (LookupError, ValueError, ObjectDoesNotExist) as exc:
            await self._fail(writer, None, exc, f"no task {ref} in the database")
            return
        task._stream_writer = writer
        try:
            await type(task).objects.filter(pk=task.pk).aupdate(status=Status.RUNNING)
            if attempt > 1:
                await writer.append("attempt", {"attempt": attempt, "reason": "the previous worker stopped"})
            async with asyncio.timeout(task.time_limit):
                result = await task.process()
        except asyncio.CancelledError:
            if not run.stop_reason:
                raise
            _uncancel()
            await self._stopped_from_outside(run, writer, task)
            return
        except TimeoutError as exc:
            limit = task.time_limit
            await self._fail(writer, task, exc, f"exceeded its time limit of {limit}s" if limit else str(exc))
            return
        except WriterFenced:
            log.warning("task %s: another worker owns it now; this run stops without a word", ref)
            return
        except Exception as exc:
            log.exception("task %s failed", ref)
            await self._fail(writer, task, exc)
            return
        if run.stop_reason:  # process() swallowed the cancellation
            await self._stopped_from_outside(run, writer, task)
            return
        await self._finish(writer, task, result)

    async def _stopped_from_outside(self, run: Run, writer: TaskWriter, task: StreamTask) -> None:
        if run.stop_reason == "cancel":
            with contextlib.suppress(WriterFenced):
                if not writer.ended:
                    await writer.append("cancelled", {"message": "cancelled"})
                await task.mark_failed("cancelled", status=Status.CANCELLED)
            log.info("task %s cancelled", writer.ref)
        elif run.stop_reason == "hand back":
            handed = await self.queue.hand_back(run.job, self.id, run.token, self.lease_ms)
            log.info("task %s handed back to the other workers%s", writer.ref, "" if handed else " (already gone)")
        # "lost": another worker owns the task; it records the outcome, not us.

    async def _finish(self, writer: TaskWriter, task: StreamTask, result: Any) -> None:
        try:
            if writer.ended == "error":
                await task.mark_failed("the task sent its own error event")
            elif writer.ended == "cancelled":
                await task.mark_failed("the task sent its own cancelled event", status=Status.CANCELLED)
            else:
                try:
                    if writer.ended:
                        await self.log.set_final_value(writer.ref, result)
                    else:
                        await writer.append("complete", {"final_value": result}, final_value=result)
                except (EventRejected, TypeError, ValueError) as exc:
                    await self._fail(writer, task, exc, f"final value refused: {exc}")
                    return
                await task.mark_completed(result)
                log.info("task %s completed", writer.ref)
        except WriterFenced:
            log.warning("task %s: another worker owns it now; its outcome is theirs", writer.ref)

    async def _fail(self, writer: TaskWriter, task: StreamTask | None, exc: BaseException, message: str = "") -> None:
        """End the run with one ``error`` event (no traceback: that stays in this log)."""
        message = message or str(exc) or type(exc).__name__
        try:
            if not writer.ended:
                await writer.append("error", {"message": message, "error_type": type(exc).__name__})
        except WriterFenced:
            log.warning("task %s: another worker owns it now; its outcome is theirs", writer.ref)
            return
        if task is not None:
            await task.mark_failed(f"{type(exc).__name__}: {message}")

    # -- heartbeat and control ---------------------------------------------------------------

    async def _heartbeat(self) -> None:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "running": len(self.runs),
            "started_at": self.started_at,
            "heartbeat_at": datetime.now(UTC).isoformat(),
        }
        await self.redis.hset(self.keys.workers(), self.id, json.dumps(info))

    async def _control_forever(self) -> None:
        """Cancel requests for this worker's tasks, from any process on any host."""
        key, last = self.keys.worker_control(self.id), "0-0"
        while True:
            try:
                reply: Any = await self._control_redis.xread({key: last}, block=self.settings.block_ms)
            except (RedisError, OSError) as exc:
                log.warning("control read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    run = self.runs.get(fields.get(b"cancel", b"").decode())
                    if run is not None and run.task is not None and not run.stop_reason:
                        run.stop_reason = "cancel"
                        run.task.cancel()
                        log.info("cancelling task %s on request", run.job.ref)

    async def _forget_dead_workers(self) -> None:
        """Drop the registry entries of workers silent for longer than a lease (their tasks are
        recovered through the queue's pending list, not through these entries)."""
        silent_for = max(self.settings.lease_seconds, 3 * self.settings.worker_heartbeat_seconds)
        now = datetime.now(UTC)
        entries: Any = await self.redis.hgetall(self.keys.workers())
        for worker_id, raw in entries.items():
            seen = datetime.fromisoformat(json.loads(raw)["heartbeat_at"])
            if (now - seen).total_seconds() > silent_for:
                dead = worker_id.decode()
                pipe = self.redis.pipeline(transaction=False)
                pipe.hdel(self.keys.workers(), dead)
                pipe.delete(self.keys.worker_running(dead), self.keys.worker_control(dead))
                await pipe.execute()
                log.info("forgot worker %s (silent for over %ss)", dead, silent_for)

    async def _unregister(self) -> None:
        with contextlib.suppress(RedisError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.keys.workers(), self.id)
            pipe.delete(self.keys.worker_running(self.id), self.keys.worker_control(self.id))
            await pipe.execute()


def _model(ref: TaskRef) -> type[StreamTask] | None:
    try:
        model = apps.get_model(ref.app_label, ref.model)
    except LookupError:
        return None
    return model if issubclass(model, StreamTask) else None


def _uncancel() -> None:
    """We handle this cancellation ourselves; later awaits of the task must not see it."""
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()
