"""The worker's parts in this process, on the real Redis, with the task table played by a fake.

The worker and the coordinator import the Django models, so Django is set up here first (no
database: nothing here reaches one): import ``Worker``, ``Executor``, ``Recovery``, ``Run``,
``StopReason``, ``outcomes``, and the coordinator's ``TaskCoordinator`` and ``conf``, from this
module. :class:`Rows` stands in for the rows behind ``django_app.worker.outcomes``: the tasks
``process()`` runs, and every outcome recorded on them, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import django
import pytest
from django.conf import settings as django_settings
from django.core.exceptions import ObjectDoesNotExist

from streamcoord.eventlog import TaskWriter
from streamcoord.ids import EventId
from streamcoord.keys import TaskRef

if not django_settings.configured:
    django_settings.configure(INSTALLED_APPS=["django_app"], DATABASES={})
    django.setup()

# Set up above: the worker imports the Django models.
from django_app import conf
from django_app.coordinator import TaskCoordinator
from django_app.worker import outcomes
from django_app.worker.execution import Executor, Run, StopReason
from django_app.worker.outcomes import Outcome
from django_app.worker.recovery import Recovery
from django_app.worker.runner import Worker

__all__ = [
    "Executor", "FakeTask", "Outcome", "Recovery", "Rows", "Run", "StopReason", "TaskCoordinator", "Worker",
    "conf", "outcomes", "settle",
]

Body = Callable[["FakeTask"], Awaitable[Any]]


@dataclasses.dataclass(eq=False)
class FakeTask:
    """A task row: ``body`` is its ``process()``."""

    ref: TaskRef
    body: Body
    time_limit: float | None = None
    _stream_writer: TaskWriter | None = None
    #: How many times ``process()`` was called.
    runs: int = 0

    @property
    def pk(self) -> str:
        return self.ref.pk

    async def process(self) -> Any:
        self.runs += 1
        return await self.body(self)

    async def send_event(self, event_type: str, data: dict[str, Any]) -> EventId:
        assert self._stream_writer is not None
        return await self._stream_writer.append(event_type, data)


class Rows:
    """The task table as ``django_app.worker.outcomes`` reads and writes it, installed over it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tasks: dict[str, FakeTask] = {}
        #: Outcomes recorded, per task label, in order.
        self.recorded: dict[str, list[Outcome]] = {}
        #: What a row says when recovery asks (an end Redis lost), per label.
        self.ended: dict[str, Outcome] = {}
        self.max_attempts = 1
        #: Awaited before each outcome is recorded: a slow database.
        self.before_record: Callable[[], Awaitable[None]] | None = None
        for name in ("load_task", "record_running", "record", "record_by_ref", "recorded_outcome", "max_attempts"):
            monkeypatch.setattr(outcomes, name, getattr(self, f"_{name}"))

    def add(self, ref: TaskRef, body: Body, **fields: Any) -> FakeTask:
        task = self.tasks[ref.label] = FakeTask(ref, body, **fields)
        return task

    def outcomes_of(self, ref: TaskRef) -> list[tuple[str, str]]:
        """``(status, row error)`` of each outcome recorded for the task."""
        return [(str(o.status), o.row_error) for o in self.recorded.get(ref.label, [])]

    async def _load_task(self, ref: TaskRef) -> FakeTask:
        if ref.label not in self.tasks:
            raise ObjectDoesNotExist(f"no row {ref}")
        return self.tasks[ref.label]

    async def _record_running(self, task: FakeTask) -> None:
        pass

    async def _record(self, task: FakeTask, outcome: Outcome) -> None:
        await self._record_by_ref(task.ref, outcome)

    async def _record_by_ref(self, ref: TaskRef, outcome: Outcome) -> None:
        if self.before_record is not None:
            await self.before_record()
        self.recorded.setdefault(ref.label, []).append(outcome)

    async def _recorded_outcome(self, ref: TaskRef, expose: bool = False) -> Outcome | None:
        return self.ended.get(ref.label)

    def _max_attempts(self, ref: TaskRef) -> int:
        return self.max_attempts


async def settle(task: asyncio.Task[Any] | None, within: float = 5) -> None:
    """Await a run's ``task``, failing the test if it takes longer than ``within``."""
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), within)
