"""Running one task: from a claimed job to exactly one terminal event, recorded on the row.

How a run ends, and what it leaves behind:

=====================================  ===================================================
``process()`` returns                  ``complete`` ``{final_value}`` (unless it sent one)
``process()`` raises                   ``error`` ``{message, error_type}``; traceback logged
the task's own ``time_limit`` expires  ``error`` ``TimeoutError``, "exceeded its time limit"
``process()`` sent its own end         that end, recorded on the row, whatever came after it
stopped from outside: a cancel         ``cancelled``
stopped from outside: a hand back      nothing: another worker takes the task over now
stopped from outside: lease lost       nothing: the worker that took it over owns the end
another run owns the task              nothing (``WriterFenced``): the outcome and the job
                                       are the other run's; this run never acknowledges
                                       the job (the other worker's entry now)
Redis fails under the run              nothing: once the lease expires, recovery takes over
the job names a model this worker      nothing, and never begun: the job stays in the queue
lacks (deployed after it started)      for a worker that has the model (after a lease)
=====================================  ===================================================

Stops come from outside (the control channel, the lease renewal, a shutdown) and are honoured
only while they can still change the outcome: one that comes before the run has begun is acted
on once it has (a hand back before ``begin`` leaves the job to another worker), and one that
comes after ``process()`` returned or raised is ignored: the run is writing its end then, and
cancelling that would leave the task without its row and its job without an acknowledgement.

A ``TimeoutError`` is the time limit's only when the limit itself expired: ``process()`` may
raise its own (an upstream call that timed out), and that is an ordinary failure with its own
message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import DatabaseError
from redis.exceptions import RedisError

from django_app.models import StreamTask
from streamcoord.errors import EventRejected, TaskFailure, WriterFenced
from streamcoord.eventlog import EventLog, TaskWriter
from streamcoord.ids import EventId
from streamcoord.jobs import Job, JobQueue
from streamcoord.keys import TaskRef
from streamcoord.taskstate import State

from . import outcomes
from .metrics import WorkerMetrics
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
    #: The task's record names this run (``begin.lua`` took it, or recovery took it over): from
    #: here on its lease is renewed, and a stop cancels it.
    begun: bool = False
    #: ``process()`` returned or raised: the run writes its end, which no stop interrupts.
    ending: bool = False
    #: The task's row, when it was loaded before ``begin`` (see ``Executor._model_unknown``).
    row: StreamTask | None = None
    #: The row is being loaded before ``begin``: a stop may cancel that, nothing is cut off.
    loading: bool = False

    @property
    def label(self) -> str:
        return self.job.ref.label

    def stop(self, reason: StopReason) -> bool:
        """Stop the run for ``reason``, unless it already ended, is writing its end, or is
        already being stopped (the first reason wins). A run that has not begun is not
        cancelled (that would cut ``begin`` off midway), but for the load of its row before
        ``begin``: it acts on the reason once it has begun. True when this call stopped it."""
        if self.task is None or self.task.done() or self.stop_reason is not None or self.ending:
            return False
        self.stop_reason = reason
        if self.begun or self.loading:
            self.task.cancel()
        return True


class Executor:
    """Runs claimed jobs of one worker (each in its own asyncio task, see ``Worker``)."""

    def __init__(
        self, worker_id: str, queue: JobQueue, events: EventLog, lease_ms: int, metrics: WorkerMetrics | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.queue = queue
        self.events = events
        self.lease_ms = lease_ms
        self.metrics = metrics or WorkerMetrics()

    async def run(self, run: Run, attempt: int | None) -> None:
        """Begin the task (unless ``attempt`` says this worker took it over and began it
        already), run it to its end, and acknowledge its job, if this run still owns it then."""
        label = run.label
        try:
            if attempt is None:
                if run.stop_reason != StopReason.HAND_BACK and await self._model_unknown(run):
                    return
                if run.stop_reason == StopReason.HAND_BACK:
                    # Not begun: the job stays pending, and another worker runs it once it has
                    # been idle for a lease (recovery's "queued").
                    log.info("task %s handed back before it began", label)
                    return
                attempt = await self.queue.begin(run.job.ref, self.worker_id, run.token, self.lease_ms)
                if attempt is None:
                    await self._not_begun(run)
                    return
            run.begun = True
            began = time.perf_counter()
            model = outcomes.model_label(run.job.ref)
            self.metrics.tasks_started.labels(model).inc()
            log.info("task %s started (attempt %d)", label, attempt)
            outcome = await self._execute(run, attempt)
            if outcome is not None:
                # Counted before the acknowledgement: the task has ended whether or not that
                # succeeds (recovery acknowledges a job whose stream has its end).
                self.metrics.run_ended(model, outcome.status, time.perf_counter() - began)
                await self.queue.finish(run.job)
        except (RedisError, OSError) as exc:
            # The job stays pending: once its lease runs out, a worker takes it over.
            self.metrics.redis_errors.inc()
            log.error("task %s: Redis failed under it (%s); leaving it to recovery", label, exc)
        except Exception:
            # Typically the database refused the outcome. The job stays pending: once the lease
            # runs out, recovery acknowledges it (the stream has its end) or runs it again.
            log.exception("task %s: ending the run failed; leaving it to recovery", label)

    async def _model_unknown(self, run: Run) -> bool:
        """True when the job names a model this worker does not have, so it leaves the job to
        a worker that has: a model deployed after this worker started (its code cannot be
        loaded into a running process). The task is not begun, so it stays queued and the run
        counts as no attempt; the job stays unacknowledged in the queue, where the recovery
        round of any worker takes it once it has been idle for a lease (recovery's "queued"
        runs it as usual). That lease is the back-off: a worker that lacks the model meets the
        job again at most once a lease, never in a hot loop.

        The row is loaded here, before ``begin``, for that question (``load_task`` answers
        LookupError for an unknown model only), and kept for the run. Any other failure to load
        it is left to the run, which begins the task and then fails it as before; so is a stop
        that comes while it loads (it cancels the load)."""
        ref = run.job.ref
        run.loading = True
        try:
            run.row = await outcomes.load_task(ref)
            return False
        except asyncio.CancelledError:
            if run.stop_reason is None:
                raise  # the worker itself is being torn down
            _uncancel()
            return False
        except LookupError:
            pass  # no such model here
        except (ValueError, ObjectDoesNotExist, DatabaseError):
            return False  # the run begins the task, then fails it (or leaves it to recovery), as before
        finally:
            run.loading = False
        record = await self.events.state(ref)
        if record is None or record.state != State.QUEUED:
            return False  # nothing left to run (cancelled, deleted): begin refuses it, and drops the job
        log.warning(
            "task %s: this worker has no model %s (added after the worker started?); left in the "
            "queue for a worker that has it, tried again in %gs. Restart or deploy the workers.",
            ref, ref.model_label, self.lease_ms / 1000,
        )
        return True

    async def _not_begun(self, run: Run) -> None:
        """``begin`` refused the task: it is not queued (cancelled before it began, begun from
        another entry of the same start, or ended). The job is dropped; a task left
        ``cancelling`` (its canceller cut off before the ``cancelled`` event) is ended here."""
        record = await self.events.state(run.job.ref)
        if record is not None and record.state == State.CANCELLING:
            if await outcomes.end_cancelling(self.events, run.job.ref):
                log.info("task %s was cancelled before it began: ended it with cancelled", run.label)
        elif record is not None and record.state == State.CANCELLED and await outcomes.record_cancelled_before_start(run.job.ref):
            log.info("task %s was cancelled before it began: recorded its row cancelled", run.label)
        else:
            log.info("task %s is no longer queued; skipped", run.label)
        # A begin slower than a lease lets another worker take the entry over: never drop it
        # from under that worker.
        await self.queue.finish_if_ours(run.job, self.worker_id)

    async def _execute(self, run: Run, attempt: int) -> Outcome | None:
        """Run the task and write its end. The outcome when this run ended it (its terminal
        event is in the stream, under this run's token), so the job is this run's to
        acknowledge; None when the task is another run's now, or was handed back."""
        ref = run.job.ref
        writer = TimedWriter(self.events.writer(ref, run.token), self.metrics)
        task: StreamTask | None = None
        limit: asyncio.Timeout | None = None
        try:
            record = await self.events.state(ref)
            if record is not None and record.cancel_requested_at and run.stop_reason is None:
                # Asked while this run was being begun or taken over: the request reached this
                # worker before the run could be stopped, or went to the worker before it.
                run.stop_reason = StopReason.CANCEL
            if run.stop_reason is None:
                task = run.row if run.row is not None else await outcomes.load_task(ref)
                task._stream_writer = writer
                await outcomes.record_running(task)
                if attempt > 1:
                    await writer.append("attempt", {"attempt": attempt, "reason": "the previous worker stopped"})
                async with asyncio.timeout(task.time_limit) as limit:
                    result = await task.process()
        except asyncio.CancelledError:
            if run.stop_reason is None:
                raise  # the worker itself is being torn down
            run.ending = True
            _uncancel()
            return await self._stopped_from_outside(run, writer, task)
        except WriterFenced:
            run.ending = True
            log.warning("task %s: another worker owns it now; this run stops without a word", ref)
            return None
        except Exception as exc:
            run.ending = True
            if task is None:
                if not isinstance(exc, LookupError | ValueError | ObjectDoesNotExist):
                    raise  # the database failed: the job stays pending for recovery
                return await self._fail(writer, None, exc, f"no task {ref} in the database")
            if isinstance(exc, TimeoutError) and limit is not None and limit.expired():
                log.info("task %s exceeded its time limit of %ss", ref, task.time_limit)
                return await self._fail(writer, task, exc, f"exceeded its time limit of {task.time_limit}s")
            log.exception("task %s failed", ref)
            public = isinstance(exc, TaskFailure) or self.events.settings.expose_errors
            return await self._fail(writer, task, exc, public=public)
        run.ending = True
        if task is None or run.stop_reason is not None:
            # Stopped before process() began, or process() swallowed the cancellation.
            _uncancel()
            return await self._stopped_from_outside(run, writer, task)
        return await self._finish(writer, task, result)

    async def _stopped_from_outside(self, run: Run, writer: TimedWriter, task: StreamTask | None) -> Outcome | None:
        if writer.ended:  # process() had sent its own end: that is the outcome, the stop came late
            return await self._end(writer, task, Outcome.sent_by_the_task(writer.ended))
        if run.stop_reason == StopReason.CANCEL:
            outcome = await self._end(writer, task, Outcome.cancelled())
            if outcome is None:
                return None
            if task is None:  # cancelled before the row was loaded
                await outcomes.record_by_ref(writer.ref, outcome)
            log.info("task %s cancelled", writer.ref)
            return outcome
        if run.stop_reason == StopReason.HAND_BACK:
            handed = await self.queue.hand_back(run.job, self.worker_id, run.token, self.lease_ms)
            log.info("task %s handed back to the other workers%s", writer.ref, "" if handed else " (already gone)")
        # LOST: another worker owns the task; it records the outcome, not us.
        return None

    async def _finish(self, writer: TimedWriter, task: StreamTask, result: Any) -> Outcome | None:
        """``process()`` returned ``result``: complete the run, unless the task ended it itself."""
        if writer.ended in ("error", "cancelled"):
            outcome = Outcome.sent_by_the_task(writer.ended)
            await outcomes.record(task, outcome)
            return outcome
        outcome = Outcome.completed(result)
        try:
            if writer.ended:  # it sent its own complete: only the final value is left to keep
                await self.events.set_final_value(writer.ref, result)
            else:
                await _append_end(writer, outcome)
        except WriterFenced:
            log.warning("task %s: another worker owns it now; its outcome is theirs", writer.ref)
            return None
        except (EventRejected, TypeError, ValueError) as exc:
            return await self._fail(writer, task, exc, f"final value refused: {exc}")
        await outcomes.record(task, outcome)
        log.info("task %s completed", writer.ref)
        return outcome

    async def _fail(
        self, writer: TimedWriter, task: StreamTask | None, exc: BaseException, message: str = "",
        *, public: bool = True,
    ) -> Outcome | None:
        """End the run with one ``error`` event (no traceback: that stays in this log). The
        ``message`` given here is ours; an exception's own text reaches the event only when
        ``public``."""
        text = message or str(exc) or type(exc).__name__
        outcome = Outcome.failed(type(exc).__name__, text, public=public or bool(message))
        return await self._end(writer, task, outcome)

    async def _end(self, writer: TimedWriter, task: StreamTask | None, outcome: Outcome) -> Outcome | None:
        """Write the outcome's terminal event and record it on the row. When ``process()``
        sent its own terminal event, that one is the outcome (Redis ended the task with it) and
        the row records it instead. Returns the outcome recorded; None when another run owns
        the task: the outcome, the row and the job are theirs."""
        if writer.ended:
            outcome = Outcome.sent_by_the_task(writer.ended)
        else:
            try:
                await _append_end(writer, outcome)
            except WriterFenced:
                log.warning("task %s: another worker owns it now; its outcome is theirs", writer.ref)
                return None
        if task is not None:
            await outcomes.record(task, outcome)
        return outcome


class TimedWriter:
    """A run's :class:`TaskWriter`, timing each append into ``send_event_seconds``: the task's
    ``send_event`` calls (it is the task's ``_stream_writer``) and the worker's own ``attempt``
    and terminal events. Only appends that succeed are observed (a refused payload is no
    latency), so the histogram counts the events a run wrote."""

    def __init__(self, writer: TaskWriter, metrics: WorkerMetrics) -> None:
        self.writer = writer
        self._observe = metrics.send_event.observe

    @property
    def ref(self) -> TaskRef:
        return self.writer.ref

    @property
    def ended(self) -> str:
        """The terminal event type this run appended ('' while it goes on)."""
        return self.writer.ended

    async def append(self, event_type: str, payload: dict[str, Any], *, final_value: Any = None) -> EventId:
        began = time.perf_counter()
        event_id = await self.writer.append(event_type, payload, final_value=final_value)
        self._observe(time.perf_counter() - began)
        return event_id


async def _append_end(writer: TimedWriter, outcome: Outcome) -> None:
    await writer.append(outcome.event_type, outcome.payload(), final_value=outcome.final_value)


def _uncancel() -> None:
    """We handle this cancellation ourselves; later awaits of the task must not see it."""
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        current.uncancel()
