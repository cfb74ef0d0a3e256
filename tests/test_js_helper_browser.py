"""streamcoord.js on the example project's task page, in a real browser, through a dropped
connection: headless Debian chromium driven by playwright, a real redis-server, a worker, the
Django pages served by uvicorn (``django_app.project.asgi``) and ``runserver_stream`` gateways
with stream tokens.

1. Another origin (CORS): the page on Django's origin, its stream on the gateways' origin
   (``STREAMCOORD_GATEWAY_URL``, ``STREAMCOORD_CORS_ORIGINS``). That origin is a TCP forwarder
   of the test's own, where a balancer would stand: its port exists before any process starts,
   so Django can be told the gateways' URL and the gateway Django's origin. The gateway is
   killed (SIGKILL) mid-task and another one started; the page resumes on it.
2. One origin through nginx: deploy/nginx/streamcoord.conf, unedited but for its upstream
   ``server`` lines and ``listen`` (tests/test_nginx.py renders it), in front of Django and two
   gateways; the gateway serving the stream is killed mid-task, the page resumes on the other.

Both assert that the page saw every event once, in order, and the terminal event; that the
drop reached ``onConnectionError`` and never looked like a task's ``error``; and that the
reconnect carried Last-Event-ID. Every process is stopped by its pid; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from .processes import REPO, Gateway, Project, wait_for
from .relay import LocalServer, relay
from .test_demo_browser import CHROMIUM, CHROMIUM_ARGS
from .test_nginx import Nginx, served_by

pytestmark = [pytest.mark.system, pytest.mark.browser]

#: Signs stream tokens in Django and checks them in the gateways (at least 32 characters).
SECRET = "js-helper-browser-test-secret-0123456789abcdef"
#: A task long enough to be mid-stream when its gateway dies: 30 steps, 6 s.
STEPS, DELAY = 30, 0.2
EXPECTED_TYPES = ["start"] + ["progress"] * STEPS + ["complete"]
TASK_TIMEOUT_MS = 30_000
UI_TIMEOUT_MS = 10_000

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


# -- the parts ---------------------------------------------------------------------------------


@dataclass
class Forwarder(LocalServer):
    """Forwards 127.0.0.1:<kernel-picked port> to whatever ``connect`` opens (it may be changed
    while running), and keeps the bytes each browser connection sent, to read its requests."""

    connect: Connect
    sent: list[bytearray] = field(default_factory=list)

    async def __aenter__(self) -> Forwarder:
        await super().__aenter__()
        return self

    def stream_requests(self) -> list[str]:
        """The heads of the ``GET /stream/...`` requests, in the order of their connections."""
        pattern = rb"GET /stream/[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n"
        return [head.decode("latin-1") for sent in self.sent for head in re.findall(pattern, bytes(sent))]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = bytearray()
        self.sent.append(sent)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            upstream = await asyncio.wait_for(self.connect(), 5)
            await relay((reader, writer), upstream, sent)
        except (OSError, TimeoutError):
            pass  # nothing listens there (a gateway being replaced): the browser retries
        finally:
            if upstream is not None:
                upstream[1].close()


def header(head: str, name: str) -> str | None:
    found = re.search(rf"(?im)^{re.escape(name)}:\s*(.*?)\s*$", head)
    return found.group(1) if found else None


def start_uvicorn(project: Project, name: str, *bind: str, **settings: Any) -> tuple[Gateway, str]:
    """The example project's Django site under uvicorn (``bind``: ``--uds PATH`` or ``--host H
    --port 0``), stopped with the project's other processes; and the URL it announced."""
    log = project.directory / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "django_app.project.asgi:application", *bind, "--log-level", "info"],
            cwd=REPO, env=project.env(**settings), stdout=out, stderr=subprocess.STDOUT,
        )
    handle = Gateway(project.directory / f"{name}.sock", process, log)
    project.started.append(handle)
    found: list[str] = []

    def running() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {process.returncode}:\n{handle.log_text()}")
        found[:] = re.findall(r"Uvicorn running on (\S+)", handle.log_text())
        return bool(found)

    wait_for(running, 30, "uvicorn to serve the Django site")
    return handle, found[0]


def start_tcp_gateway(project: Project, name: str, **settings: Any) -> tuple[Gateway, int]:
    """``runserver_stream --host 127.0.0.1 --port 0``, and the port it announced."""
    gateway = project.start(name, "runserver_stream", "--host", "127.0.0.1", "--port", "0", ready="listening on", **settings)
    port = re.search(r"gateway listening on http://127\.0\.0\.1:(\d+)", gateway.log_text())
    assert port is not None, gateway.log_text()
    return gateway, int(port.group(1))


async def tcp(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


@contextlib.asynccontextmanager
async def fresh_page() -> AsyncIterator[Page]:
    """A fresh page in headless chromium; JavaScript errors on it fail the test."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
            assert errors == [], f"JavaScript errors on the page: {errors}"
        finally:
            await browser.close()


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with fresh_page() as fresh:
        yield fresh


# -- the page ----------------------------------------------------------------------------------


async def start_task(page: Page, site: str, kind: str = "progress", steps: int = STEPS, delay: float = DELAY) -> None:
    """The example form: start a task, land on its page."""
    await page.goto(f"{site}/tasks/", timeout=UI_TIMEOUT_MS)
    await page.select_option("#id_kind", kind)
    await page.fill("#id_steps", str(steps))
    await page.fill("#id_delay", str(delay))
    await page.click("button[type=submit]", timeout=UI_TIMEOUT_MS)
    await page.wait_for_url(re.compile(r".*/tasks/progresstask/\d+/$"), timeout=UI_TIMEOUT_MS)


async def shown_events(page: Page) -> list[tuple[str, int, str]]:
    """The page's event list as (epoch, sequence, type)."""
    items = await page.locator("#events li").evaluate_all("(items) => items.map((li) => [li.dataset.id, li.dataset.type])")
    events = []
    for event_id, event_type in items:
        epoch, _, seq = event_id.rpartition("-")
        assert epoch and seq.isdigit(), f"an event without a proper id on the page: {event_id!r}"
        events.append((epoch, int(seq), event_type))
    return events


async def wait_mid_stream(page: Page) -> list[tuple[str, int, str]]:
    """Wait for start and a few progress events; what the page had then."""
    await expect(page.locator("#events li").nth(4)).to_be_attached(timeout=TASK_TIMEOUT_MS)
    return await shown_events(page)


async def assert_followed_to_the_end(page: Page, before: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """The page ends with ``complete``: every event once, in order, one epoch; the drop went to
    onConnectionError, never to a task's ``error``; the EventSource is closed."""
    section = page.locator("#task")
    await expect(section).to_have_attribute("data-ended", "complete", timeout=TASK_TIMEOUT_MS)
    await expect(page.locator("#status")).to_have_text("Completed")
    events = await shown_events(page)
    seqs = [seq for _, seq, _ in events]
    assert seqs == list(range(1, len(EXPECTED_TYPES) + 1)), f"events lost, repeated or out of order: {seqs}"
    assert [t for _, _, t in events] == EXPECTED_TYPES
    assert len({epoch for epoch, _, _ in events}) == 1, f"more than one epoch: {events}"
    assert events[: len(before)] == before
    assert len(before) < len(events), "the task ended before the drop: nothing was tested"
    connection_errors = int(await page.locator("#connection-errors").text_content() or "0")
    assert connection_errors >= 1, "the drop never reached onConnectionError"
    watch = await page.evaluate("() => [watch.closed, watch.lastEventId]")
    assert watch == [True, f"{events[-1][0]}-{events[-1][1]}"], watch
    return events


def assert_resumed_with_last_event_id(requests: list[str], path: str, events: list[tuple[str, int, str]], before: list[tuple[str, int, str]]) -> None:
    """The first stream request had no Last-Event-ID; a later one named an event the page had
    when the connection dropped (or one in flight then)."""
    mine = [head for head in requests if head.startswith(f"GET {path}?")]
    assert len(mine) >= 2, f"the EventSource did not reconnect: {requests}"
    assert header(mine[0], "Last-Event-ID") is None
    resumed = [value for head in mine[1:] if (value := header(head, "Last-Event-ID"))]
    assert resumed, f"no reconnect carried Last-Event-ID: {mine[1:]}"
    epoch, _, seq = resumed[0].rpartition("-")
    assert (epoch, int(seq), "progress") in events and int(seq) >= before[-1][1], (resumed, before[-1])


async def stream_path(page: Page) -> str:
    url = await page.locator("#task").get_attribute("data-stream-url")
    assert url is not None and "?token=" in url, url
    return re.sub(r"^https?://[^/]+", "", url).partition("?")[0]


# -- 1. another origin, with CORS ------------------------------------------------------------


async def test_a_cross_origin_page_follows_its_task_through_a_gateway_that_died(project: Project, page: Page) -> None:
    started = time.monotonic()
    gateway_port: list[int] = []  # the live gateway's, once there is one

    async def to_gateway() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not gateway_port:
            raise ConnectionRefusedError("no gateway yet")
        return await tcp(gateway_port[-1])

    async with Forwarder(to_gateway) as streams:
        (django, site), _ = await asyncio.gather(
            asyncio.to_thread(
                start_uvicorn, project, "django", "--host", "127.0.0.1", "--port", "0",
                stream_auth="token", secret=SECRET, gateway_url=streams.url,
            ),
            asyncio.to_thread(project.worker, "w1"),
        )
        settings = {"stream_auth": "token", "secret": SECRET, "cors_origins": site}
        first, port = await asyncio.to_thread(start_tcp_gateway, project, "gw1", **settings)
        gateway_port.append(port)

        await start_task(page, site)
        path = await stream_path(page)
        assert (await page.locator("#task").get_attribute("data-stream-url") or "").startswith(f"{streams.url}/stream/")
        before = await wait_mid_stream(page)

        first.process.kill()
        assert await asyncio.to_thread(first.process.wait, 5) == -signal.SIGKILL
        _, port = await asyncio.to_thread(start_tcp_gateway, project, "gw2", **settings)
        gateway_port.append(port)
        events = await assert_followed_to_the_end(page, before)

        requests = streams.stream_requests()
        assert_resumed_with_last_event_id(requests, path, events, before)
        assert all(header(head, "Origin") == site for head in requests), "not a cross-origin EventSource"

        # A task's `error` on the same kind of page: onEnd with `error`, no connection error, and
        # the EventSource closed by the helper (it would otherwise reconnect and get 204).
        await start_task(page, site, kind="failing", steps=4, delay=0.05)
        section = page.locator("#task")
        await expect(section).to_have_attribute("data-ended", "error", timeout=TASK_TIMEOUT_MS)
        await expect(page.locator("#status")).to_have_text(re.compile(r"^Failed: ProgressTask failed at step 2"))
        assert await page.locator("#connection-errors").text_content() == "0"
        assert [t for _, _, t in await shown_events(page)] == ["start", "progress", "error"]
        assert await page.evaluate("() => watch.closed") is True

    print(
        f"\nCORS page: {len(events)} events, resumed on a new gateway after a SIGKILL; "
        f"{len(requests)} stream requests; {time.monotonic() - started:.1f} s in all"
    )
    assert "Traceback" not in django.log_text(), django.log_text()[-3000:]


# -- 2. one origin, through the shipped nginx config ------------------------------------------


async def test_a_page_behind_nginx_follows_its_task_onto_the_other_gateway(
    project: Project, page: Page, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = {"stream_auth": "token", "secret": SECRET}
    django_socket = tmp_path / "django.sock"
    (django, _), gateways, _ = await asyncio.gather(
        asyncio.to_thread(start_uvicorn, project, "django", "--uds", str(django_socket), **settings),
        asyncio.gather(*(asyncio.to_thread(project.gateway, name, **settings) for name in ("gw1", "gw2"))),
        asyncio.to_thread(project.worker, "w1"),
    )
    nginx = Nginx(tmp_path / "nginx", [g.socket for g in gateways], django=django_socket).start()
    try:
        async with Forwarder(lambda: asyncio.open_unix_connection(str(nginx.socket))) as site:
            await start_task(page, site.url)
            path = await stream_path(page)
            assert (await page.locator("#task").get_attribute("data-stream-url") or "").startswith("/stream/")
            before = await wait_mid_stream(page)

            victim = await serving_gateway(gateways)
            victim.process.kill()
            events = await assert_followed_to_the_end(page, before)
            assert victim.process.wait(5) == -signal.SIGKILL
            assert_resumed_with_last_event_id(site.stream_requests(), path, events, before)

        # nginx's log: the stream went to the victim first, and resumed on the other gateway.
        survivor = next(g for g in gateways if g is not victim)
        logged = [logged_request(line) for line in nginx.access_log.read_text().splitlines() if path in line]
        resumed = [(upstream, last_id) for upstream, last_id in logged if last_id != "-"]
        assert resumed and all(served_by(upstream) == str(survivor.socket) for upstream, _ in resumed), logged
        assert served_by(logged[0][0]) == str(victim.socket) and logged[0][1] == "-", logged
    finally:
        nginx.stop()
    print(
        f"\nnginx page: {len(events)} events, resumed on {survivor.socket.name} after a SIGKILL of "
        f"{victim.socket.name}; {time.monotonic() - started:.1f} s in all"
    )
    assert "Traceback" not in django.log_text(), django.log_text()[-3000:]


def logged_request(line: str) -> tuple[str, str]:
    """``$upstream_addr`` and ``$http_last_event_id`` of a line of the test's nginx access log
    (``$status $upstream_addr "$http_last_event_id" $request_time $request_uri``)."""
    found = re.fullmatch(r'\d+ (.*) "([^"]*)" \S+ \S+', line)
    assert found, line
    return found.group(1), found.group(2)


async def serving_gateway(gateways: list[Gateway]) -> Gateway:
    """The gateway with a client (the page's stream), by each one's /stats (admin listener)."""
    deadline = time.monotonic() + 10
    while True:
        serving = []
        for gateway in gateways:
            assert gateway.admin_socket is not None
            transport = httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=5) as admin:
                if (await admin.get("/stats")).json()["listeners"]:
                    serving.append(gateway)
        if len(serving) == 1:
            return serving[0]
        assert time.monotonic() < deadline, f"not one gateway serving the stream: {serving}"
        await asyncio.sleep(0.05)
