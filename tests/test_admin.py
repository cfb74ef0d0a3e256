"""The Django admin of StreamTasks (``django_app.admin``).

The summary an action reports is checked here in-process; everything else on the example
project in subprocesses (its settings cannot share this process with the suite's minimal Django
set-up): a superuser logs in with Django's test client inside ``manage.py shell``, posts the
changelist's start / cancel / retry actions and the change page's buttons, and the test checks
the messages, the rows (SQLite) and the Redis state records, with a real worker running tasks.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import sqlite3
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import django
import httpx
import pytest
from django.conf import settings as django_settings
from playwright.async_api import Route, async_playwright, expect

from streamcoord.eventlog import EventLog
from streamcoord.keys import TaskRef
from streamcoord.taskstate import TaskState

from .processes import REPO, Project
from .test_demo_browser import CHROMIUM, CHROMIUM_ARGS, UI_TIMEOUT_MS

if not django_settings.configured:
    django_settings.configure(INSTALLED_APPS=["django_app"], DATABASES={})
    django.setup()

from django.contrib import messages  # Django is set up above

from django_app.admin import RowResult, TaskAction, apply_action, summarize

SECRET = "admin-test-secret-" + "x" * 40
TOKEN_SETTINGS = {"stream_auth": "token", "secret": SECRET}
CHANGELIST = "/admin/examples/progresstask/"

# -- the summary (unit tier) -------------------------------------------------------------------


class Said:
    """An outcome as the coordinator returns them: true or not, and its words."""

    def __init__(self, done: bool, text: str) -> None:
        self.done, self.text = done, text

    def __bool__(self) -> bool:
        return self.done

    def describe(self) -> str:
        return self.text


class Row:
    def __init__(self, pk: int) -> None:
        self.pk = pk


def test_the_summary_groups_rows_by_what_happened_in_order() -> None:
    results = [
        RowResult(1, True, "queued"), RowResult(2, False, "not started: the task is already running"),
        RowResult(3, True, "queued"), RowResult(4, True, "queued"),
    ]
    assert summarize("Start", results) == (
        "Start, 4 tasks: 3 queued (ids 1, 3, 4); 1 not started: the task is already running (id 2)",
        messages.WARNING,
    )
    assert summarize("Start", results[:1]) == ("Start, 1 task: 1 queued (id 1)", messages.SUCCESS)
    many = [RowResult(pk, True, "queued") for pk in range(1, 9)]
    assert summarize("Retry", many)[0] == "Retry, 8 tasks: 8 queued (ids 1, 2, 3, 4, 5 and 3 more)"


def test_one_row_that_fails_does_not_stop_the_others_and_makes_an_error() -> None:
    def call(task: Any) -> Said:
        if task.pk == 2:
            raise ConnectionError("Redis is gone")
        return Said(True, "cancellation sent to worker w-1")

    action = TaskAction("cancel", "Cancel", call, frozenset())
    results = apply_action(action, [Row(1), Row(2), Row(3)])  # type: ignore[list-item]
    assert [(r.pk, r.done, r.failed) for r in results] == [(1, True, False), (2, False, True), (3, True, False)]
    assert summarize("Cancel", results) == (
        "Cancel, 3 tasks: 2 cancellation sent to worker w-1 (ids 1, 3); 1 failed: Redis is gone (id 2)",
        messages.ERROR,
    )


# -- the admin on the example project (system tier) ----------------------------------------------

# Runs in ``manage.py shell``: logs a superuser in through the admin's login form, then makes the
# requests read from stdin (JSON), and prints one JSON line: each answer's status, final path,
# messages and page.
DRIVER = r"""
import html, json, re, sys
from django.contrib.auth import get_user_model
from django.test import Client

User = get_user_model()
if not User.objects.filter(username="admin").exists():
    User.objects.create_superuser("admin", "admin@example.com", "admin-password")
client = Client()
login = client.post("/admin/login/", {"username": "admin", "password": "admin-password", "next": "/admin/"})
assert login.status_code == 302 and login["Location"] == "/admin/", login.status_code
answers = []
for request in json.loads(sys.stdin.read()):
    send = client.post if request["method"] == "POST" else client.get
    response = send(request["path"], request.get("data", {}), follow=True)
    page = response.content.decode()
    listed = re.search(r'<ul class="messagelist">(.*?)</ul>', page, re.S)
    said = re.findall(r'<li class="(\w+)">(.*?)</li>', listed.group(1), re.S) if listed else []
    answers.append({
        "status": response.status_code,
        "path": response.request["PATH_INFO"],
        "messages": [[level, html.unescape(text.strip())] for level, text in said],
        "page": page,
    })
print(json.dumps(answers))
"""


def admin(project: Project, *requests: dict[str, Any], **settings: Any) -> list[dict[str, Any]]:
    """Make ``requests`` (``{"method", "path", "data"}``) as a logged-in superuser; following
    redirects, as a browser would."""
    out = project.manage("shell", "-v", "0", "-c", DRIVER, input=json.dumps(requests), **settings)
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def action(name: str, *pks: Any, path: str = CHANGELIST) -> dict[str, Any]:
    return {"method": "POST", "path": path, "data": {"action": name, "_selected_action": [str(pk) for pk in pks]}}


def add(path: str = CHANGELIST, **fields: Any) -> dict[str, Any]:
    """The add form of a task model, saved with ``fields`` (the others keep their defaults)."""
    defaults = {"steps": 10, "delay": 0.5, "fail_at": "", "payload_bytes": 0} if path == CHANGELIST else {}
    return {"method": "POST", "path": f"{path}add/", "data": {**defaults, **fields, "_save": "Save"}}


def rows(project: Project, table: str = "examples_progresstask") -> dict[str, tuple[str, str]]:
    """``pk: (status, error)`` of every row of ``table``."""
    with sqlite3.connect(project.db) as db:
        return {str(pk): (status, error) for pk, status, error in db.execute(f"SELECT id, status, error FROM {table}")}


def ref(pk: Any, model: str = "ProgressTask") -> TaskRef:
    return TaskRef("examples", model, str(pk))


async def state(event_log: EventLog, pk: Any, model: str = "ProgressTask") -> TaskState:
    record = await event_log.state(ref(pk, model))
    assert record is not None, f"no state record for {model} {pk}"
    return record


async def state_is(event_log: EventLog, pk: Any, wanted: str) -> bool:
    record = await event_log.state(ref(pk))
    return record is not None and record.state == wanted


async def until(check: Any, within: float, what: str) -> None:
    """Wait until ``await check()`` is true (every wait has its limit)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.system
def test_every_task_model_gets_the_admin_once(project: Project) -> None:
    code = (
        "from django.contrib import admin\n"
        "from django.contrib.admin import AdminSite\n"
        "from django_app.admin import StreamTaskAdmin, register_task_models\n"
        "from django_app.coordinator import task_models\n"
        "names = lambda models: sorted(m.__name__ for m in models)\n"
        "site = AdminSite(name='other')\n"
        "first, again = register_task_models(site=site), register_task_models(site=site)\n"
        "print(names(first) == names(task_models()), again,"
        " all(isinstance(site._registry[m], StreamTaskAdmin) for m in first),"
        " register_task_models(), type(admin.site._registry[task_models()[0]]).__name__)\n"
    )
    answer = project.manage("shell", "-v", "0", "-c", code).strip().splitlines()[-1]
    # The example project's admin.py registered them all (ContinueTask with its own subclass).
    assert answer.startswith("True [] True [] ")
    [index] = admin(project, {"method": "GET", "path": "/admin/"})
    for model in ("progresstask", "continuetask", "exporttask", "reporttask", "exampletask"):
        assert f'href="/admin/examples/{model}/"' in index["page"]


@pytest.mark.system
async def test_start_queues_the_pending_rows_and_says_why_not_for_the_others(
    project: Project, event_log: EventLog
) -> None:
    answers = await asyncio.to_thread(
        admin, project, add(steps=1), add(steps=1), add(steps=1),
        action("start_tasks", 3),  # no worker runs: it stays queued
        action("start_tasks", 1, 2, 3),
        {"method": "GET", "path": CHANGELIST, "data": {"q": "2"}},
    )
    assert [a["path"] for a in answers[:3]] == [CHANGELIST] * 3  # the add form saved each row
    assert answers[3]["messages"] == [["success", "Start, 1 task: 1 queued (id 3)"]]
    assert answers[4]["messages"] == [[
        "warning",
        "Start, 3 tasks: 2 queued (ids 1, 2); 1 not started: the task is already queued (id 3)",
    ]]
    for pk in (1, 2, 3):
        assert (await state(event_log, pk)).state == "queued"
    assert rows(project) == {"1": ("queued", ""), "2": ("queued", ""), "3": ("queued", "")}
    # The list shows the status; the search finds a row by its exact id.
    found = answers[5]["page"]
    assert re.search(r"1 result\s*\(<a[^>]*>3 total</a>\)", found), "search by id"
    assert 'class="field-status">Queued</td>' in found


@pytest.mark.system
async def test_cancel_ends_a_pending_task_at_once_and_a_running_one_through_its_worker(
    project: Project, event_log: EventLog
) -> None:
    project.worker()
    await asyncio.to_thread(admin, project, add(steps=400, delay=0.05), add(steps=1), action("start_tasks", 1))
    await until(lambda: state_is(event_log, 1, "running"), 20, "task 1 to run")  # for 20 s
    [answer] = await asyncio.to_thread(admin, project, action("cancel_tasks", 1, 2))
    [(level, text)] = answer["messages"]
    assert level == "success", text
    assert re.fullmatch(
        r"Cancel, 2 tasks: 1 cancellation sent to worker \S+ \(id 1\); 1 cancelled before it started \(id 2\)",
        text,
    ), text
    await until(lambda: state_is(event_log, 1, "cancelled"), 10, "the worker to cancel task 1")
    assert (await state(event_log, 2)).state == "cancelled"

    async def row_cancelled() -> bool:
        return rows(project)["1"][0] == "cancelled"

    await until(row_cancelled, 10, "the worker to record task 1 cancelled")
    assert rows(project)["2"][0] == "cancelled"
    # Nothing left to cancel: said so, as a warning.
    [again] = await asyncio.to_thread(admin, project, action("cancel_tasks", 1))
    assert again["messages"] == [["warning", "Cancel, 1 task: 1 nothing to cancel: the task is cancelled (id 1)"]]


@pytest.mark.system
async def test_retry_runs_ended_tasks_again_from_a_new_stream(project: Project, event_log: EventLog) -> None:
    project.worker()
    await asyncio.to_thread(
        admin, project,
        add(steps=2, delay=0),  # 1: completes
        add(steps=2, delay=0, fail_at=1),  # 2: fails
        add(steps=2, delay=0),  # 3: cancelled before it starts
        add(steps=400, delay=0.05),  # 4: still running when retried
        action("cancel_tasks", 3), action("start_tasks", 1, 2, 4),
    )
    await until(lambda: state_is(event_log, 1, "completed"), 20, "task 1 to complete")
    await until(lambda: state_is(event_log, 2, "failed"), 20, "task 2 to fail")
    await until(lambda: state_is(event_log, 4, "running"), 20, "task 4 to run")
    before = {pk: await state(event_log, pk) for pk in (1, 2, 3)}
    assert before[3].state == "cancelled"
    assert "ProgressTask failed at step 1" in rows(project)["2"][1]

    retried, _ = await asyncio.to_thread(admin, project, action("retry_tasks", 1, 2, 3, 4), action("cancel_tasks", 4))
    assert retried["messages"] == [[
        "warning",
        "Retry, 4 tasks: 3 queued (ids 1, 2, 3); 1 not started: the task is already running (id 4)",
    ]]
    await until(lambda: state_is(event_log, 1, "completed"), 20, "task 1 to complete again")
    await until(lambda: state_is(event_log, 2, "failed"), 20, "task 2 to fail again")
    await until(lambda: state_is(event_log, 3, "completed"), 20, "task 3 to run and complete")
    for pk in (1, 2, 3):
        after = await state(event_log, pk)
        assert after.epoch != before[pk].epoch, f"task {pk} reran on its old stream"

    async def rows_ended() -> bool:
        return [rows(project)[pk][0] for pk in "123"] == ["completed", "failed", "completed"]

    await until(rows_ended, 10, "the rows to record the new runs")
    assert rows(project)["3"][1] == ""  # the cancelled run's reason went with it


@pytest.mark.system
async def test_the_change_page_shows_the_run_its_buttons_and_a_stream_url_that_works(
    project: Project, event_log: EventLog, sse: Any
) -> None:
    gateway = project.gateway(**TOKEN_SETTINGS)
    project.worker(**TOKEN_SETTINGS)
    change = f"{CHANGELIST}1/change/"
    _, pending, started = await asyncio.to_thread(
        admin, project, add(steps=3, delay=0.05), {"method": "GET", "path": change},
        {"method": "POST", "path": f"{CHANGELIST}1/task/start/"}, **TOKEN_SETTINGS,
    )
    page = pending["page"]
    assert pending["status"] == 200
    assert '<script src="/static/streamcoord/streamcoord.js"></script>' in page
    assert "streamcoord.follow(" in page
    assert 'class="streamcoord-state">pending</td>' in page
    assert 'class="streamcoord-attempt">0 of 1</td>' in page
    assert f'action="{CHANGELIST}1/task/start/"' in page
    assert "/task/cancel/" in page and "/task/retry/" not in page  # what a pending row offers
    # The start button: back on the change page, with what happened.
    assert started["path"] == change and started["messages"] == [["success", "Start, 1 task: 1 queued (id 1)"]]

    url = urlsplit(html.unescape(re.search(r'data-stream-url="([^"]+)"', page).group(1)))  # type: ignore[union-attr]
    assert url.path == "/stream/examples/ProgressTask/1" and parse_qs(url.query)["token"]
    client = await sse(gateway.socket, f"{url.path}?{url.query}")
    assert client.status == 200
    events = await asyncio.wait_for(client.events_until_end(), 30)
    assert [e.event for e in events] == ["start", "progress", "progress", "progress", "complete"]

    await until(lambda: state_is(event_log, 1, "completed"), 20, "task 1 to complete")
    [ended] = await asyncio.to_thread(admin, project, {"method": "GET", "path": change}, **TOKEN_SETTINGS)
    assert 'class="streamcoord-state">completed</td>' in ended["page"]
    assert 'class="streamcoord-attempt">1 of 1</td>' in ended["page"]
    assert 'class="streamcoord-last-seq">5 (last: complete)</td>' in ended["page"]
    assert "/task/retry/" in ended["page"] and "/task/start/" not in ended["page"]


@pytest.mark.system
def test_without_a_secret_the_change_page_says_why_it_shows_no_events(project: Project) -> None:
    path = "/admin/examples/continuetask/"
    # Token mode with no secret: no stream URL can be made, and the page says so.
    _, page = admin(project, add(path=path), {"method": "GET", "path": f"{path}1/change/"}, stream_auth="token")
    assert page["status"] == 200
    assert "Live events cannot be shown here: cannot sign stream tokens: set STREAMCOORD_SECRET" in page["page"]
    assert "data-stream-url" not in page["page"] and "streamcoord.js" not in page["page"]
    # With one, the model's own event types are listened for too (its admin says which).
    [page] = admin(project, {"method": "GET", "path": f"{path}1/change/"}, **TOKEN_SETTINGS)
    assert '<script id="streamcoord-event-types" type="application/json">["started", "final"]</script>' in page["page"]


@pytest.mark.system
def test_a_task_with_a_uuid_key_is_found_and_started_by_its_id(project: Project) -> None:
    created = project.create_task("ExportTask", "steps=1")
    project.create_task("ExportTask", "steps=1")
    path = "/admin/examples/exporttask/"
    found, started = admin(
        project, {"method": "GET", "path": path, "data": {"q": created["id"]}},
        action("start_tasks", created["id"], path=path),
    )
    assert re.search(r"1 result\s*\(<a[^>]*>2 total</a>\)", found["page"])
    assert started["messages"] == [["success", f"Start, 1 task: 1 queued (id {created['id']})"]]


@pytest.mark.system
@pytest.mark.browser
async def test_the_change_page_lists_the_events_in_a_browser(project: Project, event_log: EventLog) -> None:
    """The page the admin rendered, in headless chromium: its stream requests go to a real
    gateway (through playwright's routing, so no port is needed), and it lists what arrives;
    a ``reset`` that starts the stream over clears the list."""
    gateway = project.gateway(**TOKEN_SETTINGS)
    project.worker(**TOKEN_SETTINGS)
    change = f"{CHANGELIST}1/change/"
    await asyncio.to_thread(admin, project, add(steps=3, delay=0), action("start_tasks", 1), **TOKEN_SETTINGS)
    await until(lambda: state_is(event_log, 1, "completed"), 20, "task 1 to complete")
    [rendered] = await asyncio.to_thread(admin, project, {"method": "GET", "path": change}, **TOKEN_SETTINGS)
    restarted = (
        'id: a-1\nevent: start\ndata: {"n": 1}\n\nevent: reset\ndata: {"reason": "epoch", "epoch": "b"}\n\n'
        'id: b-1\nevent: start\ndata: {"n": 2}\n\nid: b-2\nevent: complete\ndata: {"final_value": null}\n\n'
    )
    streams: list[str] = []
    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(gateway.socket)), base_url="http://gateway")

    async def serve(route: Route) -> None:
        url = urlsplit(route.request.url)
        if url.path == change:
            await route.fulfill(body=rendered["page"], content_type="text/html; charset=utf-8")
        elif url.path == "/static/streamcoord/streamcoord.js":
            await route.fulfill(path=REPO / "django_app/static/streamcoord/streamcoord.js")
        elif url.path.startswith("/stream/"):
            streams.append(f"{url.path}?{url.query}")
            if len(streams) > 1:  # the second visit: a stream that started over
                await route.fulfill(body=restarted, content_type="text/event-stream")
                return
            answer = await http.get(f"{url.path}?{url.query}", headers={"Accept": "text/event-stream"})
            await route.fulfill(status=answer.status_code, body=answer.content, content_type="text/event-stream")
        else:
            await route.fulfill(status=404)

    errors: list[str] = []
    async with http, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.route("**/*", serve)
            listed = page.locator("#streamcoord-event-list li")
            status = page.locator("#streamcoord-stream-status")

            await page.goto(f"http://admin.test{change}")
            await expect(status).to_have_text("the run ended: complete", timeout=UI_TIMEOUT_MS)
            await expect(listed).to_have_count(5)
            texts = await listed.all_inner_texts()
            assert [t.split()[1] for t in texts] == ["start", "progress", "progress", "progress", "complete"]
            assert '{"step":3,"total_steps":3}' in texts[3]  # the gateway's own keys left out
            assert [await item.get_attribute("value") for item in await listed.all()] == ["1", "2", "3", "4", "5"]

            await page.goto(f"http://admin.test{change}")
            await expect(status).to_have_text("the run ended: complete", timeout=UI_TIMEOUT_MS)
            assert [t.split()[0] for t in await listed.all_inner_texts()] == ["start", "complete"]
        finally:
            await browser.close()
    assert streams[0].startswith("/stream/examples/ProgressTask/1?token=")
    assert not errors, errors
