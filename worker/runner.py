"""The worker: takes tasks from the job queue and runs many ``process()`` coroutines at once.

Any number of workers, on any hosts, read the queue through one consumer group, so each task
runs once. A worker loads the task row through the ORM, runs it with a writer bound to the
task's Redis Stream, and records the outcome; every run ends with exactly one terminal event.

In Redis (``redis-cli``): ``HGETALL sc:workers`` lists workers and their heartbeats,
``SMEMBERS sc:worker:<id>:running`` what one runs now.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from streamcoord.errors import EventRejected
from streamcoord.eventlog import EventLog, TaskWriter
from streamcoord.jobs import Job, JobQueue
from streamcoord.keys import TaskRef
from streamcoord.settings import Settings

log = logging.getLogger(__name__)


class Worker:
    """One worker process's loop: claim, run, record, acknowledge."""

    def __init__(self, settings: Settings, concurrency: int | None = None) -> None:
        self.settings = settings
        self.concurrency = concurrency or settings.worker_concurrency
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        factory = RedisFactory(settings)
        self.redis = factory.client("worker", max_connections=8)
        # Blocking reads hold their connections: the job claim and the control channel.
        self._claim_redis = factory.client("worker-claim", max_connections=1)
        self._control_redis = factory.client("worker-control", max_connections=1)
        self.log = EventLog(self.redis, settings)
        self.keys = self.log.keys
        self.queue = JobQueue(self.redis, self.keys)
        self._claimer = JobQueue(self._claim_redis, self.keys)
        self.running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self.started_at = datetime.now(UTC).isoformat()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Work until :meth:`stop`; then let running tasks finish within the grace period."""
        await self.queue.ensure_group()
        await self._heartbeat()
        helpers = [
            asyncio.create_task(self._heartbeat_forever(), name="worker-heartbeat"),
            asyncio.create_task(self._control_forever(), name="worker-control"),
        ]
        log.info("worker %s started (concurrency %d)", self.id, self.concurrency)
        try:
            await self._claim_forever()
            await self._drain()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._unregister()
            for client in (self.redis, self._claim_redis, self._control_redis):
                await client.aclose()
            log.info("worker %s stopped", self.id)

    def stop(self) -> None:
        """Stop taking tasks (running ones may finish); a second call stops them too."""
        if self._stopping.is_set():
            for task in self.running.values():
                task.cancel()
        self._stopping.set()
        self._slot_free.set()

    async def _drain(self) -> None:
        if not self.running:
            return
        log.info("waiting up to %ss for %d running tasks", self.settings.shutdown_grace_seconds, len(self.running))
        _, late = await asyncio.wait(list(self.running.values()), timeout=self.settings.shutdown_grace_seconds)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_forever(self) -> None:
        while not self._stopping.is_set():
            free = self.concurrency - len(self.running)
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
                self.running[job.ref.label] = asyncio.create_task(self._run_job(job), name=job.ref.label)

    async def _run_job(self, job: Job) -> None:
        label = job.ref.label
        try:
            attempt = await self.queue.begin(job.ref, self.id)
            if attempt is None:
                log.info("task %s is no longer queued; skipped", label)
                return
            await self.redis.sadd(self.keys.worker_running(self.id), label)
            log.info("task %s started (attempt %d)", label, attempt)
            await self._execute(job.ref)
        finally:
            self.running.pop(label, None)
            self._cancel_requested.discard(label)
            self._slot_free.set()
            with contextlib.suppress(RedisError):
                await self.redis.srem(self.keys.worker_running(self.id), label)
                await self.queue.ack(job)

    # -- running one task --------------------------------------------------------------------

    async def _execute(self, ref: TaskRef) -> None:
        writer = self.log.writer(ref)
        try:
            model = apps.get_model(ref.app_label, ref.model)
            task: StreamTask = await model.objects.aget(pk=ref.pk)
        except (LookupError, ValueError, ObjectDoesNotExist) as exc:
            await self._fail(writer, None, exc, f"no task {ref} in the database")
            return
        task._stream_writer = writer
        await type(task).objects.filter(pk=task.pk).aupdate(status=Status.RUNNING)
        try:
            result = await task.process()
        except asyncio.CancelledError:
            if ref.label not in self._cancel_requested and not self._stopping.is_set():
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            await self._cancelled(writer, task)
            return
        except Exception as exc:
            log.exception("task %s failed", ref)
            await self._fail(writer, task, exc)
            return
        if ref.label in self._cancel_requested:  # process() swallowed the cancellation
            await self._cancelled(writer, task)
            return
        await self._finish(writer, task, result)

    async def _finish(self, writer: TaskWriter, task: StreamTask, result: Any) -> None:
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

    async def _fail(self, writer: TaskWriter, task: StreamTask | None, exc: BaseException, message: str = "") -> None:
        """End the run with one ``error`` event (no traceback: that stays in this log)."""
        message = message or str(exc) or type(exc).__name__
        if not writer.ended:
            await writer.append("error", {"message": message, "error_type": type(exc).__name__})
        if task is not None:
            await task.mark_failed(f"{type(exc).__name__}: {message}")

    async def _cancelled(self, writer: TaskWriter, task: StreamTask) -> None:
        reason = "worker shut down" if self._stopping.is_set() and writer.ref.label not in self._cancel_requested else "cancelled"
        if not writer.ended:
            await writer.append("cancelled", {"message": reason})
        await task.mark_failed(reason, status=Status.CANCELLED)
        log.info("task %s cancelled (%s)", writer.ref, reason)

    # -- heartbeat and control ---------------------------------------------------------------

    async def _heartbeat(self) -> None:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "running": len(self.running),
            "started_at": self.started_at,
            "heartbeat_at": datetime.now(UTC).isoformat(),
        }
        await self.redis.hset(self.keys.workers(), self.id, json.dumps(info))

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_heartbeat_seconds)
            try:
                await self._heartbeat()
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

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
                    label = fields.get(b"cancel", b"").decode()
                    if label in self.running:
                        self._cancel_requested.add(label)
                        self.running[label].cancel()
                        log.info("cancelling task %s on request", label)

    async def _unregister(self) -> None:
        with contextlib.suppress(RedisError):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hdel(self.keys.workers(), self.id)
            pipe.delete(self.keys.worker_running(self.id), self.keys.worker_control(self.id))
            await pipe.execute()
