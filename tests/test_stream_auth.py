"""Who may watch and start a task: stream tokens and CORS, against real gateway processes and a
real redis-server (and, for lazy start, the example project's worker and commands)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.keys import KeySpace
from streamcoord.taskstate import State
from streamcoord.tokens import mint

from .processes import REPO, Gateway, Project
from .test_tokens import unsigned

pytestmark = pytest.mark.system

SECRET = "test-secret-" + "x" * 40
JOB = TaskRef("shop", "Job", "1")
APP = "https://app.example"
TOKEN_SETTINGS = {"stream_auth": "token", "secret": SECRET, "cors_origins": APP}


def http(gateway: Gateway) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(gateway.socket))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10)


def token(*refs: TaskRef, start: bool = False, expires_in: float = 600, secret: str = SECRET) -> str:
    return mint(secret, refs or (JOB,), expires_in=expires_in, start=start)


@pytest.fixture
def token_gateway(gateway_factory: object) -> Gateway:
    return gateway_factory(**TOKEN_SETTINGS)  # type: ignore[operator, no-any-return]


async def write_job(event_log: EventLog, count: int = 3) -> None:
    writer = event_log.writer(JOB)
    for step in range(1, count + 1):
        await writer.append("progress", {"step": step})
    await writer.append("complete", {"message": "done"}, final_value={"total": count})


REFUSED = {
    "no token": ({}, 401),
    "garbage": ({"token": "abc.def.ghi"}, 401),
    "other secret": ({"token": token(secret="y" * 40)}, 401),
    "expired": ({"token": mint(SECRET, [JOB], expires_in=60, now=time.time() - 3600)}, 401),
    "tampered": ({"token": token()[:-4] + "AAAA"}, 401),
    "alg none": ({"token": unsigned({"streams": [JOB.label], "exp": int(time.time()) + 600})}, 401),
    "other stream": ({"token": token(TaskRef("shop", "Job", "2"))}, 403),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_refused_request_gets_no_byte_of_the_stream_and_learns_nothing(
    token_gateway: Gateway, event_log: EventLog, case: str
) -> None:
    await write_job(event_log)
    query, status = REFUSED[case]
    answers = []
    async with http(token_gateway) as client:
        # A task with events, an unknown task, an unknown model: the same answer for each.
        for path in ("/stream/shop/Job/1", "/stream/Job/1", "/stream/shop/Job/999", "/stream/shop/Nope/1"):
            if case == "other stream" and path != "/stream/shop/Job/1":
                continue  # the token names shop.Job:2: only a path that is not it applies
            answer = await client.get(path, params=query, headers={"accept": "text/event-stream"})
            assert answer.status_code == status, (path, answer.text)
            assert answer.headers["content-type"].startswith("text/plain")
            assert "data:" not in answer.text and "total" not in answer.text
            if status == 401:
                assert answer.headers["www-authenticate"].startswith("Bearer")
            answers.append(answer.text)
    assert len(set(answers)) == 1, answers
    # The same holds for the header form of the token.
    if "token" in query:
        async with http(token_gateway) as client:
            answer = await client.get("/stream/shop/Job/1", headers={"authorization": f"Bearer {query['token']}"})
        assert answer.status_code == status


async def test_a_refused_request_touches_no_redis(token_gateway: Gateway, event_log: EventLog, redis: Redis) -> None:
    await write_job(event_log)
    await asyncio.sleep(0.2)  # let the gateway's own startup commands pass
    before = int((await redis.info("stats"))["total_commands_processed"])
    async with http(token_gateway) as client:
        for _ in range(20):
            assert (await client.get("/stream/shop/Job/1", params={"token": "junk"})).status_code == 401
    after = int((await redis.info("stats"))["total_commands_processed"])
    # The hub's idle blocking reads go on (one per block_ms) and INFO counts itself: far fewer
    # than one command per refused request.
    assert after - before < 10, after - before


async def test_a_valid_token_streams_and_resumes(token_gateway: Gateway, event_log: EventLog, sse: object) -> None:
    await write_job(event_log, 5)
    good = token()
    for path, headers in (
        (f"/stream/shop/Job/1?token={good}", {}),
        ("/stream/Job/1", {"authorization": f"Bearer {good}"}),  # no app label: the token names it
    ):
        client = await sse(token_gateway.socket, path, headers)  # type: ignore[operator]
        assert client.status == 200
        events = await asyncio.wait_for(client.events_until_end(), 10)
        assert [e.event for e in events] == ["progress"] * 5 + ["complete"]
    resumed = await sse(token_gateway.socket, f"/stream/shop/Job/1?token={good}", {"last-event-id": events[2].id})  # type: ignore[operator]
    rest = await asyncio.wait_for(resumed.events_until_end(), 10)
    assert [e.seq for e in rest] == [e.seq for e in events[3:]]


async def test_the_ended_task_summary_also_needs_a_token(token_gateway: Gateway, event_log: EventLog) -> None:
    await write_job(event_log)
    async with http(token_gateway) as client:
        assert (await client.get("/stream/shop/Job/1")).status_code == 401
        summary = await client.get("/stream/shop/Job/1", params={"token": token()})
    assert summary.status_code == 200 and summary.json()["final_value"] == {"total": 3}


# -- lazy start ----------------------------------------------------------------------------


async def state_of(redis: Redis, ref: TaskRef) -> str:
    return (await redis.hget(KeySpace().state(ref), "state") or b"").decode()


async def test_only_a_start_granting_token_starts_a_pending_task(project: Project, redis: Redis, sse: object) -> None:
    gateway = project.gateway(**TOKEN_SETTINGS)
    project.worker(**TOKEN_SETTINGS)
    created = project.create_task("ProgressTask", "steps=3", "delay=0.01", secret=SECRET)
    ref = TaskRef(created["app_label"], created["model"], str(created["id"]))
    watching = await sse(gateway.socket, f"{created['stream']}?token={token(ref)}")  # type: ignore[operator]
    assert watching.status == 200  # it may watch: the stream stays open, waiting for a start
    async with http(gateway) as client:
        head = await client.head(created["stream"], params={"token": token(ref, start=True)})
    assert head.status_code == 200  # a HEAD never starts anything
    await asyncio.sleep(1.0)  # a worker would have run the 3 steps by now, had it been started
    assert await state_of(redis, ref) == State.PENDING
    assert await redis.xlen(KeySpace().jobs()) == 0
    # The URL create_task printed grants the start.
    url = urlsplit(created["stream_url"])
    assert url.path == created["stream"] and parse_qs(url.query)["token"]
    client = await sse(gateway.socket, f"{url.path}?{url.query}")  # type: ignore[operator]
    events = await asyncio.wait_for(client.events_until_end(), 30)
    assert [e.event for e in events][-1] == "complete"
    # The client that was only watching sees the same run.
    assert [e.id for e in await asyncio.wait_for(watching.events_until_end(), 30)] == [e.id for e in events]
    assert jwt.decode(parse_qs(url.query)["token"][0], SECRET, algorithms=["HS256"])["start"] is True


def test_create_task_prints_an_absolute_stream_url_under_the_gateway_url(project: Project) -> None:
    created = project.create_task("ProgressTask", "steps=1", secret=SECRET, gateway_url="https://stream.example/")
    assert created["stream_url"].startswith(f"https://stream.example{created['stream']}?token=")


# -- CORS ----------------------------------------------------------------------------------


async def test_cors_allows_the_listed_origin_and_no_other(token_gateway: Gateway, event_log: EventLog, sse: object) -> None:
    await write_job(event_log)
    path = f"/stream/shop/Job/1?token={token()}"
    allowed = await sse(token_gateway.socket, path, {"origin": APP, "accept": "text/event-stream"})  # type: ignore[operator]
    assert allowed.headers["access-control-allow-origin"] == APP
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in allowed.headers["vary"]
    refused = await sse(token_gateway.socket, path, {"origin": "https://evil.example", "accept": "text/event-stream"})  # type: ignore[operator]
    assert refused.status == 200 and "access-control-allow-origin" not in refused.headers
    async with http(token_gateway) as client:
        # Refusals carry CORS headers too, so the page can tell a 401 from a network error.
        unauthorized = await client.get("/stream/shop/Job/1", headers={"origin": APP})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == APP
        summary = await client.get(path, headers={"origin": APP})
        assert summary.headers["vary"] == "Accept, Origin"


async def test_a_preflight_is_answered_for_the_listed_origin_only(token_gateway: Gateway) -> None:
    asking = {"access-control-request-method": "GET", "access-control-request-headers": "authorization"}
    async with http(token_gateway) as client:
        allowed = await client.options("/stream/shop/Job/1", headers={"origin": APP, **asking})
        refused = await client.options("/stream/shop/Job/1", headers={"origin": "https://evil.example", **asking})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == APP
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


# -- configuration mistakes stop a gateway with a clear message ----------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"STREAMCOORD_STREAM_AUTH": "token"}, "STREAMCOORD_SECRET"),
        ({"STREAMCOORD_SECRET": "short"}, "at least 32 characters"),
        ({"STREAMCOORD_SECRET": SECRET, "STREAMCOORD_CORS_ORIGINS": "*"}, "only with stream_auth=public"),
    ],
)
def test_a_gateway_refuses_to_start_without_what_tokens_need(tmp_path: Path, settings: dict[str, str], message: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "STREAMCOORD_REDIS_URL": "redis://127.0.0.1:1/0", **settings}
    result = subprocess.run(
        [sys.executable, "-m", "streamcoord", "gateway", "--socket", str(tmp_path / "gw.sock")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "gw.sock").exists()
