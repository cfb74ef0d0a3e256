"""The dashboard on a gateway's admin listener, in headless Chromium, on a real system: a real
redis-server, two workers (``runworker``) with short heartbeats and leases, and a gateway
(``runserver_stream``) whose listeners, public and admin, are on 127.0.0.1, port 0 (the kernel
picks them; the gateway prints them), in token mode.

Tasks are started elsewhere (``manage.py create_task --start``); the page, which never reloads
and asks the server for nothing but its one EventSource, must show a task appear, its events
count grow and the task end; then a worker killed with SIGKILL while it runs a
``RetryingProgressTask`` (three attempts): its task shows attempt 2 on the other worker, the
dead worker leaves the workers list, and the task ends. A task's link leads, through the admin
listener, to its stream on the public listener (the address the gateway's registry entry gives)
with a read token the gateway minted.

``DASHBOARD_SCREENSHOT=deploy/dashboard.png`` saves a screenshot of the page mid-run (the
README's image) there; otherwise none is taken.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from streamcoord.keys import TaskRef
from streamcoord.tokens import verify

from .processes import REPO, Gateway, Project, wait_for
from .test_demo_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.system, pytest.mark.browser]

SECRET = "dashboard-browser-test-secret-0123456789abcdef"
#: Every process of the test: token mode, one-second worker heartbeats, two-second leases (a
#: lost worker's task is taken over within seconds, and the worker forgotten after three).
SETTINGS: dict[str, Any] = {
    "stream_auth": "token", "secret": SECRET, "worker_heartbeat_seconds": 1, "lease_seconds": 2,
}
UI_TIMEOUT_MS = 15_000
#: A takeover needs the lease to lapse and a recovery round; the worker is forgotten after
#: three silent heartbeats: generous on a busy 2-core machine.
TAKEOVER_TIMEOUT_MS = 30_000
TASK_TIMEOUT_MS = 60_000


@dataclass
class System:
    project: Project
    gateway: Gateway
    public_url: str
    admin_url: str
    workers: dict[str, Gateway]


@pytest.fixture
def system(project: Project) -> System:
    gateway = project.start(
        "gw", "runserver_stream", "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
        ready="listening on", **SETTINGS,
    )
    found: dict[str, str] = {}

    def announced() -> bool:
        log = gateway.log_text()
        for name, pattern in (("admin", r"streamcoord admin on (http://\S+)"), ("public", r"listening on (http://\S+)")):
            if match := re.search(pattern, log):
                found[name] = match.group(1)
        return len(found) == 2

    wait_for(announced, 10, "the listeners' URLs in the gateway's log")
    workers = {name: project.worker(name, concurrency=4, **SETTINGS) for name in ("w1", "w2")}
    return System(project, gateway, found["public"], found["admin"], workers)


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            yield await context.new_page()
        finally:
            await browser.close()


def number(text: str) -> int:
    return int(text.replace(",", "").strip())


async def wait_for_growth(page: Page, selector: str, above: int) -> int:
    """Wait until the number in ``selector`` is above ``above``; return it."""
    await page.wait_for_function(
        "([sel, n]) => { const c = document.querySelector(sel);"
        " return c !== null && Number(c.textContent.replace(/,/g, '')) > n; }",
        arg=[selector, above], timeout=UI_TIMEOUT_MS,
    )
    return number(await page.locator(selector).inner_text())


def create(system: System, model: str, **fields: Any) -> str:
    """Create and start a task elsewhere (manage.py); its label, as the page shows it."""
    made = system.project.create_task(model, *(f"{k}={v}" for k, v in fields.items()), start=True, **SETTINGS)
    return f"{made['app_label']}.{made['model']}:{made['id']}"


@pytest.mark.timeout(240)
async def test_the_dashboard_follows_tasks_and_workers_live(system: System, page: Page) -> None:
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    await page.goto(system.admin_url + "/", timeout=UI_TIMEOUT_MS)
    await page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=UI_TIMEOUT_MS)
    workers = page.locator("#workers tbody tr[data-worker]")
    await expect(workers).to_have_count(2, timeout=UI_TIMEOUT_MS)

    # 1. A task started elsewhere appears, progresses and ends.
    label = create(system, "ProgressTask", steps=16, delay=0.4)
    row = page.locator(f'#running tr[data-task="{label}"]')
    await expect(row).to_be_visible(timeout=UI_TIMEOUT_MS)
    seq = f'#running tr[data-task="{label}"] [data-field="last_seq"]'
    first = await wait_for_growth(page, seq, 0)
    second = await wait_for_growth(page, seq, first)
    await wait_for_growth(page, seq, second)
    app, model, pk = TaskRef.parse(label).app_label, TaskRef.parse(label).model, TaskRef.parse(label).pk
    await expect(row.locator('[data-field="link"]')).to_have_attribute("href", f"dashboard/link/{app}/{model}/{pk}")
    await expect(row).to_have_count(0, timeout=TASK_TIMEOUT_MS)
    await expect(page.locator('#by-state [data-state="completed"] b')).to_have_text("1", timeout=UI_TIMEOUT_MS)
    await link_leads_to_the_stream(system, TaskRef.parse(label))

    # 2. A worker killed mid-task: its task is taken over (attempt 2 elsewhere), the worker
    # leaves the list, and the task ends.
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        # Company for the picture: long tasks (they outlast the test, so they never change the
        # counts asserted below), and one that fails at once.
        for _ in range(3):
            create(system, "ProgressTask", steps=400, delay=0.25)
        create(system, "ProgressTask", steps=5, delay=0.1, fail_at=2)
    label = create(system, "RetryingProgressTask", steps=60, delay=0.25)
    row = page.locator(f'#running tr[data-task="{label}"]')
    seq = f'#running tr[data-task="{label}"] [data-field="last_seq"]'
    await wait_for_growth(page, seq, 2)
    victim_id = (await row.locator('[data-field="worker"]').inner_text()).strip()
    victim_pid = int(await page.locator(f'#workers tr[data-worker="{victim_id}"]').get_attribute("data-pid") or 0)
    victim = next(w for w in system.workers.values() if w.pid == victim_pid)
    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait(10)

    await expect(row.locator('[data-field="attempt"]')).to_have_text("2", timeout=TAKEOVER_TIMEOUT_MS)
    await screenshot(page)  # the takeover, with the dead worker most likely still listed, late
    await expect(row.locator('[data-field="worker"]')).not_to_have_text(victim_id, timeout=UI_TIMEOUT_MS)
    before = await wait_for_growth(page, seq, 0)  # the new run's events
    await wait_for_growth(page, seq, before)
    await expect(page.locator(f'#workers tr[data-worker="{victim_id}"]')).to_have_count(0, timeout=TAKEOVER_TIMEOUT_MS)
    await expect(workers).to_have_count(1)
    await expect(row).to_have_count(0, timeout=TASK_TIMEOUT_MS)
    await expect(page.locator('#by-state [data-state="completed"] b')).to_have_text("2", timeout=UI_TIMEOUT_MS)

    # All along: one document, one EventSource, no other request (no polling, no reload).
    assert await page.evaluate("window.__sameDocument === true")
    fetched = [url.removeprefix(system.admin_url) for url in requests if url.startswith("http")]
    assert fetched == ["/", "/dashboard/events"]


async def link_leads_to_the_stream(system: System, ref: TaskRef) -> None:
    """The admin listener's link: a redirect to the public stream with a read token for this
    task alone, which the public listener accepts."""
    async with httpx.AsyncClient(base_url=system.admin_url, timeout=10) as admin:
        answer = await admin.get(f"/dashboard/link/{ref.app_label}/{ref.model}/{ref.pk}")
    assert answer.status_code == 302
    location = httpx.URL(answer.headers["location"])
    assert str(location.copy_with(query=None)) == f"{system.public_url}/stream/{ref.app_label}/{ref.model}/{ref.pk}"
    assert verify(SECRET, location.params["token"]).streams == frozenset({ref})
    async with httpx.AsyncClient(timeout=10) as public:
        summary = await public.get(location)
        refused = await public.get(location.copy_with(query=None))  # the same without the token
    assert summary.status_code == 200 and summary.json()["status"] == "completed"
    assert refused.status_code == 401


async def screenshot(page: Page) -> None:
    """The README's picture, when asked for (``DASHBOARD_SCREENSHOT``)."""
    target = os.environ.get("DASHBOARD_SCREENSHOT")
    if target:
        path = Path(target) if Path(target).is_absolute() else REPO / target
        await page.screenshot(path=str(path), full_page=True)
