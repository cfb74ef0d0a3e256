"""The demo page in a real browser: headless Debian chromium, driven by playwright.

The server is the embedded default exactly as ``./run demo`` starts it (migrate, then
``runserver_stream`` with no STREAMCOORD_REDIS_URL), on a port the kernel picks. The network-drop
test puts a TCP proxy of its own between the browser and the server and cuts every connection
mid-task: the page's EventSource must resume with ``Last-Event-ID``, losing and repeating nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from .processes import REPO, Project, wait_for

pytestmark = [pytest.mark.system, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
#: Generous for a 20-step task of 0.25 s each (5 s) on a busy 2-core machine.
TASK_TIMEOUT_MS = 30_000
UI_TIMEOUT_MS = 10_000


@dataclass
class Demo:
    url: str
    log: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """``./run demo`` on ``--port 0``: migrate, then the embedded default (no Redis URL)."""
    project = Project(tmp_path_factory.mktemp("demo"))  # no redis_url: the embedded default
    project.manage("migrate", "--noinput", "-v", "0")
    # The defaults, as ./run demo has them: streams need tokens, which the demo mints.
    server = project.start(
        "demo", "runserver_stream", "--host", "127.0.0.1", "--port", "0", ready="listening on",
        stream_auth="token",
    )
    try:
        found: list[str] = []

        def announced() -> bool:
            found[:] = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", server.log_text())
            return bool(found)

        wait_for(announced, 10, "the demo's URL in its log")
        yield Demo(found[0], server.log)
    finally:
        server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; JavaScript errors on it fail the test."""
    context = await browser.new_context(viewport={"width": 900, "height": 900})
    page = await context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    try:
        yield page
    finally:
        await context.close()
    assert page_errors == [], f"JavaScript errors on the page: {page_errors}"


async def open_demo(page: Page, url: str) -> None:
    await page.goto(url + "/", timeout=UI_TIMEOUT_MS)
    # The buttons come from /demo/kinds; wait until they are there.
    await expect(page.locator("#kinds button")).to_have_count(3, timeout=UI_TIMEOUT_MS)
    # Record every text #status shows (some last only a moment, e.g. while reconnecting).
    await page.evaluate(
        """() => {
            const status = document.getElementById("status");
            window.statusHistory = [status.textContent];
            new MutationObserver(() => window.statusHistory.push(status.textContent))
                .observe(status, { childList: true, characterData: true, subtree: true });
        }"""
    )


async def start(page: Page, kind: str) -> None:
    await page.locator(f'#kinds button[data-kind="{kind}"]').click(timeout=UI_TIMEOUT_MS)


async def logged_events(page: Page) -> list[tuple[str, int, str]]:
    """The page's event list as (epoch, sequence, type); each line is ``<id> <type> <json>``."""
    events = []
    for line in await page.locator("#log li").all_text_contents():
        event_id, event_type, _ = line.split(" ", 2)
        epoch, _, seq = event_id.rpartition("-")
        assert epoch and seq.isdigit(), f"event without a proper id on the page: {line!r}"
        events.append((epoch, int(seq), event_type))
    return events


def assert_complete_progress_run(events: list[tuple[str, int, str]], steps: int = 20) -> None:
    """start, ``steps`` progress events, complete: ids 1..steps+2, each once, one epoch."""
    seqs = [seq for _, seq, _ in events]
    assert len(seqs) == len(set(seqs)), f"events repeated on the page: {seqs}"
    assert seqs == list(range(1, steps + 3)), f"events lost or out of order: {seqs}"
    assert len({epoch for epoch, _, _ in events}) == 1, f"more than one epoch: {events}"
    assert [t for _, _, t in events] == ["start"] + ["progress"] * steps + ["complete"]


async def wait_for_completion(page: Page) -> None:
    await expect(page.locator("#status")).to_have_class("done", timeout=TASK_TIMEOUT_MS)
    await expect(page.locator("#status")).to_have_text("Completed")
    assert await page.locator("#bar").evaluate("(bar) => bar.value") == 100


async def test_a_progress_task_runs_to_completion_on_the_page(demo: Demo, page: Page) -> None:
    await open_demo(page, demo.url)
    await expect(page.locator("#status")).to_have_text("No task yet.")
    await start(page, "progress")
    await expect(page.locator("#task")).to_have_text(
        re.compile(r"^Following /stream/examples/ProgressTask/\d+$"), timeout=UI_TIMEOUT_MS
    )
    await wait_for_completion(page)
    assert_complete_progress_run(await logged_events(page))
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "demo-complete.png", full_page=True)


async def test_a_failing_task_shows_its_error(demo: Demo, page: Page) -> None:
    await open_demo(page, demo.url)
    await start(page, "failing")
    status = page.locator("#status")
    await expect(status).to_have_class("error", timeout=TASK_TIMEOUT_MS)
    await expect(status).to_have_text(re.compile(r"^Failed: .*fail_at=5"))
    events = await logged_events(page)
    # start, progress 1..4, then the error raised at step 5.
    assert [seq for _, seq, _ in events] == [1, 2, 3, 4, 5, 6]
    assert [t for _, _, t in events] == ["start"] + ["progress"] * 4 + ["error"]


# -- a network drop, made by a TCP proxy of our own between the browser and the server ---------


@dataclass
class DroppingProxy:
    """Forwards 127.0.0.1:<port> to the server, records every request head the browser sends,
    and can cut every open connection at once (new ones still get through)."""

    upstream_host: str
    upstream_port: int
    heads: list[str] = field(default_factory=list)
    _pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def drop(self) -> int:
        """Reset every open connection (both sides, RST not FIN); the number cut."""
        pairs = list(self._pairs)
        for pair in pairs:
            for writer in pair:
                sock = writer.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
        self._pairs.clear()
        return len(pairs)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_writer = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            pair = (client_writer, upstream_writer)
            self._pairs.add(pair)
            try:
                await asyncio.gather(
                    self._pipe(client_reader, upstream_writer, record=True),
                    self._pipe(upstream_reader, client_writer, record=False),
                )
            finally:
                self._pairs.discard(pair)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a dropped connection
        finally:
            self._tasks.discard(task)
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
        buffer = b""
        skip = 0  # request body bytes still to come (never recorded)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            if not record:
                continue
            buffer += data
            while True:
                if skip:
                    taken = min(skip, len(buffer))
                    buffer, skip = buffer[taken:], skip - taken
                    if skip:
                        break
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    break
                text = head.decode("latin-1")
                self.heads.append(text)
                length = re.search(r"(?im)^content-length:\s*(\d+)\s*$", text)
                buffer, skip = rest, int(length.group(1)) if length else 0
        if writer.can_write_eof():
            writer.write_eof()


def header(head: str, name: str) -> str | None:
    found = re.search(rf"(?im)^{re.escape(name)}:\s*(.*?)\s*$", head)
    return found.group(1) if found else None


async def test_the_page_resumes_after_a_network_drop_without_losing_or_repeating_events(
    demo: Demo, page: Page
) -> None:
    upstream = re.fullmatch(r"http://([\d.]+):(\d+)", demo.url)
    assert upstream is not None
    async with DroppingProxy(upstream.group(1), int(upstream.group(2))) as proxy:
        await open_demo(page, proxy.url)
        await start(page, "progress")
        log = page.locator("#log li")
        # start and a few progress events, then the network goes away under the open stream.
        await expect(log.nth(4)).to_be_attached(timeout=TASK_TIMEOUT_MS)
        before = await logged_events(page)
        assert proxy.drop() >= 1
        assert await log.count() < 22, "the task ended before the drop; nothing was tested"

        await wait_for_completion(page)
        events = await logged_events(page)
        assert_complete_progress_run(events)
        assert events[: len(before)] == before

        streams = [h for h in proxy.heads if h.startswith("GET /stream/")]
        assert len(streams) >= 2, f"the EventSource did not reconnect: {proxy.heads}"
        assert header(streams[0], "Last-Event-ID") is None
        resumed = header(streams[1], "Last-Event-ID")
        assert resumed is not None, f"the reconnect carried no Last-Event-ID: {streams[1]!r}"
        # It names an event the page had when the connection dropped (or one in flight then).
        epoch, _, seq = resumed.rpartition("-")
        assert (epoch, int(seq), "progress") in events and int(seq) >= before[-1][1]
        statuses = await page.evaluate("() => window.statusHistory")
        assert "Connection lost, reconnecting..." in statuses, statuses
