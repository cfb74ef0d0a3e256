"""``with_streams``: the example project and its streams from one uvicorn process, run as the
README shows it (``tests/asgi_with_streams.py``), on a unix socket, against the real redis-server
and a real worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from streamcoord import TaskRef
from streamcoord.tokens import mint

from .processes import REPO, Project, stop_process, wait_for
from .rawsse import RawSSE

pytestmark = pytest.mark.system

SECRET = "with-streams-secret-" + "x" * 40
APP = "https://app.example"
#: What uvicorn prints once the application started and the socket listens.
LISTENING = "Uvicorn running on unix socket"
#: uvicorn's exit status when the application's startup failed.
STARTUP_FAILURE = 3


@dataclass
class Site:
    """``uvicorn tests.asgi_with_streams:application --uds <socket>``."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def http(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket))
        return httpx.AsyncClient(transport=transport, base_url="http://site", timeout=10)


def launch(project: Project, name: str, *args: str, env: dict[str, str] | None = None, **settings: Any) -> Site:
    """Start the uvicorn process (not waiting for it); the caller stops it by its pid."""
    sock = project.directory / f"{name}.sock"  # a private tmp dir: uvicorn makes the socket 0666
    log = project.directory / f"{name}.log"
    env = {**(env or project.env(**settings)), "PYTHONWARNINGS": "default"}  # any warning shows in the log
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.asgi_with_streams:application", "--uds", str(sock), *args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    return Site(sock, process, log)


@contextlib.contextmanager
def running_site(project: Project, *args: str, name: str = "site", **settings: Any) -> Iterator[Site]:
    site = launch(project, name, *args, **settings)
    try:
        def listening() -> bool:
            if site.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {site.process.returncode}:\n{site.log_text()}")
            return LISTENING in site.log_text()

        wait_for(listening, 30, "uvicorn to listen")
        yield site
    finally:
        stop_process(site.process)


def assert_clean_log(site: Site) -> None:
    log = site.log_text()
    for sign in ("Traceback", "ERROR", "Task was destroyed", "Unclosed", "Warning"):
        assert sign not in log, log


async def open_stream(site: Site, path: str, headers: dict[str, str] | None = None) -> RawSSE:
    client = await RawSSE.open(site.socket, path, headers)
    await asyncio.wait_for(client.read_head(), 10)
    return client


async def open_when_free(site: Site, path: str) -> RawSSE:
    """``open_stream`` once the stream before has left its slot (its handler returns just after
    the client has its last byte)."""
    deadline = time.monotonic() + 5
    while (client := await open_stream(site, path)).status == 503 and time.monotonic() < deadline:
        client.close()
        await asyncio.sleep(0.05)
    return client


async def test_one_process_serves_the_streams_and_the_django_site(project: Project) -> None:
    with running_site(project) as site:
        project.worker()
        created = project.create_task("ProgressTask", "steps=5", "delay=0.05", start=True)
        client = await open_stream(site, created["stream"])
        try:
            assert client.status == 200 and client.headers["content-type"].startswith("text/event-stream")
            events = await asyncio.wait_for(client.events_until_end(), 20)
        finally:
            client.close()
        assert [e.event for e in events] == ["start", *["progress"] * 5, "complete"]
        assert [e.seq for e in events] == list(range(1, 8))  # each event once, none missing
        assert len({e.id for e in events}) == 7 and client.ended
        async with site.http() as http:
            login = await http.get("/admin/login/")
            assert login.status_code == 200 and "Django administration" in login.text  # Django's
            health, ready = await http.get("/health"), await http.get("/ready")
            assert (health.status_code, health.text) == (200, "OK")
            assert (ready.status_code, ready.text) == (200, "READY")
            stats = await http.get("/stats")  # the admin listener's, never here: Django's 404
            assert stats.status_code == 404 and "text/html" in stats.headers["content-type"]
            summary = await http.get(created["stream"])  # no text/event-stream: the outcome
            assert summary.json()["status"] == "completed"
        # Many tasks on one connection: the gateway's too (the first one is over already).
        more = [project.create_task("ProgressTask", "steps=3", "delay=0.05", start=True) for _ in range(2)]
        names = "&".join(f"task={c['app_label']}.{c['model']}:{c['id']}" for c in [created, *more])
        client = await open_stream(site, f"/streams?{names}")
        try:
            assert client.status == 200 and client.headers["content-type"].startswith("text/event-stream")
            events = await asyncio.wait_for(client.events_until_end(), 20)
        finally:
            client.close()
        assert sorted(e.event for e in events if e.event == "complete") == ["complete"] * 3
        assert len(events) == 7 + 2 * 5 and client.ended
    assert_clean_log(site)


async def test_token_auth_cors_and_the_stream_limit_are_the_gateways(project: Project) -> None:
    settings: dict[str, Any] = {"stream_auth": "token", "secret": SECRET, "cors_origins": APP, "max_connections": 1}
    with running_site(project, **settings) as site:
        project.worker(**settings)
        done = project.create_task("ProgressTask", "steps=5", "delay=0.05", start=True, **settings)
        pending = project.create_task("ProgressTask", "steps=1", **settings)
        async with site.http() as http:
            bare = await http.get(done["stream"], headers={"accept": "text/event-stream"})
            assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Bearer")
            preflight = {"origin": APP, "access-control-request-method": "GET"}
            allowed = await http.options(done["stream"], headers=preflight)
            assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == APP
            other = await http.options(done["stream"], headers={**preflight, "origin": "https://evil.example"})
            assert other.status_code == 403
        url = urlsplit(done["stream_url"])
        client = await open_stream(site, f"{url.path}?{url.query}", {"origin": APP})
        try:
            assert client.status == 200 and client.headers["access-control-allow-origin"] == APP
            events = await asyncio.wait_for(client.events_until_end(), 20)
        finally:
            client.close()
        assert [e.seq for e in events] == list(range(1, 8)) and events[-1].event == "complete"
        # max_connections open streams (here 1): a watcher of a task nobody starts holds one.
        ref = TaskRef(pending["app_label"], pending["model"], str(pending["id"]))
        watching = await open_when_free(site, f"{pending['stream']}?token={mint(SECRET, [ref], expires_in=600)}")
        try:
            assert watching.status == 200
            async with site.http() as http:
                refused = await http.get(done["stream_url"], headers={"accept": "text/event-stream"})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
                assert (await http.get("/health")).status_code == 200  # probes still answered
                assert (await http.get("/admin/login/")).status_code == 200  # Django is not capped
        finally:
            watching.close()
    assert_clean_log(site)


async def test_sigterm_ends_open_streams_and_stops_the_process_promptly(project: Project) -> None:
    with running_site(project) as site:
        project.worker(shutdown_grace_seconds=1)
        # 200 s of events: a shutdown that waited for the open stream would outlast every bound
        # below by far (the process.wait's 10 s is the assertion, with a margin a busy 2-core
        # machine cannot eat).
        created = project.create_task("ProgressTask", "steps=4000", "delay=0.05", start=True)
        client = await open_stream(site, created["stream"])
        try:
            first = [await asyncio.wait_for(client.next_event(), 10) for _ in range(3)]
            site.process.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(client.events_until_end(), 10)
            returncode = await asyncio.to_thread(site.process.wait, 10)  # raises if it lingers
        finally:
            client.close()
    assert client.ended  # the response ended cleanly: the terminating chunk, not a cut connection
    events = [e for e in first + rest if e is not None]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert "complete" not in [e.event for e in events]  # cut short: the client resumes elsewhere
    # uvicorn (0.29 and later) re-raises the signal once it shut down: killed by SIGTERM, 143 in
    # a shell, which systemd and container runtimes take for a clean stop.
    assert returncode == -signal.SIGTERM, site.log_text()
    assert "Application shutdown complete" in site.log_text()
    assert_clean_log(site)


async def test_without_a_redis_url_the_announced_embedded_default_is_used(project: Project) -> None:
    embedded = dataclasses.replace(project, redis_url="")  # its processes are the fixture's to stop
    embedded.gateway()  # runserver_stream with nothing configured: announces its stand-in and secret
    created = embedded.create_task("ProgressTask", "steps=3", "delay=0.01", start=True, stream_auth="token")
    with running_site(embedded, stream_auth="token") as site:
        url = urlsplit(created["stream_url"])
        client = await open_stream(site, f"{url.path}?{url.query}")
        try:
            events = await asyncio.wait_for(client.events_until_end(), 20)
        finally:
            client.close()
    assert [e.seq for e in events] == list(range(1, 6)) and events[-1].event == "complete"
    assert_clean_log(site)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"STREAMCOORD_REDIS_URL": None}, "with_streams needs a Redis: set STREAMCOORD_REDIS_URL", id="no redis url"),
        pytest.param({"STREAMCOORD_STREAM_AUTH": "token"}, "no secret is set", id="token without secret"),
    ],
)
def test_a_startup_that_cannot_serve_streams_fails_saying_why(
    project: Project, change: dict[str, str | None], message: str
) -> None:
    env = project.env()
    for key, value in change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    site = launch(project, "failing", env=env)
    try:
        returncode = site.process.wait(30)
    finally:
        stop_process(site.process)
    assert returncode == STARTUP_FAILURE, site.log_text()
    assert message in site.log_text() and "Application startup failed" in site.log_text()
    assert not os.path.exists(project.directory / "embedded.url")  # no embedded default started


async def test_without_lifespan_streams_answer_503_and_django_still_serves(project: Project) -> None:
    with running_site(project, "--lifespan", "off") as site:
        async with site.http() as http:
            stream = await http.get("/stream/examples/ProgressTask/1")
            assert stream.status_code == 503 and "--lifespan on" in stream.text
            assert (await http.get("/ready")).status_code == 503
            assert (await http.get("/admin/login/")).status_code == 200
    assert "without the ASGI lifespan" in site.log_text()
