"""The ``coordinator``: start, find, watch and cancel tasks from Django code.

``start_task`` never runs anything in the calling process: it queues the task in Redis, and one
worker (``manage.py runworker``, on any host) runs it. Every method works from any process.

    from django_app.coordinator import coordinator

    await coordinator.start_task(task)          # async code
    coordinator.start_task_sync(task)           # views, shell, management commands
    coordinator.is_task_running("ExampleTask", task.pk)
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from django.apps import apps
from redis.asyncio import Redis

from streamcoord.connection import RedisFactory, sync_client
from streamcoord.eventlog import CANCELLED_BEFORE_START, EventLog, TaskWriter
from streamcoord.jobs import JobQueue, StartOutcome
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.registry import register_models
from streamcoord.taskstate import Field, State

from . import access, conf
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
class _Runtime:
    """The Redis side of the coordinator, for one event loop."""

    redis: Redis
    events: EventLog
    queue: JobQueue
    models_registered: bool = False


class TaskCoordinator:
    """Starts, finds, watches and cancels StreamTasks through Redis."""

    def __init__(self) -> None:
        self._runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Runtime] = (
            weakref.WeakKeyDictionary()
        )
        self._sync_redis: Any = None  # redis.Redis, or a cluster's or Sentinel master's client

    # -- plumbing --------------------------------------------------------------------------

    async def _runtime(self) -> _Runtime:
        loop = asyncio.get_running_loop()
        runtime = self._runtimes.get(loop)
        if runtime is None:
            settings = conf.get_settings()
            client = RedisFactory(settings).client("django", max_connections=4)
            events = EventLog(client, settings)
            runtime = self._runtimes[loop] = _Runtime(client, events, JobQueue(client, events.keys))
        if not runtime.models_registered:
            await self.register_models(runtime)
        return runtime

    async def close(self) -> None:
        """Close this event loop's Redis client (it is made again on next use)."""
        runtime = self._runtimes.pop(asyncio.get_running_loop(), None)
        if runtime is not None:
            await runtime.redis.aclose()

    async def register_models(self, runtime: _Runtime | None = None) -> None:
        """Tell the gateways which task models exist (done on first use in each process)."""
        runtime = runtime or await self._runtime()
        pairs = [(m._meta.app_label, m._meta.object_name or m.__name__) for m in task_models()]
        await register_models(runtime.redis, runtime.events.keys, pairs)
        runtime.models_registered = True

    def _run_sync(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("in async code, await the coordinator's async method instead")

        async def run_and_close() -> T:
            try:
                return await call()
            finally:  # this loop ends here: so does its Redis client
                runtime = self._runtimes.pop(asyncio.get_running_loop(), None)
                if runtime is not None:
                    await runtime.redis.aclose()

        return asyncio.run(run_and_close())

    # -- the API -----------------------------------------------------------------------------

    async def declare(self, task: StreamTask) -> bool:
        """Record a new task as pending in Redis (done for every new row by a post_save hook)."""
        runtime = await self._runtime()
        return await runtime.events.declare(task.stream_ref)

    def declare_sync(self, task: StreamTask) -> bool:
        """:meth:`declare` for sync code."""
        return self._run_sync(lambda: self.declare(task))

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
        ref = task.stream_ref
        if len(names) > 2:
            raise TypeError("start_task(task[, app_label], model_name)")
        wrong_model = bool(names) and names[-1].lower() != ref.model.lower()
        wrong_app = len(names) == 2 and names[0] != ref.app_label
        if wrong_model or wrong_app:
            raise ValueError(f"start_task: {'.'.join(names)} does not name the model of {ref}")
        runtime = await self._runtime()
        outcome = await runtime.queue.start(ref)
        if outcome.queued:
            await type(task).objects.filter(pk=task.pk, status=Status.PENDING).aupdate(status=Status.QUEUED)
        return outcome

    def start_task_sync(self, task: StreamTask, *names: str) -> StartOutcome:
        """:meth:`start_task` for sync code (views, shell, management commands)."""
        return self._run_sync(lambda: self.start_task(task, *names))

    async def get_task_instance(self, model_name: str, task_id: Any) -> StreamTask:
        """Load a task row by model name (``Model`` or ``app.Model``) and primary key."""
        return await find_model(model_name).objects.aget(pk=task_id)

    def is_task_running(self, model_name: str, task_id: Any) -> bool:
        """True while a worker, on any host, runs the task."""
        model = find_model(model_name)
        ref = TaskRef(model._meta.app_label, model._meta.object_name or model.__name__, str(task_id))
        if self._sync_redis is None:
            self._sync_redis = sync_client(conf.get_settings(), "django")
        state_key = KeySpace(conf.get_settings().key_prefix).state(ref)
        return self._sync_redis.hget(state_key, Field.STATE) == State.RUNNING.encode()

    async def cancel_task(self, task: StreamTask) -> str:
        """Cancel the task wherever it is: a pending or queued one never starts; a running one
        is cancelled by its worker within a second. Returns what happened, in words.

        A task left ``cancelling`` (a cancel cut off before its ``cancelled`` event) is ended
        by the next cancel, or by the worker that finds it so."""
        runtime = await self._runtime()
        ref = task.stream_ref
        before, worker = await runtime.queue.request_cancel(ref)
        if before in (State.PENDING, State.QUEUED, State.CANCELLING):
            after = await runtime.events.end_cancelled_before_start(ref)
            if after != State.CANCELLED:
                return f"nothing to cancel: the task is {after or 'unknown to Redis'}"
            await task.mark_failed(CANCELLED_BEFORE_START, status=Status.CANCELLED)
            return CANCELLED_BEFORE_START
        if before == State.RUNNING:
            return f"cancellation sent to worker {worker}"
        return f"nothing to cancel: the task is {before or 'unknown to Redis'}"

    def cancel_task_sync(self, task: StreamTask) -> str:
        """:meth:`cancel_task` for sync code."""
        return self._run_sync(lambda: self.cancel_task(task))

    async def writer_for(self, task: StreamTask) -> TaskWriter:
        """A writer of the task's events, for ``send_event`` outside a worker."""
        return (await self._runtime()).events.writer(task.stream_ref)


coordinator = TaskCoordinator()
