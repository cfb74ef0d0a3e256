"""The coordinator from every kind of Django code: threads, fresh event loops, transactions.

Each scenario runs in a ``manage.py shell`` process of the example project on the real Redis,
and reports what it saw as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from typing import Any

import pytest
from redis.asyncio import Redis

from streamcoord.client import stream_task
from streamcoord.keys import KeySpace, TaskRef

from .processes import Project, wait_for
from .workloads import shell, state, stream

pytestmark = pytest.mark.system

KEYS = KeySpace("sc")

#: Shared by the scenarios: a blocking client on the same Redis, to look from inside.
PRELUDE = """
import asyncio, json, os, threading
import redis
from django.db import transaction
from django_app import conf
from django_app.coordinator import MAX_CONNECTIONS, coordinator
from django_app.examples.models import ExportTask, ProgressTask, ReportTask
from streamcoord.connection import sync_client

look = sync_client(conf.get_settings(), "look")
def record(task):
    return {k.decode(): v.decode() for k, v in look.hgetall(f"sc:{{{task.stream_ref.label}}}:state").items()}
def ours():
    return sum(1 for c in look.client_list() if c.get("name") == f"streamcoord:django:{os.getpid()}")
"""


def scenario(project: Project, code: str) -> dict[str, Any]:
    return json.loads(shell(project, PRELUDE + textwrap.dedent(code)))  # type: ignore[no-any-return]


def test_one_connection_for_calls_from_many_threads_and_loops(project: Project) -> None:
    seen = scenario(project, """
        def sync_starts():
            for _ in range(5):
                coordinator.start_task_sync(ProgressTask.objects.create(steps=1, delay=0))
        threads = [threading.Thread(target=sync_starts) for _ in range(8)]
        [t.start() for t in threads]; [t.join(30) for t in threads]
        after_threads = ours()
        async def async_start():  # what WSGI does for an async view: a new loop each time
            task = await ProgressTask.objects.acreate(steps=1, delay=0)
            return (await coordinator.start_task(task)).queued
        started = [asyncio.run(async_start()) for _ in range(20)]
        print(json.dumps({"after_threads": after_threads, "after_loops": ours(), "started": started, "bound": MAX_CONNECTIONS,
                          "queued": ProgressTask.objects.filter(status="queued").count()}))
    """)
    # Bounded by the pool (calls at once each hold one connection), not one per thread or loop.
    assert 1 <= seen["after_threads"] <= seen["bound"] and seen["after_loops"] == seen["after_threads"], seen
    assert all(seen["started"]) and seen["queued"] == 60, seen


def test_redis_hears_of_a_row_only_when_its_transaction_commits(project: Project) -> None:
    seen = scenario(project, """
        try:
            with transaction.atomic():
                lost = ExportTask.objects.create()  # a UUID: no later row takes its pk
                lost_start = coordinator.start_task_sync(lost)
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        with transaction.atomic():
            kept = ProgressTask.objects.create(steps=1)
            outcome = coordinator.start_task_sync(kept)
            inside = record(kept)
            try:
                with transaction.atomic():  # a savepoint, rolled back in a block that commits
                    inner = ExportTask.objects.create()
                    coordinator.start_task_sync(inner)
                    raise RuntimeError("roll back the savepoint")
            except RuntimeError:
                pass
            cancelled = ExportTask.objects.create()
            cancel = coordinator.cancel_task_sync(cancelled)
        print(json.dumps({
            "lost_start": lost_start.describe(), "lost": record(lost),
            "outcome": outcome.describe(), "deferred": outcome.deferred, "inside": inside,
            "after": record(kept), "row": ProgressTask.objects.get(pk=kept.pk).status,
            "inner": record(inner), "cancel": cancel.describe(), "cancelled": record(cancelled),
            "cancelled_row": ExportTask.objects.get(pk=cancelled.pk).status,
        }))
    """)
    assert seen["lost_start"] == "queued when the transaction commits"
    assert seen["lost"] == {}, "a rolled-back row reached Redis"
    assert seen["deferred"] and seen["inside"] == {}, seen
    assert seen["after"]["state"] == "queued" and seen["row"] == "queued", seen
    assert seen["inner"] == {}, "a row of a rolled-back savepoint reached Redis"
    assert seen["cancel"] == "cancelled when the transaction commits"
    assert seen["cancelled"]["state"] == "cancelled" and seen["cancelled_row"] == "cancelled", seen


def test_other_models_keep_fast_deletes(project: Project) -> None:
    """The row hooks are connected per task model: a project's other models keep Django's
    fast delete (one DELETE, no rows loaded, no signals)."""
    seen = scenario(project, """
        from django.contrib.sessions.models import Session
        from django.db.models.deletion import Collector
        print(json.dumps({"session": Collector("default").can_fast_delete(Session.objects.all()),
                          "task": Collector("default").can_fast_delete(ExportTask.objects.all())}))
    """)
    assert seen == {"session": True, "task": False}


async def test_deleting_a_running_task_cancels_it(project: Project, redis: Redis) -> None:
    project.worker()
    task = project.create_task("ContinueTask", start=True)
    ref = TaskRef("examples", "ContinueTask", str(task["id"]))
    wait_for(lambda: shell(project, f"from django_app.coordinator import coordinator; print(coordinator.is_task_running('ContinueTask', {task['id']}))") == "True", 30, "the task to run")
    shell(project, f"from django_app.examples.models import ContinueTask; ContinueTask.objects.filter(pk={task['id']}).delete()")

    async def ended() -> bool:
        return (await state(redis, ref)).get("state") == "cancelled"

    deadline = asyncio.get_running_loop().time() + 30
    while not await ended():
        assert asyncio.get_running_loop().time() < deadline, await state(redis, ref)
        await asyncio.sleep(0.1)
    assert [e.type for e in await stream(redis, ref)][-1] == b"cancelled"


async def test_deleting_a_row_removes_its_keys(project: Project, redis: Redis) -> None:
    seen = scenario(project, """
        pending = ExportTask.objects.create()
        queued = ReportTask.objects.create(slug="q3-report")
        coordinator.start_task_sync(queued)
        before = [record(pending)["state"], record(queued)["state"]]
        copies = [ExportTask(pk=pending.pk), ReportTask(pk=queued.pk)]  # delete() clears the pk
        pending.delete()
        with transaction.atomic():
            queued.delete()
            inside = record(copies[1]).get("state", "")
        print(json.dumps({"before": before, "inside": inside, "after": [record(c) for c in copies],
                          "uuid": str(copies[0].pk)}))
    """)
    assert seen["before"] == ["pending", "queued"] and seen["inside"] == "queued", seen
    assert seen["after"] == [{}, {}], seen
    assert not await redis.exists(KEYS.events(TaskRef("examples", "ExportTask", seen["uuid"])))


async def test_retry_runs_an_ended_task_again_from_a_new_stream(project: Project, redis: Redis) -> None:
    project.worker()
    task = project.create_task("ProgressTask", "steps=3", "delay=0", "fail_at=2", start=True)
    ref = TaskRef("examples", "ProgressTask", str(task["id"]))
    wait_for(lambda: shell(project, f"from django_app.examples.models import ProgressTask as P; print(P.objects.get(pk={task['id']}).status)") == "failed", 30, "the first run to fail")
    first = await stream(redis, ref)
    assert first[-1].type == b"error"
    shell(project, f"from django_app.examples.models import ProgressTask as P; P.objects.filter(pk={task['id']}).update(fail_at=None)")

    said = project.manage("retry_task", "ProgressTask", str(task["id"])).strip()
    assert said == "queued"
    wait_for(lambda: shell(project, f"from django_app.examples.models import ProgressTask as P; t = P.objects.get(pk={task['id']}); print(t.status, repr(t.error))") == "completed ''", 30, "the retry to complete")
    second = await stream(redis, ref)
    assert [e.type for e in second] == [b"start", b"progress", b"progress", b"progress", b"complete"]
    assert second[0].epoch != first[0].epoch, "the retried run starts a stream with another epoch"
    assert (await state(redis, ref))["state"] == "completed"


SECRET = "entry-points-secret-0123456789abcdef0123"


@pytest.mark.parametrize(("model", "fields", "pk"), [
    ("ProgressTask", ["steps=2", "delay=0"], int),
    ("ExportTask", ["steps=2", "delay=0"], str),
    ("ReportTask", ["slug=q3-report_2026", "steps=2"], str),
], ids=["integer", "uuid", "string"])
async def test_every_primary_key_type_end_to_end(project: Project, model: str, fields: list[str], pk: type) -> None:
    """create_task, a worker, a stream token and a gateway, for integer, UUID and string keys."""
    auth = {"stream_auth": "token", "secret": SECRET}
    gateway = project.gateway(**auth)
    project.worker(**auth)
    created = project.create_task(model, *fields, start=True, **auth)
    assert isinstance(created["id"], pk) and created["started"], created
    path, _, query = created["stream_url"].partition("?")
    assert path == created["stream"] == f"/stream/examples/{model}/{created['id']}"
    token = query.removeprefix("token=")
    received = [e async for e in stream_task("http://gw", model, created["id"], app_label="examples",
                                             token=token, uds=str(gateway.socket))]
    assert [e.event for e in received][-1] == "complete", received
    assert {e.data["_task_id"] for e in received} == {created["id"]}
    said = project.manage("cancel_task", model, str(created["id"]), **auth).strip()
    assert said == "nothing to cancel: the task is completed"
