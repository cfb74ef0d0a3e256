"""Recovery: taking over the jobs of workers that stopped renewing their leases.

A worker that dies (SIGKILL, out of memory, host lost), pauses past its lease, or hands its
tasks back on shutdown leaves its jobs in the consumer group's pending list, going stale. Every
worker looks for stale ones every few seconds (``JobQueue.claim_abandoned``) and asks the task's
state record what to do (``JobQueue.recover``, atomic, so two workers never both take a task):

* ``rerun``: the lease expired with attempts left (the class's ``max_attempts``): this worker
  runs the next attempt, and the stream goes on with an ``attempt`` event;
* ``exhausted``: it expired on the last allowed attempt: this worker gives up on the task with
  one ``error`` (``WorkerLost``), records it failed, and lists it in the dead letters;
* ``queued``: the job was claimed but never begun: run it as usual;
* ``alive``: the lease has not expired (a paused worker may come back): look again later;
* anything else (ended, missing, cancelling): nothing to run; the job is acknowledged.

Before a re-run or a give-up, the database has its say: when the row records an end that Redis
lost (a failover, a restart without persistence), that outcome is written again instead.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable

from streamcoord.errors import WriterFenced
from streamcoord.eventlog import EventLog
from streamcoord.jobs import Job, JobQueue, Verdict

from . import outcomes
from .outcomes import Outcome

log = logging.getLogger(__name__)

#: Starts a run of a job with a run token; the attempt when this worker took it over.
Launch = Callable[[Job, str, int | None], None]


class Recovery:
    """One worker's recovery rounds."""

    def __init__(
        self, worker_id: str, queue: JobQueue, events: EventLog, lease_ms: int,
        launch: Launch, runs_here: Callable[[str], bool],
    ) -> None:
        self.worker_id = worker_id
        self.queue = queue
        self.events = events
        self.lease_ms = lease_ms
        self.launch = launch
        #: True for a task (label) this worker runs now: one it handed back while it leaves.
        self.runs_here = runs_here

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
        if verdict in (Verdict.RERUN, Verdict.EXHAUSTED) and await self._replay_recorded_outcome(job, token):
            return
        if verdict == Verdict.RERUN:
            self.launch(job, token, attempt)
        elif verdict == Verdict.EXHAUSTED:
            await self._give_up(job, token, attempt)
        elif verdict == Verdict.QUEUED:
            self.launch(job, token, None)
        elif verdict != Verdict.ALIVE:  # ended, missing, pending, cancelling: nothing to run
            await self.queue.finish(job)

    async def _replay_recorded_outcome(self, job: Job, token: str) -> bool:
        """When the row says the task already ended (Redis lost the end), write that outcome as
        the terminal event instead of running or failing the task again. True when it did."""
        outcome = await outcomes.recorded_outcome(job.ref)
        if outcome is None:
            return False
        writer = self.events.writer(job.ref, token)
        with contextlib.suppress(WriterFenced):
            await writer.append(outcome.event_type, outcome.payload(), final_value=outcome.final_value)
        log.info("task %s had ended (%s) before Redis lost it: its outcome is written again", job.ref, outcome.status)
        await self.queue.finish(job)
        return True

    async def _give_up(self, job: Job, token: str, attempt: int) -> None:
        """End a task whose last allowed run was lost with its worker: one ``error``, recorded
        failed, listed in the dead letters."""
        outcome = Outcome.failed("WorkerLost", f"the worker running it stopped (attempt {attempt})", attempt=attempt)
        writer = self.events.writer(job.ref, token)
        with contextlib.suppress(WriterFenced):
            await writer.append(outcome.event_type, outcome.payload())
            await outcomes.record_by_ref(job.ref, outcome)
            await self.queue.dead_letter(job, attempt, "WorkerLost")
        await self.queue.finish(job)
