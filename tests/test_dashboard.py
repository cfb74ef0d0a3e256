"""The dashboard's logic without Redis or a browser (tests/test_dashboard_browser.py has those):
the snapshot loop's fan-out, start and stop with a fake collector and a manual clock; which
snapshots are news; the page's security headers; the task links; and the events route, called
as an ASGI app with fake receive and send."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import asgineer
import httpx
import pytest
from redis.asyncio import Redis

from streamcoord.dashboard import AGE_TOLERANCE_SECONDS, Dashboard, Page, Snapshots, differs
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.settings import Settings
from streamcoord.tokens import verify

SECRET = "dashboard-unit-test-secret-0123456789abcdef"
WAIT = 5.0  # seconds any step of these tests may take before it counts as hung


class ManualClock:
    """The loop's clock and sleep: the loop sleeps until the test lets it go on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: asyncio.Queue[tuple[float, asyncio.Event]] = asyncio.Queue()
        self._release: asyncio.Event | None = None

    def __call__(self) -> float:
        return self.now

    async def tick(self, seconds: float) -> None:
        release = asyncio.Event()
        await self.sleeps.put((seconds, release))
        await release.wait()

    async def sleeping(self) -> float:
        """Wait for the loop to finish a round and sleep; how long it asked to."""
        seconds, self._release = await asyncio.wait_for(self.sleeps.get(), WAIT)
        return seconds

    def wake(self, seconds: float = 0.0) -> None:
        """Let the sleeping loop go on, ``seconds`` later."""
        assert self._release is not None
        self.now += seconds
        self._release.set()
        self._release = None

    async def next_round(self, seconds: float = 1.0) -> None:
        """Let the loop go on after ``seconds``, and wait for that round to end."""
        if self._release is None:
            await self.sleeping()
        self.wake(seconds)
        await self.sleeping()


class FakeStatus:
    """A collector: returns ``snapshot`` (a copy) and counts its calls."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {"at": "t0", "workers": [{"id": "w1", "heartbeat_age_seconds": 0.2}], "n": 1}
        self.calls = 0
        self.fail: Exception | None = None

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return json.loads(json.dumps(self.snapshot))


def decode(frame: bytes | None) -> dict[str, Any]:
    assert frame is not None
    assert frame.startswith(b"event: status\ndata: ") and frame.endswith(b"\n\n")
    return json.loads(frame.split(b"data: ", 1)[1])  # type: ignore[no-any-return]


@pytest.fixture
async def loop_parts() -> AsyncIterator[tuple[Snapshots, FakeStatus, ManualClock]]:
    status, clock = FakeStatus(), ManualClock()
    snapshots = Snapshots(status, tick=clock.tick, clock=clock)
    yield snapshots, status, clock
    snapshots.stop()


async def test_one_loop_however_many_subscribers_started_by_the_first(loop_parts: Any) -> None:
    snapshots, status, clock = loop_parts
    assert not snapshots.running and status.calls == 0  # nothing runs before a page connects
    pages = [snapshots.subscribe() for _ in range(5)]
    assert snapshots.running and snapshots.subscriber_count == 5
    await clock.sleeping()  # the first round is done
    assert status.calls == 1  # once, not once per page
    frames = [await page.next(WAIT) for page in pages]
    assert len(set(frames)) == 1 and decode(frames[0])["n"] == 1  # one frame, encoded once, for all


async def test_a_page_that_joins_later_gets_the_last_snapshot_at_once(loop_parts: Any) -> None:
    snapshots, status, clock = loop_parts
    first = snapshots.subscribe()
    await clock.sleeping()
    late = snapshots.subscribe()
    assert decode(await late.next(0)) == decode(await first.next(0))
    assert status.calls == 1


async def test_the_loop_stops_when_the_last_page_leaves_and_restarts_afresh(loop_parts: Any) -> None:
    snapshots, status, clock = loop_parts
    a, b = snapshots.subscribe(), snapshots.subscribe()
    await clock.sleeping()
    loop = snapshots._loop
    snapshots.unsubscribe(a)
    assert snapshots.running  # b still listens
    snapshots.unsubscribe(b)
    assert not snapshots.running
    await asyncio.wait_for(asyncio.gather(loop, return_exceptions=True), WAIT)
    assert loop.cancelled()
    clock.wake()  # nothing is left to wake
    await asyncio.sleep(0)
    assert status.calls == 1
    # A new page: a new loop, and no stale snapshot from before.
    status.snapshot["n"] = 2
    c = snapshots.subscribe()
    assert await c.next(0) is None
    await clock.sleeping()
    assert decode(await c.next(WAIT))["n"] == 2 and status.calls == 2


async def test_only_changes_go_out_not_ages_that_grow_with_the_clock(loop_parts: Any) -> None:
    snapshots, status, clock = loop_parts
    page = snapshots.subscribe()
    await clock.sleeping()
    assert await page.next(0) is not None
    sent = snapshots.sent
    for _ in range(5):  # the heartbeat ages: just older, one second a round; `at` moves too
        worker = status.snapshot["workers"][0]
        worker["heartbeat_age_seconds"] += 1.0
        status.snapshot["at"] += "+"
        await clock.next_round(1.0)
    assert snapshots.sent == sent and await page.next(0) is None
    # A heartbeat: the age drops back. That is news.
    status.snapshot["workers"][0]["heartbeat_age_seconds"] = 0.1
    await clock.next_round(1.0)
    assert snapshots.sent == sent + 1
    assert decode(await page.next(0))["workers"][0]["heartbeat_age_seconds"] == 0.1
    # Anything else is news too.
    status.snapshot["n"] = 3
    await clock.next_round(1.0)
    assert decode(await page.next(0))["n"] == 3


async def test_a_slow_page_gets_the_latest_snapshot_never_a_backlog(loop_parts: Any) -> None:
    snapshots, status, clock = loop_parts
    slow = snapshots.subscribe()
    await clock.sleeping()
    for n in range(2, 6):
        status.snapshot["n"] = n
        await clock.next_round()
    assert decode(await slow.next(0))["n"] == 5
    assert await slow.next(0) is None  # nothing else waits


async def test_the_loop_keeps_time_a_round_a_second(loop_parts: Any) -> None:
    snapshots, _, clock = loop_parts
    snapshots.subscribe()
    assert await clock.sleeping() == 1.0  # the collection took no time on this clock

    took = 0.2

    async def slow_collect() -> dict[str, Any]:
        clock.now += took
        return {"n": 1}

    snapshots._collect = slow_collect
    clock.wake()
    assert await clock.sleeping() == pytest.approx(0.8)  # a round a second
    took = 0.5  # a long round: three times its length before the next (a quarter of the time)
    clock.wake()
    assert await clock.sleeping() == pytest.approx(1.5)


async def test_a_collection_that_fails_is_shown_and_the_loop_goes_on(loop_parts: Any) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    snapshots, status, clock = loop_parts
    page = snapshots.subscribe()
    await clock.sleeping()
    await page.next(0)
    status.fail = RedisConnectionError("Connection refused by 10.0.0.1")
    await clock.next_round()
    error = decode(await page.next(0))
    assert "Redis is unavailable" in error["error"] and "10.0.0.1" not in error["error"]
    await clock.next_round()
    assert await page.next(0) is None  # the same error is no news
    status.fail = None
    await clock.next_round()
    assert decode(await page.next(0))["n"] == 1
    assert snapshots.running


async def test_a_page_waiting_for_news_gets_none_after_its_wait_for_a_heartbeat() -> None:
    snapshots = Snapshots(FakeStatus(), tick=ManualClock().tick)
    page = snapshots.subscribe()
    try:
        await asyncio.sleep(0)
        assert await page.next(0.01) is not None  # the first snapshot
        assert await page.next(0.01) is None  # then nothing: the caller sends a heartbeat
    finally:
        snapshots.stop()


@pytest.mark.parametrize(
    ("sent", "new", "elapsed", "news"),
    [
        ({"a": 1}, {"a": 1}, 5, False),
        ({"a": 1}, {"a": 2}, 0, True),
        ({"a": 1}, {"a": 1, "b": 2}, 0, True),
        ({"at": "x", "a": [1]}, {"at": "y", "a": [1]}, 1, False),  # `at` stamps are no news
        ({"a": [1, 2]}, {"a": [1]}, 0, True),
        ({"age_seconds": 10.0}, {"age_seconds": 13.0}, 3.0, False),  # grew with the clock
        ({"age_seconds": 10.0}, {"age_seconds": 10.0 + 3.0 + AGE_TOLERANCE_SECONDS + 0.1}, 3.0, True),
        ({"x_age_seconds": 4.0}, {"x_age_seconds": 0.5}, 1.0, True),  # a new heartbeat
        ({"age_seconds": None}, {"age_seconds": None}, 1.0, False),
        ({"age_seconds": None}, {"age_seconds": 1.0}, 1.0, True),
        ({"a": 1}, {"a": 1.0}, 0, True),  # another type
        ({"a": True}, {"a": 1}, 0, True),
    ],
)
def test_which_snapshots_are_news(sent: Any, new: Any, elapsed: float, news: bool) -> None:
    assert differs(sent, new, elapsed) is news


# -- the page and the links --------------------------------------------------------------------


def test_the_page_admits_its_own_inline_script_and_style_and_nothing_else() -> None:
    page = Page.load()
    html = page.body.decode()
    policy = page.headers["content-security-policy"]
    for kind in ("script", "style"):
        blocks = re.findall(rf"<{kind}>(.*?)</{kind}>", html, re.S)
        assert len(blocks) == 1
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}';" in policy
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html)  # no external assets
    assert "innerHTML" not in html  # data never becomes markup


def dashboard(settings: Settings) -> Dashboard:
    # Redis is never used: the collector is a fake (the client makes no connection until used).
    return Dashboard(Redis(), KeySpace("sc"), settings, "gw1", collect=FakeStatus())


def client(board: Dashboard) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgineer.to_asgi(board.handle)), base_url="http://127.0.0.1:9001"
    )


async def test_the_page_and_its_headers() -> None:
    async with client(dashboard(Settings(stream_auth="public"))) as http:
        answer = await http.get("/")
        assert answer.status_code == 200 and answer.headers["content-type"] == "text/html; charset=utf-8"
        assert "new EventSource(\"dashboard/events\")" in answer.text
        assert answer.headers["x-frame-options"] == "DENY"
        assert (await http.post("/")).status_code == 405
        assert (await http.get("/dashboard/nothing")).status_code == 404


async def test_a_link_in_token_mode_carries_a_short_read_token_for_that_task_alone() -> None:
    settings = Settings(stream_auth="token", secret=SECRET, gateway_url="https://streams.example/")
    async with client(dashboard(settings)) as http:
        answer = await http.get("/dashboard/link/examples/ProgressTask/7")
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert location.startswith("https://streams.example/stream/examples/ProgressTask/7?token=")
    grant = verify(SECRET, location.partition("?token=")[2])
    assert grant.streams == frozenset({TaskRef("examples", "ProgressTask", "7")}) and not grant.start
    assert grant.subject == "streamcoord dashboard"


async def test_a_link_in_public_mode_has_no_token_and_follows_the_registry_address() -> None:
    board = dashboard(Settings(stream_auth="public"))
    async with client(board) as http:
        # No snapshot has named this gateway's address yet, nor the settings a public URL.
        unknown = await http.get("/dashboard/link/examples/ProgressTask/7")
        assert unknown.status_code == 200 and "/stream/examples/ProgressTask/7\n" in unknown.text
        board.public_address = "http://0.0.0.0:8001"  # a wildcard: the host the operator used
        answer = await http.get("/dashboard/link/examples/ProgressTask/7")
        assert answer.headers["location"] == "http://127.0.0.1:8001/stream/examples/ProgressTask/7"
        board.public_address = "unix:/run/sc/gw.sock"
        assert (await http.get("/dashboard/link/examples/ProgressTask/7")).status_code == 200
        assert (await http.get("/dashboard/link/examples/Progress{Task/7")).status_code == 400
        assert (await http.get("/dashboard/link/examples/7")).status_code == 404


class EventsCall:
    """``GET /dashboard/events`` on a dashboard's ASGI app, with fake receive and send."""

    def __init__(self, board: Dashboard) -> None:
        self.sent: list[dict[str, Any]] = []
        self.got_snapshot = asyncio.Event()
        self.leave = asyncio.Event()
        scope = {
            "type": "http", "method": "GET", "path": "/dashboard/events", "headers": [],
            "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 9001),
            "client": ("127.0.0.1", 5), "root_path": "", "raw_path": b"/dashboard/events",
        }
        self.app = asyncio.create_task(asgineer.to_asgi(board.handle)(scope, self.receive, self.send))

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if b"event: status" in message.get("body", b""):
            self.got_snapshot.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent)


async def test_the_events_route_streams_snapshots_until_the_page_leaves() -> None:
    board = dashboard(Settings(stream_auth="public"))
    call = EventsCall(board)
    await asyncio.wait_for(call.got_snapshot.wait(), WAIT)
    assert board.snapshots.running and board.snapshots.subscriber_count == 1
    assert call.sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in call.sent[0]["headers"]
    assert call.body.startswith(b": stream open\nretry: 2000\n")
    assert decode(call.body[call.body.index(b"event: status"):])["n"] == 1
    call.leave.set()
    await asyncio.wait_for(call.app, WAIT)
    assert not board.snapshots.running and board.snapshots.subscriber_count == 0


async def test_a_closing_gateway_ends_the_pages_streams_cleanly() -> None:
    board = dashboard(Settings(stream_auth="public"))
    call = EventsCall(board)
    await asyncio.wait_for(call.got_snapshot.wait(), WAIT)
    board.snapshots.close()  # what Dashboard.close_for(gateway) does
    await asyncio.wait_for(call.app, WAIT)  # ended by itself: the page did not leave
    assert call.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert not board.snapshots.running
    again = EventsCall(board)  # a page reconnecting meanwhile: a 200 that ends at once
    await asyncio.wait_for(again.app, WAIT)
    assert again.sent[0]["status"] == 200 and b"event: status" not in again.body


async def test_closing_ends_every_page_at_once_and_later_ones_too(loop_parts: Any) -> None:
    snapshots, _, clock = loop_parts
    pages = [snapshots.subscribe() for _ in range(3)]
    await clock.sleeping()
    assert await pages[0].next(0) is not None  # took the first snapshot: now it waits
    waiting = asyncio.create_task(pages[0].next(WAIT))
    await asyncio.sleep(0)
    snapshots.close()
    assert await asyncio.wait_for(waiting, 1) is None  # at once, not after its wait
    assert all(page.ended for page in pages) and not snapshots.running
    late = snapshots.subscribe()
    assert late.ended and await asyncio.wait_for(late.next(WAIT), 1) is None
    assert not snapshots.running


async def test_the_admin_listener_refuses_a_name_and_mints_only_for_local_clients() -> None:
    """DNS rebinding: a page's own name in Host gets 421 on every admin route; a token is
    minted only for a client on this machine (a tunnel, a unix socket)."""
    from streamcoord.hosts import is_ip_or_localhost, is_loopback_client

    assert all(is_ip_or_localhost(h) for h in ("127.0.0.1:9001", "[::1]:9001", "10.2.3.4", "localhost:9001", "a.localhost", ""))
    assert not any(is_ip_or_localhost(h) for h in ("evil.example", "evil.example:9001", "127.0.0.1.evil.example"))
    assert is_loopback_client(("127.0.0.1", 5000)) and is_loopback_client(None) and is_loopback_client(("", 0))
    assert not is_loopback_client(("10.2.3.4", 5000))
    board = dashboard(Settings(stream_auth="token", secret=SECRET, gateway_url="https://streams.example/"))
    remote = httpx.ASGITransport(app=asgineer.to_asgi(board.handle), client=("10.2.3.4", 40000))
    async with httpx.AsyncClient(transport=remote, base_url="http://10.0.0.9:9001") as http:
        answer = await http.get("/dashboard/link/examples/ProgressTask/7")
    assert answer.status_code == 200 and "token=" not in answer.text and "port-forward" in answer.text
    from streamcoord.hosts import rebinding_guard_applies

    assert rebinding_guard_applies(("127.0.0.1", 9001)) and not rebinding_guard_applies(("/run/sc/gw.admin.sock", None))
