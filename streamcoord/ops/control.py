"""Cancel and retry a task without Django: the same core operations the coordinator uses.

Neither touches the task's row in the database (there is none here). What happens to it:

* **cancel** of a running task: its worker stops it and records ``cancelled`` on the row, as
  for any cancel. Of a queued task: the ``cancelled`` event is written here, and the worker
  that later claims its job records the row ``cancelled`` (while it still says pending or
  queued). Of a pending task (no job: nothing was started) no worker ever sees it, so its row
  keeps saying ``pending``: ``manage.py cancel_task`` records the row at once.
* **retry** of an ended task: the row keeps its old outcome until a worker begins the new run;
  it then records ``running`` (the old run's error, end and value cleared) and, at the end, the
  new outcome. ``manage.py retry_task`` also clears the row at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from redis.asyncio import Redis

from ..eventlog import EventLog
from ..jobs import CancelOutcome, JobQueue, StartOutcome
from ..keys import KeySpace, TaskRef
from ..settings import Settings
from ..taskstate import State

#: What the operator is told about the row after each kind of outcome.
ROW_NOT_TOUCHED = "the database row is not touched by this command"
ROW_BY_WORKER_CANCEL = "its worker records the row cancelled when it stops the task"
ROW_BY_CLAIM = "the worker that claims its job records the row cancelled"
ROW_STAYS = (
    "the database row still says {state}: no worker updates it (use manage.py cancel_task "
    "to have the row recorded too)"
)
ROW_BY_WORKER_RETRY = (
    "the database row keeps its old outcome until a worker runs the task; the worker then "
    "records it running and, at the end, the new outcome"
)


@dataclasses.dataclass(frozen=True, slots=True)
class CancelResult:
    """What a cancel did (``outcome``, as the coordinator's), and the state it found."""

    outcome: CancelOutcome
    before: str

    def __bool__(self) -> bool:
        return bool(self.outcome)

    def describe(self) -> str:
        return self.outcome.describe()

    def row_note(self) -> str:
        """What becomes of the database row."""
        if self.outcome.cancelled:
            # A queued task has a job, and the worker that claims it records the row; a pending
            # one has none (a cancelling one may be either: it was pending or queued).
            if self.before == State.QUEUED:
                return ROW_BY_CLAIM
            return ROW_STAYS.format(state=self.before if self.before != State.CANCELLING else "pending or queued")
        if self.outcome.worker:
            return ROW_BY_WORKER_CANCEL
        return ROW_NOT_TOUCHED

    def to_json(self) -> dict[str, Any]:
        return {
            "state_before": self.before, "cancelled": self.outcome.cancelled, "worker": self.outcome.worker,
            "outcome": self.describe(), "row": self.row_note(),
        }


async def cancel_task(redis: Redis, settings: Settings, ref: TaskRef) -> CancelResult:
    """Cancel the task wherever it is, as ``coordinator.cancel_task`` does (without the row):
    a pending or queued task ends with ``cancelled`` here; a running one's worker is told."""
    queue, events = JobQueue(redis, KeySpace(settings.key_prefix)), EventLog(redis, settings)
    before, worker = await queue.request_cancel(ref)
    if before in (State.PENDING, State.QUEUED, State.CANCELLING):
        after = await events.end_cancelled_before_start(ref)
        return CancelResult(CancelOutcome(after or before, cancelled=after == State.CANCELLED), before)
    return CancelResult(CancelOutcome(before, worker if before == State.RUNNING else ""), before)


@dataclasses.dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What a retry did: ``renewed`` when the task had ended and is pending again (its old
    stream gone); ``before``: its state before ('' when Redis knew nothing of it); ``start``:
    the start that followed (None when none was made)."""

    renewed: bool
    before: str
    start: StartOutcome | None = None

    def __bool__(self) -> bool:
        return bool(self.start)

    def describe(self) -> str:
        if self.renewed and self.start is not None:
            return (
                f"retried: the {self.before} task is {self.start.describe()} as a new run of the "
                "same stream (a new epoch: clients resuming the old one get reset)"
            )
        if self.start is not None:
            return self.start.describe()
        if not self.before:
            return (
                "not retried: Redis knows nothing of this task (its keys expired, or it never "
                "existed); manage.py retry_task starts it from its row"
            )
        return f"not retried: the task is {self.before}"

    def row_note(self) -> str:
        return ROW_BY_WORKER_RETRY if self else ROW_NOT_TOUCHED

    def to_json(self) -> dict[str, Any]:
        return {
            "renewed": self.renewed, "state_before": self.before,
            "queued": bool(self.start and self.start.queued), "outcome": self.describe(),
            "row": self.row_note(),
        }


async def retry_task(redis: Redis, settings: Settings, ref: TaskRef) -> RetryOutcome:
    """Run an ended (completed, failed, cancelled, dead-lettered) task again, as
    ``coordinator.retry_task`` does: ``JobQueue.renew_ended`` then ``JobQueue.start``. A
    pending task is only started; a queued, running or unknown one is left alone."""
    queue = JobQueue(redis, KeySpace(settings.key_prefix))
    renewed, before = await queue.renew_ended(ref)
    if not renewed and before != State.PENDING:
        return RetryOutcome(False, before)
    return RetryOutcome(renewed, before, await queue.start(ref))
