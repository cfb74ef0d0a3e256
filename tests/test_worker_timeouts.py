"""Only a task's own time limit is reported as "exceeded its time limit", by a real worker.

``UpstreamTimeoutTask`` (time limit 60 s) raises its own ``TimeoutError("upstream timed out")``
after an inner ``asyncio.timeout`` of its own expires: its run ends with that message, as any
other exception would. ``SlowTask`` (time limit 1 s) outlives its limit: its run ends with the
limit's message. Both are TimeoutErrors, both end with one ``error``, recorded failed.
"""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from streamcoord.keys import TaskRef

from .processes import Project
from .workloads import create_tasks, row, state, stream, stream_problems, until

pytestmark = pytest.mark.system


async def ended(redis: Redis, *refs: TaskRef) -> bool:
    return all([(await state(redis, ref)).get("state") == "failed" for ref in refs])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("expose", [False, True], ids=["private text", "expose_errors"])
async def test_a_tasks_own_timeout_is_not_reported_as_its_time_limit(
    project: Project, redis: Redis, expose: bool
) -> None:
    """Also: the text of a task's own exception reaches its watchers only with
    ``STREAMCOORD_EXPOSE_ERRORS``; the row and the log keep it either way."""
    worker = project.worker("w", concurrency=4, expose_errors="true" if expose else "false")
    [upstream] = create_tasks(project, "UpstreamTimeoutTask", 1)
    [slow] = create_tasks(project, "SlowTask", 1)
    await until(lambda: ended(redis, upstream, slow), 30, "both tasks to fail")
    await until(lambda: all(row(project, ref)[0] == "failed" for ref in (upstream, slow)), 15, "the rows")

    errors: dict[TaskRef, dict[str, object]] = {}
    for ref in (upstream, slow):
        events = await stream(redis, ref)
        assert [e.type for e in events] == [b"start", b"error"], events
        assert stream_problems(events) == []
        data = json.loads(events[-1].data)
        errors[ref] = {k: v for k, v in data.items() if not k.startswith("_")}  # no _app, _timestamp

    public = "upstream timed out" if expose else "the task failed"
    assert errors[upstream] == {"message": public, "error_type": "TimeoutError"}
    assert row(project, upstream) == ("failed", "TimeoutError: upstream timed out")
    assert errors[slow] == {"message": "exceeded its time limit of 1s", "error_type": "TimeoutError"}
    assert row(project, slow) == ("failed", "TimeoutError: exceeded its time limit of 1s")

    # The task's own failure is logged with its traceback; the limit is one line.
    log = worker.log_text()
    assert f"task {upstream} failed" in log and "TimeoutError: upstream timed out" in log, log
    assert f"task {slow} exceeded its time limit of 1s" in log, log
