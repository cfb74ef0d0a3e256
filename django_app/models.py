"""``StreamTask``: subclass it, write ``async process()``, and send events from it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

from django.db import models
from django.utils import timezone

from streamcoord.client import task_path
from streamcoord.ids import EventId
from streamcoord.keys import TaskRef

from . import access


class EventWriter(Protocol):
    """What ``send_event`` writes through: a worker's :class:`~streamcoord.eventlog.TaskWriter`, or outside a worker
    the coordinator's writer on its Redis loop."""

    async def append(self, event_type: str, data: dict[str, Any]) -> EventId: ...


#: Makes the writer for ``send_event`` outside a worker. The coordinator installs it when the
#: app is ready (this module never imports the coordinator: the coordinator imports it).
WriterFactory = Callable[["StreamTask"], Awaitable[EventWriter]]


class Status(models.TextChoices):
    """A row's status: the names of :class:`streamcoord.taskstate.State`, all but the Redis-only
    ``cancelling`` (a row goes from pending or queued straight to cancelled). Spelled out for
    Django's migrations and type checkers; ``tests/test_django_side.py`` checks they agree."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StreamTask(models.Model):
    """A long-running task whose events stream to clients through Redis.

    A worker process loads the row, awaits :meth:`process`, and records the outcome. Each
    :meth:`send_event` becomes one event of the task's Redis Stream, numbered without gaps.
    """

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    final_value = models.JSONField(null=True, blank=True)
    #: Where the task is in its life; ``failed`` and ``cancelled`` are never mistaken for pending.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    #: Why a failed run failed (``ExceptionType: message``); the traceback is in the worker's log.
    error = models.TextField(blank=True, default="")

    class Meta:
        abstract = True

    #: Runs a task may get: when its worker is lost (killed, out of memory, host gone) and
    #: attempts remain, another worker runs it again, and its stream goes on with an
    #: ``attempt`` event; otherwise the run ends with ``error`` (``WorkerLost``).
    max_attempts: int = 1
    #: Seconds one run may take; past it the run is cancelled and ends with ``error``
    #: (``TimeoutError``). None: no limit.
    time_limit: float | None = None

    _stream_writer: EventWriter | None = None
    #: Set by the coordinator at app start (see :data:`WriterFactory`).
    writer_factory: ClassVar[WriterFactory | None] = None

    async def process(self) -> Any:
        """Do the work, sending events as it goes. The return value becomes ``final_value``."""
        raise NotImplementedError(f"{type(self).__name__} must implement async process()")

    async def send_event(self, event_type: str, data: dict[str, Any]) -> EventId:
        """Send one event to every client of this task (now and later), and return its id.
        ``complete``, ``error`` and ``cancelled`` end the run."""
        if self._stream_writer is None:
            if StreamTask.writer_factory is None:
                raise RuntimeError("streamcoord's app is not ready: add 'django_app' to INSTALLED_APPS")
            self._stream_writer = await StreamTask.writer_factory(self)
        return await self._stream_writer.append(event_type, data)

    async def mark_completed(self, final_value: Any = None) -> None:
        """Record success on the row (only these fields, so concurrent edits survive)."""
        now = timezone.now()
        await type(self).objects.filter(pk=self.pk).aupdate(
            completed_at=now, final_value=final_value, status=Status.COMPLETED, updated_at=now
        )
        self.completed_at, self.final_value, self.status = now, final_value, Status.COMPLETED

    async def mark_failed(self, error: str, status: str = Status.FAILED) -> None:
        """Record a failed (or cancelled) run on the row."""
        await type(self)._default_manager.filter(pk=self.pk).aupdate(**self._failed(error, status))

    def mark_failed_sync(self, error: str, status: str = Status.FAILED) -> None:
        """:meth:`mark_failed` for sync code."""
        type(self)._default_manager.filter(pk=self.pk).update(**self._failed(error, status))

    def _failed(self, error: str, status: str) -> dict[str, Any]:
        """The fields of a failed run, set on this instance too."""
        self.status, self.error = status, error
        return {"status": status, "error": error, "updated_at": timezone.now()}

    @property
    def stream_ref(self) -> TaskRef:
        return TaskRef(self._meta.app_label, self._meta.object_name or type(self).__name__, str(self.pk))

    @property
    def stream_path(self) -> str:
        """The gateway URL path of this task's events."""
        ref = self.stream_ref
        return task_path(ref.model, ref.pk, ref.app_label)

    def stream_url(self, start: bool = False, expires_in: float | None = None) -> str:
        """The URL to watch this task with: its stream path and a stream token (absolute under
        ``STREAMCOORD_GATEWAY_URL``). Give it only to whoever may watch the task; ``start``
        also lets it start the task (lazy start), ``expires_in`` overrides the lifetime."""
        return access.stream_url(self.stream_ref, start=start, expires_in=expires_in)
