"""Outcomes: how a run ended, as a terminal event and as the task's row in the database.

The row (``status``, ``error``, ``final_value``, ``completed_at`` of a ``StreamTask``) is the
durable record of an outcome: Redis can lose a task's end (a failover, a restart without
persistence), the database does not. A worker writes the row just after the terminal event, and
recovery reads it back, so a task whose end Redis lost gets that outcome written again instead of
a second run or a false failure. Both directions go through :class:`Outcome`, so the row's
``error`` text (``"ErrorType: message"``) is written and parsed in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django.apps import apps
from django.utils import timezone

from django_app.models import Status, StreamTask
from streamcoord.eventlog import CANCELLED_BEFORE_START, EventLog
from streamcoord.keys import TaskRef
from streamcoord.taskstate import TERMINAL_EVENTS, State

from .metrics import UNKNOWN_MODEL

#: The terminal event that records each ended status.
_EVENT_OF: dict[str, str] = {state.value: event for event, state in TERMINAL_EVENTS.items()}
#: What a failure's ``error`` event says when its text is not for the task's watchers.
PRIVATE_FAILURE = "the task failed"
#: Failures whose text is written for watchers: the task's own ``TaskFailure``, and ours.
PUBLIC_TYPES = frozenset({"TaskFailure", "WorkerLost"})


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How one run ended. ``error_type`` is empty when the task itself sent its ``error``
    (the row then says so in ``message`` alone)."""

    status: str  #: a ``Status``: completed, failed or cancelled
    final_value: Any = None
    error_type: str = ""
    message: str = ""
    #: The ``message`` may reach the task's watchers (else the event says ``PRIVATE_FAILURE``;
    #: the row keeps the message either way).
    public: bool = True
    #: More fields of the terminal event's payload (``attempt`` of a ``WorkerLost``).
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def completed(cls, final_value: Any) -> Outcome:
        return cls(Status.COMPLETED, final_value=final_value)

    @classmethod
    def failed(cls, error_type: str, message: str, *, public: bool = True, **details: Any) -> Outcome:
        return cls(Status.FAILED, error_type=error_type, message=message, public=public, details=details)

    @classmethod
    def cancelled(cls, message: str = "cancelled") -> Outcome:
        return cls(Status.CANCELLED, message=message)

    @property
    def event_type(self) -> str:
        """``complete``, ``error`` or ``cancelled``."""
        return _EVENT_OF[self.status]

    def payload(self) -> dict[str, Any]:
        """The terminal event's data (never a traceback: that stays in the worker's log)."""
        if self.status == Status.COMPLETED:
            return {"final_value": self.final_value}
        if self.status == Status.FAILED:
            message = self.message if self.public else PRIVATE_FAILURE
            return {"message": message, "error_type": self.error_type or "Error", **self.details}
        return {"message": self.message}

    @property
    def row_error(self) -> str:
        """The row's ``error``: ``"ErrorType: message"``, or the message alone."""
        return f"{self.error_type}: {self.message}" if self.error_type else self.message

    @classmethod
    def sent_by_the_task(cls, event_type: str) -> Outcome:
        """The outcome of a terminal event ``process()`` sent itself. Redis ended the task with
        it, so the row records it too, however the run went on (it may still have raised, run
        out of time or been cancelled)."""
        if event_type == "complete":
            return cls.completed(None)
        if event_type == "error":
            return cls(Status.FAILED, message="the task sent its own error event")
        return cls.cancelled("the task sent its own cancelled event")

    @classmethod
    def from_row(cls, status: str, final_value: Any, error: str, expose: bool = False) -> Outcome | None:
        """The outcome a row records; None while the row says the task has not ended. A failure's
        text is public only for ``PUBLIC_TYPES`` (or with ``expose``): the row does not say
        whether it came from the task's own exception."""
        if status == Status.COMPLETED:
            return cls.completed(final_value)
        if status == Status.CANCELLED:
            return cls.cancelled(error or "cancelled")
        if status == Status.FAILED:
            error_type, sep, message = error.partition(": ")
            if sep and error_type.isidentifier():
                return cls.failed(error_type, message, public=expose or error_type in PUBLIC_TYPES)
            return cls.failed("Error", error or "failed", public=expose)
        return None


def task_model(ref: TaskRef) -> type[StreamTask] | None:
    """The ``StreamTask`` model a job names; None when this project has no such model."""
    try:
        model = apps.get_model(ref.app_label, ref.model)
    except LookupError:
        return None
    return model if issubclass(model, StreamTask) else None


def model_label(ref: TaskRef) -> str:
    """The ``model`` label of the worker's metrics: ``app_label.Model``, or ``unknown`` for a
    model this project lacks (a job's label is anyone's text; the label set stays bounded)."""
    return ref.model_label if task_model(ref) is not None else UNKNOWN_MODEL


def model_labels() -> list[str]:
    """The ``model`` labels of every concrete ``StreamTask`` model of this project."""
    return sorted(
        model._meta.label for model in apps.get_models() if issubclass(model, StreamTask) and not model._meta.abstract
    )


def max_attempts(ref: TaskRef) -> int:
    """Runs the task's class allows (at least one; one for a model this project lacks)."""
    model = task_model(ref)
    return max(1, getattr(model, "max_attempts", 1)) if model else 1


async def load_task(ref: TaskRef) -> StreamTask:
    """The task's row. Raises LookupError (no such model), ValueError (a bad pk) or
    ``ObjectDoesNotExist`` (no such row)."""
    model = task_model(ref)
    if model is None:
        raise LookupError(f"no StreamTask model {ref.model_label}")
    task: StreamTask = await model.objects.aget(pk=ref.pk)
    return task


async def record_running(task: StreamTask) -> None:
    """The row of a run that began: running, an earlier run's end forgotten (a task retried
    from outside Django, ``streamcoord retry``, still has its last outcome on the row)."""
    await type(task).objects.filter(pk=task.pk).aupdate(
        status=Status.RUNNING, error="", completed_at=None, final_value=None, updated_at=timezone.now()
    )


async def record_cancelled_before_start(ref: TaskRef) -> bool:
    """A row still pending or queued whose task Redis ended cancelled before any worker began
    it, by a cancel from outside Django (``streamcoord cancel``): recorded cancelled, as the
    coordinator's cancel records it. True when a row was changed."""
    model = task_model(ref)
    if model is None:
        return False
    waiting = model.objects.filter(pk=ref.pk, status__in=(Status.PENDING, Status.QUEUED))
    changed = await waiting.aupdate(status=Status.CANCELLED, error=CANCELLED_BEFORE_START, updated_at=timezone.now())
    return bool(changed)


async def record(task: StreamTask, outcome: Outcome) -> None:
    """Record an outcome on a loaded task's row, through its ``mark_completed`` /
    ``mark_failed`` (a model may extend them)."""
    if outcome.status == Status.COMPLETED:
        await task.mark_completed(outcome.final_value)
    else:
        await task.mark_failed(outcome.row_error, status=outcome.status)


async def record_by_ref(ref: TaskRef, outcome: Outcome) -> None:
    """Record a failure or cancel on a row this worker never loaded (a task taken over only to
    end it); nothing when the project lacks the model."""
    model = task_model(ref)
    if model is not None:
        await model.objects.filter(pk=ref.pk).aupdate(
            status=outcome.status, error=outcome.row_error, updated_at=timezone.now()
        )


async def recorded_outcome(ref: TaskRef, expose: bool = False) -> Outcome | None:
    """The outcome the task's row records, if it says the task ended."""
    model = task_model(ref)
    if model is None:
        return None
    row = await model.objects.filter(pk=ref.pk).only("status", "final_value", "error").afirst()
    return Outcome.from_row(row.status, row.final_value, row.error, expose) if row is not None else None


async def end_cancelling(events: EventLog, ref: TaskRef) -> bool:
    """End a task left ``cancelling``: cancelled before any worker began it, its ``cancelled``
    event not written yet (the canceller was cut off after ``cancel.lua``, or is writing it
    now). Writes that event (with no run token: no run ever owned the task) and records the row
    cancelled. A canceller that writes it first is fine: its event stands, the row says the
    same. False when the task turned out to be neither (events sent from outside a worker made
    it running): nothing is recorded then."""
    if await events.end_cancelled_before_start(ref) != State.CANCELLED:
        return False
    await record_by_ref(ref, Outcome.cancelled(CANCELLED_BEFORE_START))
    return True
