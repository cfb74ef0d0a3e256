"""Example tasks: the predecessor's ``ExampleTask`` and ``ContinueTask``, ``ProgressTask``, and
proxies of it that exercise the failure paths (re-runs, poison tasks, time limits, a task's own
timeouts)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

from django.db import models

from django_app.models import StreamTask
from streamcoord import TaskFailure


class ExampleTask(StreamTask):
    """The predecessor's example: three steps, two seconds apart."""

    message = models.CharField(max_length=255, default="Hello from ExampleTask")

    async def process(self) -> Any:
        await self.send_event("start", {"message": self.message, "total_steps": 3})
        for i in range(1, 4):
            await asyncio.sleep(2)
            await self.send_event(
                "progress", {"step": i, "total_steps": 3, "message": f"Step {i} of 3"}
            )
        await self.send_event("complete", {"message": "Task completed successfully"})
        return {"message": self.message, "steps": 3}


class ProgressTask(StreamTask):
    """A configurable task for demos, tests and benchmarks."""

    steps = models.PositiveIntegerField(default=10)
    delay = models.FloatField(default=0.5, help_text="seconds per step")
    fail_at = models.PositiveIntegerField(null=True, blank=True, help_text="step at which it raises")
    payload_bytes = models.PositiveIntegerField(default=0, help_text="padding added to each event")

    async def process(self) -> Any:
        pad = {"padding": "x" * self.payload_bytes} if self.payload_bytes else {}
        await self.send_event("start", {"total_steps": self.steps, **pad})
        for step in range(1, self.steps + 1):
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_at is not None and step == self.fail_at:
                # TaskFailure: a failure whose text is for the task's watchers (the demo shows it).
                raise TaskFailure(f"ProgressTask failed at step {step} as asked (fail_at={step})")
            await self.send_event("progress", {"step": step, "total_steps": self.steps, **pad})
        return {"steps": self.steps}


class RetryingProgressTask(ProgressTask):
    """A ``ProgressTask`` that gets three runs: when its worker is lost, another re-runs it."""

    max_attempts = 3

    class Meta:
        proxy = True


class PoisonTask(ProgressTask):
    """A task that kills its own worker (SIGKILL) after ``start``, on every one of its three
    runs: after the third it must end with one ``error`` and land in the dead letters."""

    max_attempts = 3

    class Meta:
        proxy = True

    async def process(self) -> Any:
        await self.send_event("start", {"message": "killing my worker", "pid": os.getpid()})
        os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(3600)  # not reached: SIGKILL ends the process
        return None


class SlowTask(ProgressTask):
    """A task that outlives its one-second time limit (it would sleep for 30 s)."""

    time_limit = 1

    class Meta:
        proxy = True

    async def process(self) -> Any:
        await self.send_event("start", {"message": "sleeping for 30 s", "time_limit": self.time_limit})
        await asyncio.sleep(30)
        return {"slept": 30}


class UpstreamTimeoutTask(ProgressTask):
    """A task whose call to a slow upstream service times out: it raises its own
    ``TimeoutError("upstream timed out")`` long before its own time limit, and must end with
    that message, not with "exceeded its time limit"."""

    time_limit = 60

    class Meta:
        proxy = True

    async def process(self) -> Any:
        await self.send_event("start", {"message": "calling a slow upstream service"})
        try:
            async with asyncio.timeout(0.05):  # the upstream call's own timeout
                await asyncio.sleep(30)
        except TimeoutError:
            raise TimeoutError("upstream timed out") from None
        return {"called": True}


class ContinueTask(StreamTask):
    """The predecessor's test model: waits until someone else sets ``continue_field``."""

    continue_field = models.BooleanField(default=False)

    #: How often the database is checked for the flag, in seconds.
    poll_interval = 0.1

    async def process(self) -> Any:
        await self.send_event("started", {"message": "Waiting for continue_field", "continue": False})
        flagged = type(self).objects.filter(pk=self.pk, continue_field=True)
        # Another process sets the flag in the database, which cannot notify us: poll.
        while not await flagged.aexists():  # noqa: ASYNC110
            await asyncio.sleep(self.poll_interval)
        await self.send_event("final", {"message": "continue_field is set", "continue": True})
        await self.send_event("complete", {"message": "Task completed successfully"})
        return {"continued": True}


class ExportTask(StreamTask):
    """A task with a UUID primary key (ids nobody can guess or count): a few steps of an export."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    steps = models.PositiveIntegerField(default=5)
    delay = models.FloatField(default=0.2, help_text="seconds per step")

    async def process(self) -> Any:
        for step in range(1, self.steps + 1):
            await asyncio.sleep(self.delay)
            await self.send_event("progress", {"step": step, "total_steps": self.steps})
        return {"exported": self.steps}


class ReportTask(StreamTask):
    """A task with a string primary key chosen by the application (1-64 letters, digits, '-'
    or '_': the characters a task id may have)."""

    slug = models.SlugField(primary_key=True, max_length=64)
    steps = models.PositiveIntegerField(default=3)

    async def process(self) -> Any:
        for step in range(1, self.steps + 1):
            await self.send_event("progress", {"step": step, "report": self.slug})
        return {"report": self.slug}
