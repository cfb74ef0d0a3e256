"""streamcoord installed into someone else's project, the way a new user does it.

The wheel is built from the repository's sources and installed into a fresh virtualenv outside
the repository. ``django-admin startproject`` makes a project that has its own top-level
``worker`` and ``tests`` packages, and an app whose task has a UUID primary key. Then, with only
the installed distribution: migrate, ``runworker``, ``runserver_stream``; sync and async views
that start tasks, served by uvicorn (ASGI) and by ``runserver`` (WSGI), answer without hanging
while the Redis connections of the Django side stay constant; a stream is followed to its end
with the token of ``stream_url``; the admin's cancel action stops a running task.

The fresh virtualenv gets its dependencies (Django, redis-py, uvicorn, ...) from the suite's
own environment through a path file (no network, no minutes of pip), but not streamcoord: the
suite's editable install is only activated by a path file processed in a site directory, which
that one is not. ``test_only_the_distribution_is_importable`` proves it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from httpx_sse import connect_sse

from .processes import REPO, RedisServer, stop_process, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

SECRET = "installed-project-secret-0123456789abcdef"
#: The gateway's public URL as the project's pages name it; the test reaches the gateway
#: through its unix socket, so the host is only a name.
GATEWAY_URL = "http://streams.mysite.test"
#: Requests per server and kind of view: enough to see a connection leak per request.
REQUESTS = 50

SETTINGS_TAIL = """

# --- added for streamcoord ---
INSTALLED_APPS += ["django_app", "shop"]
DATABASES["default"]["NAME"] = BASE_DIR / "db.sqlite3"
DATABASES["default"]["OPTIONS"] = {{
    "init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE", "timeout": 20,
}}
ALLOWED_HOSTS = ["*"]
STREAMCOORD = {{
    "REDIS_URL": {redis_url!r},
    "SECRET": {secret!r},
    "GATEWAY_URL": {gateway_url!r},
}}
"""

MODELS = '''
import asyncio
import uuid

from django.db import models

from django_app.models import StreamTask


class ExportTask(StreamTask):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    steps = models.PositiveIntegerField(default=3)
    delay = models.FloatField(default=0.05)

    async def process(self):
        for step in range(1, self.steps + 1):
            await asyncio.sleep(self.delay)
            await self.send_event("progress", {"step": step})
        return {"steps": self.steps}
'''

VIEWS = '''
import json

from django.http import HttpResponse

from django_app.coordinator import coordinator

from .models import ExportTask


def _answer(task, outcome):
    body = {"id": str(task.pk), "started": outcome.describe(), "stream_url": task.stream_url()}
    return HttpResponse(json.dumps(body), content_type="application/json")


def start(request):
    """A plain sync view: create a task and start it."""
    task = ExportTask.objects.create(steps=int(request.GET.get("steps", 3)), delay=float(request.GET.get("delay", 0.05)))
    return _answer(task, coordinator.start_task_sync(task))


async def astart(request):
    """The same, as an async view."""
    task = await ExportTask.objects.acreate(steps=int(request.GET.get("steps", 3)), delay=float(request.GET.get("delay", 0.05)))
    return _answer(task, await coordinator.start_task(task))
'''

URLS = '''
from django.contrib import admin
from django.urls import path

from shop import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("start/", views.start),
    path("astart/", views.astart),
]
'''

ADMIN = '''
from django_app.admin import register_task_models

register_task_models()
'''


@dataclass
class Site:
    """The installed project and the processes serving it."""

    venv_python: Path
    project: Path
    redis: RedisServer
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run(
            [str(self.venv_python), *args], cwd=self.project, env=self.env,
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def start(self, name: str, *args: str, ready: str) -> Path:
        log = self.project / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([str(self.venv_python), *args], cwd=self.project, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.processes[name] = process

        def started() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()}")
            return ready in log.read_text(errors="replace")

        wait_for(started, 60, name)
        return log

    def django_connections(self) -> int:
        """Redis connections the Django side holds (streamcoord names them by role and pid)."""
        client = redis_sync.Redis(unix_socket_path=str(self.redis.socket))
        try:
            return sum(1 for c in client.client_list() if c.get("name", "").startswith("streamcoord:django:"))
        finally:
            client.close()


def _copy_sources(destination: Path) -> None:
    """What the distribution is built from (no caches, no virtualenvs, no build output)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    for package in ("streamcoord", "django_app"):
        shutil.copytree(REPO / package, destination / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _free_port() -> int:
    """A port the kernel picks (runserver cannot be told to pick one itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("installed")
    source, dist = root / "src", root / "dist"
    source.mkdir()
    _copy_sources(source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        check=True, timeout=300,
    )
    (wheel,) = dist.glob("streamcoord-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    venv_python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv_python), "install", "-q", "--no-deps", str(wheel)],
        check=True, timeout=300,
    )
    fresh_site = Path(subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip())
    # The dependencies: the suite's site-packages as a plain path (its .pth files, among them
    # the editable install of streamcoord, are not processed from there).
    (fresh_site / "suite-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    redis_server = RedisServer(root / "redis").start()
    project = root / "mysite"
    project.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(root), "DJANGO_SETTINGS_MODULE": "mysite.settings",
           "DJANGO_SUPERUSER_PASSWORD": "admin-password-1", "PYTHONUNBUFFERED": "1"}
    site = Site(venv_python, project, redis_server, env)
    try:
        site.run("-m", "django", "startproject", "mysite", ".")
        site.run("manage.py", "startapp", "shop")
        # The project's own packages with names a library might take.
        for own in ("worker", "tests"):
            (project / own).mkdir()
            (project / own / "__init__.py").write_text(f'ROLE = "the project\'s own {own}"\n')
        (project / "shop" / "models.py").write_text(MODELS)
        (project / "shop" / "views.py").write_text(VIEWS)
        (project / "shop" / "admin.py").write_text(ADMIN)
        (project / "mysite" / "urls.py").write_text(URLS)
        with open(project / "mysite" / "settings.py", "a") as settings:
            settings.write(SETTINGS_TAIL.format(redis_url=redis_server.url, secret=SECRET, gateway_url=GATEWAY_URL))
        site.run("manage.py", "makemigrations", "shop")
        site.run("manage.py", "migrate", "--noinput")
        site.run("manage.py", "createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com")
        yield site
    finally:
        for process in site.processes.values():
            stop_process(process)
        redis_server.stop()


def test_only_the_distribution_is_importable(site: Site) -> None:
    """streamcoord and django_app come from the fresh virtualenv; the project's own ``worker``
    and ``tests`` are the project's; nothing example-only was installed."""
    probe = textwrap.dedent("""
        import importlib.util, json, django_app, streamcoord, worker, tests
        print(json.dumps({
            "django_app": django_app.__file__, "streamcoord": streamcoord.__file__,
            "worker": worker.ROLE, "tests": tests.ROLE,
            "examples": importlib.util.find_spec("django_app.examples") is not None,
            "project": importlib.util.find_spec("django_app.project") is not None,
            "typed": [importlib.util.find_spec(p).submodule_search_locations[0] for p in ("django_app", "streamcoord")],
        }))
    """)
    found = json.loads(site.run("-c", probe))
    venv = str(site.venv_python.parent.parent)
    assert found["django_app"].startswith(venv) and found["streamcoord"].startswith(venv), found
    assert found["worker"] == "the project's own worker" and found["tests"] == "the project's own tests"
    assert not found["examples"] and not found["project"], found
    assert all((Path(p) / "py.typed").exists() for p in found["typed"])
    # The commands that once imported a top-level `worker` of ours.
    assert "--reload" in site.run("manage.py", "runworker", "--help")
    assert "--socket" in site.run("manage.py", "runserver_stream", "--help")


@pytest.fixture(scope="module")
def serving(site: Site) -> Iterator[dict[str, Any]]:
    """runworker, runserver_stream, the project under uvicorn (ASGI) and under runserver (WSGI)."""
    site.start("worker", "manage.py", "runworker", "--concurrency", "20", ready="started")
    gateway = site.project / "gateway.sock"
    site.start("gateway", "manage.py", "runserver_stream", "--socket", str(gateway), ready="listening on")
    asgi = site.project / "asgi.sock"
    site.start("uvicorn", "-m", "uvicorn", "mysite.asgi:application", "--uds", str(asgi), ready="Uvicorn running")
    for _ in range(5):  # runserver cannot pick a port itself: take one the kernel picked
        port = _free_port()
        try:
            site.start("runserver", "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload", ready="Quit the server with")
            break
        except RuntimeError as exc:
            if "already in use" not in str(exc):
                raise
    else:
        raise RuntimeError("runserver found no free port")
    yield {
        "gateway": httpx.HTTPTransport(uds=str(gateway)),
        "uvicorn": (httpx.HTTPTransport(uds=str(asgi)), "http://mysite.test"),
        "runserver": (httpx.HTTPTransport(), f"http://127.0.0.1:{port}"),
    }


def _follow(transport: httpx.HTTPTransport, stream_url: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event of a stream, to its terminal one."""
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.Client(transport=transport, timeout=30) as client, connect_sse(client, "GET", stream_url) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            events.append((sse.event, json.loads(sse.data)))
            if sse.event in ("complete", "error", "cancelled"):
                break
    return events


@pytest.mark.parametrize("server", ["uvicorn", "runserver"])
@pytest.mark.parametrize("view", ["start", "astart"])
def test_views_start_tasks_without_hanging_or_leaking_connections(serving: dict[str, Any], site: Site, server: str, view: str) -> None:
    transport, base = serving[server]
    with httpx.Client(transport=transport, base_url=base, timeout=10) as client:
        # The first request makes the process's one client; from then on the count stays.
        first = client.get(f"/{view}/")
        assert first.status_code == 200, first.text
        before = site.django_connections()
        slowest = 0.0
        answers = []
        for _ in range(REQUESTS):
            began = time.monotonic()
            response = client.get(f"/{view}/")  # the client's timeout (10 s) catches a hang
            slowest = max(slowest, time.monotonic() - began)
            assert response.status_code == 200, response.text
            answers.append(response.json())
        after = site.django_connections()
    print(f"{server} /{view}/: {REQUESTS} requests, slowest {slowest * 1000:.0f} ms, django connections {before} -> {after}")
    assert after == before, f"{server} /{view}/: Redis connections of the Django side went {before} -> {after}"
    assert all(a["started"] == "queued" for a in answers), answers[:3]
    assert len({a["id"] for a in answers}) == REQUESTS


def test_a_uuid_task_followed_to_its_end_with_its_stream_url(serving: dict[str, Any]) -> None:
    transport, base = serving["uvicorn"]
    with httpx.Client(transport=transport, base_url=base, timeout=10) as client:
        answer = client.get("/start/", params={"steps": 5}).json()
    assert re.fullmatch(r"[0-9a-f-]{36}", answer["id"]), answer
    assert answer["stream_url"].startswith(f"{GATEWAY_URL}/stream/shop/ExportTask/{answer['id']}?token="), answer
    events = _follow(serving["gateway"], answer["stream_url"])
    assert [e for e, _ in events] == ["progress"] * 5 + ["complete"], events
    assert [d["step"] for _, d in events[:-1]] == [1, 2, 3, 4, 5]
    assert {d["_task_id"] for _, d in events} == {answer["id"]}
    # Without the token: refused.
    bare = answer["stream_url"].split("?", 1)[0]
    with httpx.Client(transport=serving["gateway"], timeout=10) as client:
        assert client.get(bare).status_code == 401


def test_the_admin_cancel_action_stops_a_running_task(serving: dict[str, Any], site: Site) -> None:
    transport, base = serving["runserver"]
    with httpx.Client(transport=transport, base_url=base, timeout=10, follow_redirects=True) as client:
        answer = client.get("/start/", params={"steps": 200, "delay": 0.1}).json()
        login = client.get("/admin/login/")
        csrf = client.cookies["csrftoken"]
        assert login.status_code == 200
        logged_in = client.post("/admin/login/?next=/admin/", data={
            "username": "admin", "password": site.env["DJANGO_SUPERUSER_PASSWORD"], "csrfmiddlewaretoken": csrf,
        })
        assert logged_in.status_code == 200 and "Log out" in logged_in.text, logged_in.text[:500]
        changelist = "/admin/shop/exporttask/"
        with httpx.Client(transport=serving["gateway"], timeout=30) as watcher, \
                connect_sse(watcher, "GET", answer["stream_url"]) as source:
            events = source.iter_sse()
            first = next(events)
            assert first.event == "progress", first
            done = client.post(changelist, data={
                "action": "cancel_tasks", "_selected_action": answer["id"], "csrfmiddlewaretoken": client.cookies["csrftoken"],
            })
            assert done.status_code == 200, done.text[:500]
            rest = []
            for sse in events:
                rest.append(sse.event)
                if sse.event in ("complete", "error", "cancelled"):
                    break
        assert rest[-1] == "cancelled", rest
        page = client.get(f"{changelist}{answer['id']}/change/")
        assert page.status_code == 200
    status = site.run("manage.py", "shell", "-c", f"from shop.models import ExportTask; print(ExportTask.objects.get(pk='{answer['id']}').status)")
    assert status.strip().splitlines()[-1] == "cancelled"  # after the shell's "N objects imported"


def test_the_servers_stop_on_sigterm(serving: dict[str, Any], site: Site) -> None:
    """No thread of ours keeps a server alive (the predecessor's per-request loops did)."""
    for name in ("uvicorn", "runserver", "worker", "gateway"):
        process = site.processes[name]
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"{name} did not stop on SIGTERM") from None
        # uvicorn 0.29+ re-raises the signal once it has shut down: -15 is its clean stop.
        assert code in (0, -signal.SIGTERM), (name, code)
