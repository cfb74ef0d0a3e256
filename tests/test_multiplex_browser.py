"""Many tasks on one connection in a real browser: the example page ``/tasks/many/`` follows its
tasks with ``streamcoord.follow`` on one ``GET /streams`` EventSource, in headless Debian chromium
driven by playwright, with a real redis-server, a worker, the Django site under uvicorn and a
``runserver_stream`` gateway with stream tokens.

Page and streams share one plain ``http://`` origin (HTTP/1.1: six connections per origin), as
behind a balancer: :class:`Router`, the test's own, sends ``/stream/...`` and ``/streams`` to the
gateway and everything else to Django, one request per connection.

1. Twenty tasks, one connection (the gateway's ``/stats``: one stream connection, twenty
   listeners; the page: one EventSource); while they run, eight ``fetch()``es to the same origin
   (more than the six connections twenty EventSources would leave none of) all complete before
   any task ends; every bar reaches 100 %, every task's events arrive once, in order.
2. ``watch.add`` and ``watch.remove``: two tasks, a third added (its token from the page's
   server), the first removed, each mid-stream: every task's events 1..N once across both
   switches, the removed task's up to its removal, and the new connections carried the old one's
   position without the parts of tasks no longer followed.
3. ``streamcoord.tag`` in the browser is ``streamcoord.ids.task_tag``.

Every process is stopped by its pid; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import Page, expect

from streamcoord.ids import task_tag

from .processes import REPO, Gateway, Project
from .relay import LocalServer, relay
from .test_js_helper_browser import fresh_page, start_uvicorn

pytestmark = [pytest.mark.system, pytest.mark.browser]

SECRET = "multiplex-browser-test-secret-0123456789abcdef"
TOKEN_SETTINGS = {"stream_auth": "token", "secret": SECRET}
JS = REPO / "django_app" / "static" / "streamcoord" / "streamcoord.js"
TASK_TIMEOUT_MS = 40_000
UI_TIMEOUT_MS = 10_000
#: Counts the page's EventSources (``window.eventSources``), before any script of the page runs.
COUNT_EVENT_SOURCES = """(() => {
    const Native = window.EventSource;
    window.eventSources = [];
    window.EventSource = class extends Native {
        constructor(...args) { super(...args); window.eventSources.push(this); }
    };
})()"""


# -- one origin in front of Django and the gateway ---------------------------------------------


@dataclass
class Router(LocalServer):
    """127.0.0.1:<kernel-picked port>, routing each request by its path: ``/stream/...`` and
    ``/streams`` to the gateway's socket, the rest to Django's. Each request goes upstream with
    ``Connection: close``, so a browser connection carries one request and its response (the
    browser's six-per-origin limit still counts the open ones). Keeps every request head."""

    gateway: Path
    django: Path
    heads: list[str] = field(default_factory=list)

    async def __aenter__(self) -> Router:
        await super().__aenter__()
        return self

    def streams_requests(self) -> list[str]:
        """The request targets of ``GET /streams`` (path and query), in order."""
        return [head.split(" ", 2)[1] for head in self.heads if head.startswith("GET /streams?")]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1")
            self.heads.append(head)
            target = head.split(" ", 2)[1]
            to_gateway = target.startswith("/stream/") or re.match(r"/streams/?(\?|$)", target)
            lines = [line for line in head.split("\r\n") if line and not line.lower().startswith("connection:")]
            upstream = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.gateway if to_gateway else self.django)), 5
            )
            upstream[1].write(("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
            await relay((reader, writer), upstream)  # the response ends, or the browser goes
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the browser closed an idle connection
        finally:
            if upstream is not None:
                upstream[1].close()


@dataclass
class Site:
    url: str
    gateway: Gateway
    django: Gateway
    router: Router


@pytest.fixture
async def site(project: Project, tmp_path: Path) -> AsyncIterator[Site]:
    """Django (uvicorn), a gateway and a worker with stream tokens, behind one :class:`Router`."""
    django_socket = tmp_path / "django.sock"
    (django, _), gateway, _ = await asyncio.gather(
        asyncio.to_thread(start_uvicorn, project, "django", "--uds", str(django_socket), **TOKEN_SETTINGS),
        asyncio.to_thread(project.gateway, "gw", **TOKEN_SETTINGS),
        asyncio.to_thread(project.worker, "w1", 25),
    )
    async with Router(gateway.socket, django_socket) as router:
        yield Site(router.url, gateway, django, router)
    assert "Traceback" not in django.log_text(), django.log_text()[-3000:]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with fresh_page() as fresh:
        yield fresh


async def stats(gateway: Gateway) -> dict[str, Any]:
    assert gateway.admin_socket is not None
    transport = httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=5) as admin:
        return (await admin.get("/stats")).json()  # type: ignore[no-any-return]


async def wait_for_stats(gateway: Gateway, listeners: int, connections: int) -> dict[str, Any]:
    """The gateway's /stats once it has ``listeners`` and ``connections`` (bounded)."""
    for _ in range(200):
        now = await stats(gateway)
        if (now["listeners"], now["stream_connections"]) == (listeners, connections):
            return now
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway never had {listeners} listeners on {connections} connections: {now}")


# -- the page ----------------------------------------------------------------------------------


async def start_many(page: Page, site: str, count: int, steps: int, delay: float) -> list[str]:
    """The form of /tasks/many/: start ``count`` tasks, land on their page; their labels."""
    await page.add_init_script(COUNT_EVENT_SOURCES)
    await page.goto(f"{site}/tasks/many/", timeout=UI_TIMEOUT_MS)
    await page.fill("#id_count", str(count))
    await page.fill("#id_steps", str(steps))
    await page.fill("#id_delay", str(delay))
    await page.click("button[type=submit]", timeout=UI_TIMEOUT_MS)
    await page.wait_for_url(re.compile(r".*/tasks/many/\?pk="), timeout=UI_TIMEOUT_MS)
    labels = await page.locator("#bars li").evaluate_all("(rows) => rows.map((row) => row.dataset.task)")
    assert len(labels) == count
    return labels  # type: ignore[no-any-return]


async def shown_events(page: Page) -> dict[str, list[tuple[str, int, str]]]:
    """The page's event list, by task: (epoch, sequence, type) each."""
    items = await page.locator("#events li").evaluate_all(
        "(items) => items.map((li) => [li.dataset.task, li.dataset.id, li.dataset.type])"
    )
    events: dict[str, list[tuple[str, int, str]]] = {}
    for label, event_id, event_type in items:
        epoch, _, seq = event_id.rpartition("-")
        assert epoch and seq.isdigit(), f"an event without its task's id on the page: {label} {event_id!r}"
        events.setdefault(label, []).append((epoch, int(seq), event_type))
    return events


def assert_once_in_order(events: list[tuple[str, int, str]], steps: int | None) -> None:
    """Sequences 1..n without gaps or repeats, one epoch; all of a run of ``steps`` if given."""
    seqs = [seq for _, seq, _ in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"events lost, repeated or out of order: {seqs}"
    assert len({epoch for epoch, _, _ in events}) == 1, events
    types = [t for _, _, t in events]
    if steps is not None:
        assert types == ["start"] + ["progress"] * steps + ["complete"], types
    else:
        assert types == ["start"] + ["progress"] * (len(types) - 1), types


async def open_event_sources(page: Page) -> list[int]:
    """The readyState of every EventSource the page made."""
    return await page.evaluate("() => window.eventSources.map((source) => source.readyState)")  # type: ignore[no-any-return]


# -- 1. twenty tasks, one connection, the origin's other requests unhindered --------------------

#: 40 steps of 0.25 s: 10 s a task, far longer than eight small requests take.
MANY, STEPS, DELAY, FETCHES = 20, 40, 0.25, 8


async def test_twenty_tasks_on_one_connection_leave_the_origin_free(site: Site, page: Page) -> None:
    labels = await start_many(page, site.url, MANY, STEPS, DELAY)

    # Every task is under way, all on one connection.
    for row in await page.locator("#bars li progress").all():
        await expect(row).not_to_have_attribute("value", "0", timeout=TASK_TIMEOUT_MS)
    served = await wait_for_stats(site.gateway, listeners=MANY, connections=1)
    assert served["stream_connections"] == 1, served
    assert await open_event_sources(page) == [1]  # OPEN

    # Eight requests to the same origin at once, while the tasks run: all answered before any
    # task ends (twenty EventSources would hold all six connections until the tasks end).
    fetched = await asyncio.wait_for(
        page.evaluate(
            """async (count) => {
                const ended = () => document.querySelectorAll("#bars li[data-ended]").length;
                const before = ended();
                const answers = await Promise.all(Array.from({ length: count }, (_, i) =>
                    fetch(`/tasks/?fetch=${i}`, { cache: "no-store" })
                        .then((answer) => answer.text().then(() => [answer.status, ended()]))));
                return { before, answers };
            }""",
            FETCHES,
        ),
        TASK_TIMEOUT_MS / 1000,
    )
    assert fetched == {"before": 0, "answers": [[200, 0]] * FETCHES}, fetched

    # Every bar reaches 100 %, every task's events once and in order; the watch closes.
    section = page.locator("#tasks")
    await expect(section).to_have_attribute("data-all-ended", "true", timeout=TASK_TIMEOUT_MS)
    await expect(page.locator("#bars li[data-ended=complete]")).to_have_count(MANY)
    bars = await page.locator("#bars li progress").evaluate_all("(bars) => bars.map((bar) => bar.value)")
    assert bars == [100] * MANY
    events = await shown_events(page)
    assert sorted(events) == sorted(labels)
    for label in labels:
        assert_once_in_order(events[label], STEPS)
    assert await page.evaluate("() => [watch.closed, watch.ended.length]") == [True, MANY]
    assert await open_event_sources(page) == [2]  # CLOSED: one EventSource ever, never reopened
    assert len(site.router.streams_requests()) == 1
    await wait_for_stats(site.gateway, listeners=0, connections=0)
    assert await page.locator("#connection-errors").text_content() == "0"


# -- 2. add and remove tasks ------------------------------------------------------------------

#: 40 steps of 0.2 s: each switch happens mid-stream.
SWITCH_STEPS, SWITCH_DELAY = 40, 0.2


async def count_shown(page: Page, label: str) -> int:
    return await page.locator(f'#events li[data-task="{label}"]').count()


async def wait_shown(page: Page, label: str, at_least: int) -> None:
    await expect(page.locator(f'#events li[data-task="{label}"]').nth(at_least - 1)).to_be_attached(
        timeout=TASK_TIMEOUT_MS
    )


def position(target: str) -> tuple[list[str], dict[str, int]]:
    """A ``/streams`` request's tasks, and the sequence of each tag its ``last_event_id`` names."""
    query = parse_qs(urlsplit(target).query)
    parts = query.get("last_event_id", [""])[0].split(".")
    return query["task"], {part.split("-")[0]: int(part.split("-")[2]) for part in parts if part}


async def test_tasks_added_and_removed_switch_connections_losing_and_repeating_nothing(site: Site, page: Page) -> None:
    first, second = await start_many(page, site.url, 2, SWITCH_STEPS, SWITCH_DELAY)
    await wait_shown(page, first, 3)
    await wait_shown(page, second, 3)

    # Add: the page's server starts a third task and signs a URL for the three.
    await page.click("#more button[type=submit]", timeout=UI_TIMEOUT_MS)
    await page.wait_for_function("() => watch.tasks.length === 3", timeout=UI_TIMEOUT_MS)
    third = (await page.evaluate("() => watch.tasks"))[2]
    await wait_shown(page, third, 3)
    await wait_for_stats(site.gateway, listeners=3, connections=1)

    # Remove the first: counted and clicked in one step, so nothing of it can arrive between.
    removed_at = await page.evaluate(
        """(label) => {
            const shown = document.querySelectorAll(`#events li[data-task="${label}"]`).length;
            document.querySelector(`#bars li[data-task="${label}"] .remove`).click();
            return shown;
        }""",
        first,
    )
    assert await page.evaluate("() => watch.tasks") == [second, third]
    await wait_for_stats(site.gateway, listeners=2, connections=1)

    await expect(page.locator("#tasks")).to_have_attribute("data-all-ended", "true", timeout=TASK_TIMEOUT_MS)
    events = await shown_events(page)
    assert_once_in_order(events[second], SWITCH_STEPS)
    assert_once_in_order(events[third], SWITCH_STEPS)
    assert_once_in_order(events[first], None)
    assert len(events[first]) == removed_at < SWITCH_STEPS + 2, "the removed task went on, or had ended"

    # Three connections, one after the other; each new one started where the page was, without
    # the parts of tasks it no longer follows (the gateway would have refused them: 400).
    requests = site.router.streams_requests()
    assert len(requests) == 3, requests
    assert position(requests[0]) == ([first, second], {})
    tasks, at = position(requests[1])
    assert tasks == [first, second, third] and set(at) == {task_tag(first), task_tag(second)}, requests[1]
    assert at[task_tag(second)] < SWITCH_STEPS + 2, "the add came after the second task ended"
    tasks, at = position(requests[2])
    assert tasks == [second, third] and set(at) == {task_tag(second), task_tag(third)}, requests[2]
    assert max(at.values()) < SWITCH_STEPS + 2, "the remove came after a task ended"
    assert await open_event_sources(page) == [2, 2, 2]
    assert await page.locator("#connection-errors").text_content() == "0"
    await wait_for_stats(site.gateway, listeners=0, connections=0)


# -- 3. the tag of a task, in JavaScript ------------------------------------------------------

LABELS = [
    "examples.ProgressTask:1", "examples.ProgressTask:20", "shop.ExportTask:6f1c2a34-9b1e-4c7d-a1f0-0d2e3b4c5a69",
    "a.B:c", "app_1.Model_2:" + "9" * 64, "примеры.Задача:ü", "x.Y:0",
]


async def test_the_tag_in_javascript_is_the_gateways(page: Page) -> None:
    await page.set_content("<!doctype html><title>tags</title>")
    await page.add_script_tag(path=str(JS))
    tags = await page.evaluate("(labels) => labels.map(streamcoord.tag)", LABELS)
    assert tags == [task_tag(label) for label in LABELS]
    composite = ".".join(f"{task_tag(label)}-3f9a02bc-{n}" for n, label in enumerate(LABELS[:3], 1))
    picked = await page.evaluate(
        "([id, labels]) => labels.map((label) => streamcoord.taskEventId(id, label))", [composite, LABELS]
    )
    assert picked == ["3f9a02bc-1", "3f9a02bc-2", "3f9a02bc-3"] + [""] * (len(LABELS) - 3)
    data = {"_app": "examples", "_model": "ProgressTask", "_task_id": "7"}
    assert await page.evaluate("(data) => streamcoord.taskOf(data)", data) == "examples.ProgressTask:7"
