"""The fixtures of the Django-side tests work: a migrated project, a gateway, a worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .processes import Project

pytestmark = pytest.mark.system


async def test_a_task_created_and_started_by_a_command_runs_on_a_worker(sse: Any, project: Project) -> None:
    gateway = project.gateway()
    project.worker()
    created = project.create_task("ProgressTask", "steps=3", "delay=0.05", start=True)
    assert created["started"] is True and created["stream"] == f"/stream/examples/ProgressTask/{created['id']}"
    client = await sse(gateway.socket, created["stream"])
    events = await asyncio.wait_for(client.events_until_end(), 20)
    assert [e.event for e in events] == ["start", "progress", "progress", "progress", "complete"]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
