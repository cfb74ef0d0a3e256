"""Recovery: taking over the jobs of workers that stopped renewing their leases.

A worker that dies (SIGKILL, out of memory, host lost), pauses past its lease, or hands its
tasks back on shutdown leaves its jobs in the consumer group's pending list, going stale. Every
worker looks for stale ones every few seconds (``JobQueue.claim_abandoned``) and asks the task's
state record what to do (``JobQueue.recover``, atomic, so two workers never both take a task):

* ``rerun``: the lease expired with attempts left (the class's ``max_attempts``): this worker
  runs the next attempt, and the stream goes on with an ``attempt`` event;
* ``exhausted``: it expired on the last allowed attempt: this worker gives up on the task with
  one ``error`` (``WorkerLost``), records it failed, and lists it in the dead letters;
* ``cancel``: it expired with a cancel asked for (the request went to the stopped worker):
  this worker ends the task with ``cancelled`` and records it cancelled;
* ``queued``: the job was claimed but never begun: run it as usual;
* ``alive``: the lease has not expired (a paused worker may come back): look again later;
* ``cancelling``: cancelled before it began, its ``cancelled`` event never written (the
  canceller was cut off): this worker writes it; the job is acknowledged;
* anything else (ended, missing, pending): nothing to run; the job is acknowledged.

Before a re-run, a give-up or a cancel, the database has its say: when the row records an end
that Redis lost (a failover, a restart without persistence), that outcome is written again
instead. A take-over that finds the task another worker's by the time it writes (its own run
token fenced off) lets go without acknowledging the job: the entry is that worker's now.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

from streamcoord.errors import WriterFenced
from streamcoord.eventlog import EventLog
from streamcoord.jobs import Job, JobQueue, Verdict
from streamcoord.taskstate import State

from . import outcomes
from .metrics import WorkerMetrics
from .outcomes import Outcome

log = logging.getLogger(__name__)

#: Starts a run of a job with a run token; the attempt when this worker took it over.
Launch = Callable[[Job, str, int | None], Awaitable[None]]


class Recovery:
    """One worker's recovery rounds."""

    def __init__(
        self, worker_id: str, queue: JobQueue, events: EventLog, lease_ms: int,
        launch: Launch, runs_here: Callable[[str], bool], metrics: WorkerMetrics | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.queue = queue
        self.events = events
        self.lease_ms = lease_ms
        self.launch = launch
        #: True for a task (label) this worker runs now: one it handed back while it leaves.
        self.runs_here = runs_here
        self.metrics = metrics or WorkerMetrics()

    async def recover_abandoned(self) -> None:
        """One round: take over every job idle for longer than a lease and act on its verdict."""
        for job in await self.queue.claim_abandoned(self.worker_id, self.lease_ms):
            if not self.runs_here(job.ref.label):
                await self._take_over(job)

    async def _take_over(self, job: Job) -> None:
        token = secrets.token_hex(8)
        verdict, attempt = await self.queue.recover(
            job, self.worker_id, token, self.lease_ms, outcomes.max_attempts(job.ref)
        )
        log.info("recovered %s from a stopped worker: %s (attempt %d)", job.ref, verdict, attempt)
        owned = (Verdict.RERUN, Verdict.EXHAUSTED, Verdict.CANCEL)
        if verdict in owned:  # the lost worker's run is this worker's now
            self.metrics.lease_takeovers.inc()
            if await self._replay_recorded_outcome(job, token):
                return
        if verdict == Verdict.RERUN:
            await self.launch(job, token, attempt)
        elif verdict == Verdict.EXHAUSTED:
            await self._give_up(job, token, attempt)
        elif verdict == Verdict.CANCEL:
            await self._cancel(job, token)
        elif verdict == Verdict.QUEUED:
            await self.launch(job, token, None)
        elif verdict == State.CANCELLING:
            if await outcomes.end_cancelling(self.events, job.ref):
                log.info("task %s was cancelled before it began: ended it with cancelled", job.ref)
            await self.queue.finish(job)
        elif verdict != Verdict.ALIVE:  # ended, missing, pending: nothing to run
            await self.queue.finish(job)

    async def _replay_recorded_outcome(self, job: Job, token: str) -> bool:
        """When the row says the task already ended (Redis lost the end), write that outcome as
        the terminal event instead of running or failing the task again. True when it did."""
        outcome = await outcomes.recorded_outcome(job.ref, self.events.settings.expose_errors)
        if outcome is None:
            return False
        if await self._end(job, token, outcome):
            log.info("task %s had ended (%s) before Redis lost it: its outcome is written again", job.ref, outcome.status)
            await self.queue.finish(job)
        return True

    async def _give_up(self, job: Job, token: str, attempt: int) -> None:
        """End a task whose last allowed run was lost with its worker: one ``error``, recorded
        failed, listed in the dead letters."""
        outcome = Outcome.failed("WorkerLost", f"the worker running it stopped (attempt {attempt})", attempt=attempt)
        if await self._end(job, token, outcome):
            await outcomes.record_by_ref(job.ref, outcome)
            await self.queue.dead_letter(job, attempt, "WorkerLost")
            self.metrics.dead_letters.inc()
            await self.queue.finish(job)

    async def _cancel(self, job: Job, token: str) -> None:
        """End a task that was asked to cancel while its worker was gone: ``cancelled``,
        recorded cancelled."""
        outcome = Outcome.cancelled()
        if await self._end(job, token, outcome):
            await outcomes.record_by_ref(job.ref, outcome)
            await self.queue.finish(job)
            log.info("task %s cancelled (its worker had stopped)", job.ref)

    async def _end(self, job: Job, token: str, outcome: Outcome) -> bool:
        """Write ``outcome`` as the task's terminal event under this take-over's run token.
        False when another worker took the task over since: the outcome and the job are its."""
        writer = self.events.writer(job.ref, token)
        try:
            await writer.append(outcome.event_type, outcome.payload(), final_value=outcome.final_value)
        except WriterFenced:
            log.warning("task %s: another worker took it over meanwhile; leaving it to that one", job.ref)
            return False
        # The lost worker's run ended here: counted once, on this worker (the other never will).
        self.metrics.tasks_ended.labels(outcomes.model_label(job.ref), outcome.status).inc()
        return True
