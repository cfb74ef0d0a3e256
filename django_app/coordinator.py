"""The ``coordinator``: start, find, watch, cancel and retry tasks from Django code.

``start_task`` never runs anything in the calling process: it queues the task in Redis, and one
worker (``manage.py runworker``, on any host) runs it. Every method works from any process, and
from anywhere in it: sync views under WSGI or ASGI, async views, the shell, management
commands, inside ``transaction.atomic`` (a start asked for inside a transaction is sent to Redis
when it commits, and never when it rolls back).

    from django_app.coordinator import coordinator

    await coordinator.start_task(task)          # async code
    coordinator.start_task_sync(task)           # views, shell, management commands
    coordinator.is_task_running("ExampleTask", task.pk)

Redis work runs on the process's one Redis loop (:mod:`django_app.bridge`), with one client
that is reused for the life of the process; ORM work stays in the caller's thread and transaction.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from django.apps import apps
from django.db import router
from django.utils import timezone
from redis.asyncio import Redis

from streamcoord.connection import RedisFactory
from streamcoord.eventlog import CANCELLED_BEFORE_START, EventLog, TaskWriter
from streamcoord.ids import EventId
from streamcoord.jobs import CancelOutcome, JobQueue, StartOutcome
from streamcoord.keys import TaskRef
from streamcoord.registry import register_models
from streamcoord.taskstate import State, TaskState

from . import access, conf
from .bridge import RedisLoop
from .commits import after_commit, in_transaction
from .models import Status, StreamTask

T = TypeVar("T")


def task_models() -> list[type[StreamTask]]:
    """Every concrete StreamTask model of the project."""
    return [m for m in apps.get_models() if issubclass(m, StreamTask)]


def find_model(name: str, app_label: str | None = None) -> type[StreamTask]:
    """A StreamTask model by name (``Model`` or ``app.Model``, any case)."""
    if app_label is None and "." in name:
        app_label, name = name.split(".", 1)
    matches = [
        m for m in task_models()
        if m._meta.object_name and m._meta.object_name.lower() == name.lower()
        and (app_label is None or m._meta.app_label == app_label)
    ]
    if len(matches) != 1:
        known = ", ".join(sorted(f"{m._meta.app_label}.{m._meta.object_name}" for m in task_models()))
        problem = "is ambiguous: name its app" if matches else "is not a StreamTask model"
        raise LookupError(f"{name!r} {problem} (known: {known})")
    return matches[0]


@dataclasses.dataclass
class _Parts:
    """The Redis side of the coordinator, on the Redis loop."""

    redis: Redis
    events: EventLog
    queue: JobQueue
    pid: int
    models_registered: bool = False


#: Connections the coordinator's client may hold: its calls are short, and sync callers in many
#: threads share it.
MAX_CONNECTIONS = 8


class TaskCoordinator:
    """Starts, finds, watches, cancels and retries StreamTasks through Redis."""

    def __init__(self) -> None:
        self._loop = RedisLoop()
        self._parts: _Parts | None = None

    # -- plumbing --------------------------------------------------------------------------

    async def _here(self) -> _Parts:
        """The client and its helpers (made on first use, on the Redis loop)."""
        parts = self._parts
        if parts is None or parts.pid != os.getpid():
            settings = conf.get_settings()
            client = RedisFactory(settings).client("django", max_connections=MAX_CONNECTIONS)
            events = EventLog(client, settings)
            parts = self._parts = _Parts(client, events, JobQueue(client, events.keys), os.getpid())
        if not parts.models_registered:
            await self._register(parts)
        return parts

    async def _register(self, parts: _Parts) -> None:
        pairs = [(m._meta.app_label, m._meta.object_name or m.__name__) for m in task_models()]
        await register_models(parts.redis, parts.events.keys, pairs)
        parts.models_registered = True

    async def _redis(self, work: Callable[[_Parts], Awaitable[T]]) -> T:
        """Await ``work`` on the Redis loop (from async code on any loop)."""
        return await self._loop.acall(lambda: self._with_parts(work))

    def _redis_sync(self, work: Callable[[_Parts], Awaitable[T]]) -> T:
        """Run ``work`` on the Redis loop and wait for it (from sync code)."""
        return self._loop.call(lambda: self._with_parts(work))

    async def _with_parts(self, work: Callable[[_Parts], Awaitable[T]]) -> T:
        return await work(await self._here())

    async def close(self) -> None:
        """Close the Redis client (a new one is made on next use)."""
        await self._loop.acall(self._close_here)

    def close_sync(self) -> None:
        """:meth:`close` for sync code."""
        self._loop.call(self._close_here)

    async def _close_here(self) -> None:
        parts, self._parts = self._parts, None
        if parts is not None and parts.pid == os.getpid():
            await parts.redis.aclose()

    async def register_models(self) -> None:
        """Tell the gateways which task models exist (done on first use in each process)."""

        async def register(parts: _Parts) -> None:
            await self._register(parts)

        await self._redis(register)

    # -- the API -----------------------------------------------------------------------------

    async def declare(self, task: StreamTask) -> bool:
        """Record a new task as pending in Redis (done for every new row when its transaction
        commits, by a post_save hook)."""
        ref = task.stream_ref
        return await self._redis(lambda p: p.events.declare(ref))

    def declare_sync(self, task: StreamTask) -> bool:
        """:meth:`declare` for sync code."""
        ref = task.stream_ref
        return self._redis_sync(lambda p: p.events.declare(ref))

    def stream_token(
        self, *tasks: StreamTask, start: bool = False, expires_in: float | None = None,
        subject: str | None = None,
    ) -> str:
        """A stream token for ``tasks`` (see :mod:`django_app.access`); no Redis involved, so
        it is safe from sync and async code alike."""
        return access.stream_token([t.stream_ref for t in tasks], start=start, expires_in=expires_in, subject=subject)

    async def start_task(self, task: StreamTask, *names: str) -> StartOutcome:
        """Queue ``task`` for a worker. Idempotent: a task already queued, running or ended is
        left alone, and the outcome says so (``bool(outcome)`` is True when this call queued it).

        The predecessor's forms ``start_task(task, 'Model')`` and ``start_task(task,
        'app_label', 'Model')`` still work; the names must match the task.
        """
        ref = _named(task, names)
        outcome = await self._redis(lambda p: p.queue.start(ref))
        if outcome.queued:
            await _rows(task).filter(status=Status.PENDING).aupdate(**_set(task, status=Status.QUEUED))
        return outcome

    def start_task_sync(self, task: StreamTask, *names: str) -> StartOutcome:
        """:meth:`start_task` for sync code (views, shell, management commands). Inside
        ``transaction.atomic`` the task is queued when the transaction commits (a worker could
        not see the row before), and not at all when it rolls back; the outcome then says
        ``deferred``."""
        ref = _named(task, names)
        if in_transaction(_db(task)):
            after_commit(lambda: self.start_task_sync(task), _db(task), f"start task {ref}")
            return StartOutcome(queued=False, state="", deferred=True)
        outcome = self._redis_sync(lambda p: p.queue.start(ref))
        if outcome.queued:
            _rows(task).filter(status=Status.PENDING).update(**_set(task, status=Status.QUEUED))
        return outcome

    async def retry_task(self, task: StreamTask) -> StartOutcome:
        """Run an ended task (completed, failed or cancelled) again, from a new stream: its
        clients get ``reset`` and then the new run's events. A task that has not ended is only
        started (when pending) or left alone."""
        ref = task.stream_ref
        renewed, before = await self._redis(lambda p: p.queue.renew_ended(ref))
        if _renews_row(task, renewed, before):
            await _rows(task).aupdate(**_renewed(task))
        return await self.start_task(task)

    def retry_task_sync(self, task: StreamTask) -> StartOutcome:
        """:meth:`retry_task` for sync code (inside a transaction, done when it commits)."""
        ref = task.stream_ref
        if in_transaction(_db(task)):
            after_commit(lambda: self.retry_task_sync(task), _db(task), f"retry task {ref}")
            return StartOutcome(queued=False, state="", deferred=True)
        renewed, before = self._redis_sync(lambda p: p.queue.renew_ended(ref))
        if _renews_row(task, renewed, before):
            _rows(task).update(**_renewed(task))
        return self.start_task_sync(task)

    async def get_task_instance(self, model_name: str, task_id: Any) -> StreamTask:
        """Load a task row by model name (``Model`` or ``app.Model``) and primary key."""
        return await find_model(model_name).objects.aget(pk=task_id)

    def is_task_running(self, model_name: str, task_id: Any) -> bool:
        """True while a worker, on any host, runs the task."""
        model = find_model(model_name)
        ref = TaskRef(model._meta.app_label, model._meta.object_name or model.__name__, str(task_id))
        record = self._redis_sync(lambda p: p.events.state(ref))
        return record is not None and record.state == State.RUNNING

    async def task_state(self, task: StreamTask) -> TaskState | None:
        """The task's state record in Redis (state, attempt, worker, last event), if any."""
        ref = task.stream_ref
        return await self._redis(lambda p: p.events.state(ref))

    def task_state_sync(self, task: StreamTask) -> TaskState | None:
        """:meth:`task_state` for sync code."""
        ref = task.stream_ref
        return self._redis_sync(lambda p: p.events.state(ref))

    def task_states_sync(self, tasks: Sequence[StreamTask]) -> list[TaskState | None]:
        """The state records of several tasks, in one round trip (an admin page's rows)."""
        refs = [t.stream_ref for t in tasks]
        return self._redis_sync(lambda p: p.events.states(refs))

    async def cancel_task(self, task: StreamTask) -> CancelOutcome:
        """Cancel the task wherever it is: a pending or queued one never starts; a running one
        is cancelled by its worker within a second. The outcome says what happened
        (``describe()``; ``bool`` is True when the task was cancelled or its worker told).

        A task left ``cancelling`` (a cancel cut off before its ``cancelled`` event) is ended
        by the next cancel, or by the worker that finds it so."""
        ref = task.stream_ref
        outcome = await self._redis(lambda p: _cancel(p, ref))
        if outcome.cancelled:
            await task.mark_failed(CANCELLED_BEFORE_START, status=Status.CANCELLED)
        return outcome

    def cancel_task_sync(self, task: StreamTask) -> CancelOutcome:
        """:meth:`cancel_task` for sync code (inside a transaction, done when it commits: a row
        created in it is not in Redis before, and a rolled-back one must not be cancelled)."""
        ref = task.stream_ref
        if in_transaction(_db(task)):
            after_commit(lambda: self.cancel_task_sync(task), _db(task), f"cancel task {ref}")
            return CancelOutcome("", deferred=True)
        outcome = self._redis_sync(lambda p: _cancel(p, ref))
        if outcome.cancelled:
            task.mark_failed_sync(CANCELLED_BEFORE_START, status=Status.CANCELLED)
        return outcome

    def forget_sync(self, task: StreamTask) -> str:
        """Remove a deleted row's keys from Redis (a running task is cancelled instead, and its
        keys expire once it has ended). Returns the task's state before."""
        ref = task.stream_ref
        return self._redis_sync(lambda p: p.queue.forget(ref))

    async def writer_for(self, task: StreamTask) -> _LoopWriter:
        """A writer of the task's events, for ``send_event`` outside a worker."""
        ref = task.stream_ref
        writer = await self._redis(lambda p: _writer(p, ref))
        return _LoopWriter(self._loop, writer)


class _LoopWriter:
    """A task writer that lives on the Redis loop, usable from any loop."""

    def __init__(self, loop: RedisLoop, writer: TaskWriter) -> None:
        self._loop = loop
        self._writer = writer

    async def append(self, event_type: str, data: dict[str, Any]) -> EventId:
        return await self._loop.acall(lambda: self._writer.append(event_type, data))


async def _writer(parts: _Parts, ref: TaskRef) -> TaskWriter:
    return parts.events.writer(ref)


async def _cancel(parts: _Parts, ref: TaskRef) -> CancelOutcome:
    before, worker = await parts.queue.request_cancel(ref)
    if before in (State.PENDING, State.QUEUED, State.CANCELLING):
        after = await parts.events.end_cancelled_before_start(ref)
        return CancelOutcome(after or before, cancelled=after == State.CANCELLED)
    return CancelOutcome(before, worker if before == State.RUNNING else "")


def _named(task: StreamTask, names: tuple[str, ...]) -> TaskRef:
    """The task's ref, after checking the predecessor's optional model names against it."""
    ref = task.stream_ref
    if len(names) > 2:
        raise TypeError("start_task(task[, app_label], model_name)")
    wrong_model = bool(names) and names[-1].lower() != ref.model.lower()
    wrong_app = len(names) == 2 and names[0] != ref.app_label
    if wrong_model or wrong_app:
        raise ValueError(f"start_task: {'.'.join(names)} does not name the model of {ref}")
    return ref


def _rows(task: StreamTask) -> Any:
    """The queryset of the task's own row."""
    return type(task)._default_manager.filter(pk=task.pk)


def _db(task: StreamTask) -> str:
    return router.db_for_write(type(task), instance=task)


def _set(task: StreamTask, **fields: Any) -> dict[str, Any]:
    """``fields`` and ``updated_at`` (an ``update()`` skips ``auto_now``: without it a task
    started long after it was created would look stuck to ``cleanup_old_tasks``), set on the
    instance too, so that a later ``save()`` does not write the old values back."""
    fields["updated_at"] = timezone.now()
    for name, value in fields.items():
        setattr(task, name, value)
    return fields


def _renews_row(task: StreamTask, renewed: bool, before: str) -> bool:
    """Whether a retry makes the row pending again: Redis renewed an ended task, or Redis no
    longer knows it (its keys expired) while the row says it ended."""
    return renewed or (not before and task.status in (Status.COMPLETED, Status.FAILED, Status.CANCELLED))


def _renewed(task: StreamTask) -> dict[str, Any]:
    """A retried row: pending again, its last run's end forgotten."""
    return _set(task, status=Status.PENDING, error="", completed_at=None, final_value=None)


coordinator = TaskCoordinator()
