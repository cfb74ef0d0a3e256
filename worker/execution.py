"""Running one task: from a claimed job to exactly one terminal event, recorded on the row.

How a run ends, and what it leaves behind:

=====================================  ===================================================
``process()`` returns                  ``complete`` ``{final_value}`` (unless it sent one)
``process()`` raises                   ``error`` ``{message, error_type}``; traceback logged
the task's own ``time_limit`` expires  ``error`` ``TimeoutError``, "exceeded its time limit"
stopped from outside: a cancel         ``cancelled``
stopped from outside: a hand back      nothing: another worker takes the task over now
stopped from outside: lease lost       nothing: the worker that took it over owns the end
another run owns the stream            nothing (``WriterFenced``): the outcome is theirs
Redis fails under the run              nothing: once the lease expires, recovery takes over
=====================================  ===================================================

A ``TimeoutError`` is the time limit's only when the limit itself expired: ``process()`` may
raise its own (an upstream call that timed out), and that is an ordinary failure with its own
message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from redis.exceptions import RedisError

from django_app.models import Status, StreamTask
from streamcoord.errors import EventRejected, WriterFenced
from streamcoord.eventlog import EventLog, TaskWriter
from streamcoord.jobs import Job, JobQueue

from . import outcomes
from .outcomes import Outcome

log = logging.getLogger(__name__)


class StopReason(enum.StrEnum):
    """Why a run is stopped from outside while ``process()`` runs."""

    CANCEL = "cancel"  #: a user asked (the control channel): the run ends with ``cancelled``
    LOST = "lost"  #: another worker took the task over: this run lets go without a word
    HAND_BACK = "hand back"  #: this worker shuts down: another worker takes the task over


@dataclasses.dataclass(eq=False)
class Run:
    """One task this worker runs now: its job, its run token, and the asyncio task running it."""

    job: Job
    #: The run token: the task's stream takes appends from this run only while it matches.
    token: str
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None

    @property
    def label(self) -> str:
        return self.job.ref.label

    def stop(self, reason: StopReason) -> bool:
        """Cancel the run's coroutine for ``reason``, unless it already ended or is already
        being stopped (the first reason wins). True when this call stopped it."""
        if self.task is None or self.task.done() or self.stop_reason is not None:
            return False
        self.stop_reason = reason
        self.task.cancel()
        return True


class Executor:
    """Runs claimed jobs of one worker (each in its own asyncio task, see ``Worker``)."""

    def __init__(self, worker_id: str, queue: JobQueue, events: EventLog, lease_ms: int) -> None:
        self.worker_id = worker_id
        self.queue = queue
        self.events = events
        self.lease_ms = lease_ms

    async def run(self, run: Run, attempt: int | None) -> None:
        """Begin the task (unless ``attempt`` says this worker took it over and began it
        already), run it to its end, and acknowledge its job."""
        label = run.label
        try:
            if attempt is None:
                attempt = await self.queue.begin(run.job.ref, self.worker_id, run.token, self.lease_ms)
                if attempt is None:
                    log.info("task %s is no longer queued; skipped", label)
                    await self.queue.finish(run.job)
                    return
            log.info("task %s started (attempt %d)", label, attempt)
            await self._execute(run, attempt)
            if run.stop_reason not in (StopReason.LOST, StopReason.HAND_BACK):
                await self.queue.finish(run.job)
        except (RedisError, OSError) as exc:
            # The job stays pending: once its lease runs out, a worker takes it over.
            log.error("task %s: Redis failed under it (%s); leaving it to recovery", label, exc)
        except Exception:
            # Typically the database refused the outcome. The job stays pending: once the lease
            # runs out, recovery acknowledges it (the stream has its end) or runs it again.
            log.exception("task %s: ending the run failed; leaving it to recovery", label)

    async def _execute(self, run: Run, attempt: int) -> None:
        ref = run.job.ref
        writer = self.events.writer(ref, run.token)
        try:
            task = await outcomes.load_task(ref)
        except (LookupError, ValueError, ObjectDoesNotExist) as exc:
            await self._fail(writer, None, exc, f"no task {ref} in the database")
            return
        task._stream_writer = writer
        limit: asyncio.Timeout | None = None
        try:
            await outcomes.record_running(task)
            if attempt > 1:
                await writer.append("attempt", {"attempt": attempt, "reason": "the previous worker stopped"})
            async with asyncio.timeout(task.time_limit) as limit:
                result = await task.process()
        except asyncio.CancelledError:
            if run.stop_reason is None:
                raise  # the worker itself is being torn down
            _uncancel()
            await self._stopped_from_outside(run, writer, task)
            return
        except WriterFenced:
            log.warning("task %s: another worker owns it now; this run stops without a word", ref)
            return
        except Exception as exc:
            if isinstance(exc, TimeoutError) and limit is not None and limit.expired():
                log.info("task %s exceeded its time limit of %ss", ref, task.time_limit)
                await self._fail(writer, task, exc, f"exceeded its time limit of {task.time_limit}s")
            else:
                log.exception("task %s failed", ref)
                await self._fail(writer, task, exc)
            return
        if run.stop_reason is not None:  # process() swallowed the cancellation
            await self._stopped_from_outside(run, writer, task)
            return
        await self._finish(writer, task, result)

    async def _stopped_from_outside(self, run: Run, writer: TaskWriter, task: StreamTask) -> None:
        if run.stop_reason == StopReason.CANCEL:
            if await self._end(writer, task, Outcome.cancelled()):
                log.info("task %s cancelled", writer.ref)
        elif run.stop_reason == StopReason.HAND_BACK:
            handed = await self.queue.hand_back(run.job, self.worker_id, run.token, self.lease_ms)
            log.info("task %s handed back to the other workers%s", writer.ref, "" if handed else " (already gone)")
        # LOST: another worker owns the task; it records the outcome, not us.

    async def _finish(self, writer: TaskWriter, task: StreamTask, result: Any) -> None:
        """``process()`` returned ``result``: complete the run, unless the task ended it itself."""
        if writer.ended == "error":
            await outcomes.record(task, Outcome(Status.FAILED, message="the task sent its own error event"))
            return
        if writer.ended == "cancelled":
            await outcomes.record(task, Outcome.cancelled("the task sent its own cancelled event"))
            return
        outcome = Outcome.completed(result)
        try:
            if writer.ended:  # it sent its own complete: only the final value is left to keep
                await self.events.set_final_value(writer.ref, result)
            else:
                await _append_end(writer, outcome)
        except WriterFenced:
            log.warning("task %s: another worker owns it now; its outcome is theirs", writer.ref)
            return
        except (EventRejected, TypeError, ValueError) as exc:
            await self._fail(writer, task, exc, f"final value refused: {exc}")
            return
        await outcomes.record(task, outcome)
        log.info("task %s completed", writer.ref)

    async def _fail(self, writer: TaskWriter, task: StreamTask | None, exc: BaseException, message: str = "") -> None:
        """End the run with one ``error`` event (no traceback: that stays in this log)."""
        outcome = Outcome.failed(type(exc).__name__, message or str(exc) or type(exc).__name__)
        await self._end(writer, task, outcome)

    async def _end(self, writer: TaskWriter, task: StreamTask | None, outcome: Outcome) -> bool:
        """Write the outcome's terminal event (unless the run has one already) and record it on
        the row. False when another run owns the stream: the outcome is theirs to record."""
        try:
            if not writer.ended:
                await _append_end(writer, outcome)
        except WriterFenced:
            log.warning("task %s: another worker owns it now; its outcome is theirs", writer.ref)
            return False
        if task is not None:
            await outcomes.record(task, outcome)
        return True


async def _append_end(writer: TaskWriter, outcome: Outcome) -> None:
    await writer.append(outcome.event_type, outcome.payload(), final_value=outcome.final_value)


def _uncancel() -> None:
    """We handle this cancellation ourselves; later awaits of the task must not see it."""
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()
