"""Load-balanced gateways (issue #6): Debian's nginx, running deploy/nginx/streamcoord.conf, in
front of three ``runserver_stream`` gateways, with two workers and the session's redis-server.

The production file is the single source: the test reads it and replaces only the upstream
``server`` lines (with the gateways' unix sockets; the Django site's with a gateway's too,
which answers 404 to anything but streams and probes, as a site without such pages would;
tests/test_js_helper_browser.py runs Django there) and the ``listen`` address (a unix socket
in the test's directory: never a fixed TCP port), then wraps it in a minimal nginx.conf of its
own (pid, logs and temp paths in the test's directory). Two test-only lines sit at the http level of
that wrapper and reach the config's locations by inheritance: ``X-Test-Upstream`` (which gateway
served a response) and ``proxy_ignore_headers X-Accel-Buffering``, so that what the tests see
comes from the config's own ``proxy_buffering off``, not from the gateways' header.

1. 300 clients on 30 tasks, through nginx to three gateways; ``kill -9`` of one mid-stream:
   its clients resume through nginx with Last-Event-ID on the others, and every client ends
   with the exact sequence; nobody else is disturbed.
2. The rendered config passes ``nginx -t``; /health and /ready pass through, /stats does not
   (the gateways serve it on their admin listeners only, which nginx never names);
   a live event reaches the client while the stream stays open.
3. Backpressure: a client that stops reading is cut by its gateway, because unbuffered nginx
   reads only as fast as the client does. (nginx 1.22 passes small chunks on promptly even
   with ``proxy_buffering on``; this is the test that tells the two apart.)

nginx is stopped by its master's pid (SIGTERM, then SIGKILL) in ``finally``; every wait is
bounded; measured times are printed (``pytest -s``), never asserted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from redis.asyncio import Redis

from streamcoord.client import streams_path
from streamcoord.keys import TaskRef
from streamcoord.taskstate import TERMINAL_EVENTS

from .processes import REPO, Project, stop_process, wait_for
from .rawsse import RawSSE, SSEEvent
from .workloads import Tally, assert_gap_free, create_tasks_streamed, set_continue, triples

pytestmark = pytest.mark.system

CONF = REPO / "deploy" / "nginx" / "streamcoord.conf"
UPSTREAM = "streamcoord_gateways"
DJANGO_UPSTREAM = "streamcoord_django"
TERMINAL = frozenset(TERMINAL_EVENTS)
#: Upstream parameters for the test: a dead gateway is retried after a second, not five.
SERVER_PARAMS = "max_fails=1 fail_timeout=1s"


@pytest.fixture
async def r(redis: Redis) -> Any:
    """The session's Redis, emptied before the test (``redis``) and after it (the next test's
    fresh database numbers its tasks from 1 again)."""
    yield redis
    await redis.flushall()


# -- the config, rendered for the test ------------------------------------------------------


def replace_servers(conf: str, name: str, servers: str) -> str:
    """``conf`` with the ``server`` lines of ``upstream name`` replaced by ``servers``."""
    block = re.search(rf"^upstream\s+{name}\s*\{{.*?^\}}", conf, re.M | re.S)
    assert block, f"{CONF} has no `upstream {name} {{ ... }}` block"
    server_line = re.compile(r"^[ \t]*server\s+[^;]+;[^\n]*\n", re.M)  # not the commented ones
    assert server_line.findall(block.group()), f"no `server` line in the upstream {name} of {CONF}"
    replaced = iter([servers])  # the first server line becomes the new ones, the others go
    upstream = server_line.sub(lambda _: next(replaced, ""), block.group())
    return conf[: block.start()] + upstream + conf[block.end():]


def render(
    conf: str, gateways: Sequence[Path], listen: Path, access_log: Path | None = None, *, django: Path
) -> str:
    """``conf`` with the gateways' upstream ``server`` lines replaced by ``gateways`` (unix
    sockets), the Django site's by ``django`` (a unix socket), every ``listen`` address replaced
    by ``listen`` (its parameters kept), and its access_log line removed (or, given
    ``access_log``, pointed there)."""
    gateway_lines = "".join(f"    server unix:{path} {SERVER_PARAMS};\n" for path in gateways)
    rendered = replace_servers(conf, UPSTREAM, gateway_lines)
    rendered = replace_servers(rendered, DJANGO_UPSTREAM, f"    server unix:{django};\n")
    rendered, listens = re.subn(r"^([ \t]*listen\s+)[^\s;]+", rf"\g<1>unix:{listen}", rendered, flags=re.M)
    assert listens >= 1, f"no `listen` line in {CONF}"
    # The test's own access log (http-level, a format of its own) applies instead.
    keep = "" if access_log is None else rf"\g<1>{access_log} \g<2>;\n"
    rendered, logs = re.subn(r"^([ \t]*access_log\s+)\S+\s+([^;]+);\n", keep, rendered, flags=re.M)
    assert logs == 1, f"{CONF} should set its access_log once (a format without the query)"
    return rendered


def nginx_binary() -> str:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        raise RuntimeError("nginx is not installed: apt-get install -y nginx")
    return binary


@dataclass
class Nginx:
    """An nginx master (``daemon off``) of the test's own, serving the rendered config."""

    directory: Path
    gateways: Sequence[Path]
    #: Keep the config's own access_log (pointed at ``shipped_log``) instead of the test's.
    shipped_logging: bool = False
    #: The Django site's unix socket; by default the first gateway's (these tests are about
    #: the gateways: their public socket answers 404 to what they do not serve).
    django: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    checked: str = ""  # what `nginx -t` said

    @property
    def socket(self) -> Path:
        return self.directory / "nginx.sock"

    @property
    def conf(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def shipped_log(self) -> Path:
        return self.directory / "shipped-access.log"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temp = self.directory / "temp"
        temp.mkdir(exist_ok=True)
        rendered = self.directory / "streamcoord.conf"
        kept = self.shipped_log if self.shipped_logging else None
        django = self.django or self.gateways[0]
        rendered.write_text(render(CONF.read_text(), self.gateways, self.socket, kept, django=django))
        # As root, nginx's workers would run as `nobody`, which can neither reach the gateways'
        # sockets (mode 0660) nor enter the test's directory (0700): keep them root.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\n"
            f"pid {self.directory}/nginx.pid;\nerror_log {self.error_log} info;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            "    log_format sc '$status $upstream_addr \"$http_last_event_id\" $request_time $request_uri';\n"
            f"    access_log {self.access_log} sc;\n"
            + "".join(f"    {kind}_temp_path {temp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + "    # test-only, inherited by the config's locations (none sets its own):\n"
            "    add_header X-Test-Upstream $upstream_addr always;\n"
            "    proxy_ignore_headers X-Accel-Buffering;\n"
            f"    include {rendered};\n"
            "}\n"
        )

    def command(self, *args: str) -> list[str]:
        return [nginx_binary(), "-p", str(self.directory), "-c", str(self.conf), "-e", str(self.error_log), *args]

    def start(self) -> Nginx:
        self.write()
        check = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30, check=False)
        self.checked = check.stdout + check.stderr
        assert check.returncode == 0, f"nginx -t failed:\n{self.checked}"
        with open(self.directory / "nginx.out", "wb") as out:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log_tail()}")
            return self.socket.exists()

        wait_for(listening, 10, "nginx to listen")
        return self

    def stop(self) -> None:
        """SIGTERM (fast shutdown: open streams would hold a graceful SIGQUIT up), then kill."""
        if self.process is not None:
            stop_process(self.process)

    def log_tail(self, chars: int = 3000) -> str:
        text = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
        return text[-chars:]


@contextlib.contextmanager
def running_nginx(directory: Path, gateways: Sequence[Path]) -> Iterator[Nginx]:
    nginx = Nginx(directory, gateways)
    try:
        yield nginx.start()
    finally:
        nginx.stop()


def through(nginx: Nginx) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(nginx.socket)), base_url="http://nginx", timeout=10
    )


def served_by(value: str | None) -> str:
    """The gateway that answered, from ``$upstream_addr`` (a list when nginx failed over)."""
    return (value or "").split(",")[-1].strip().removeprefix("unix:")


# -- a client that resumes through nginx ------------------------------------------------------


@dataclass
class Connection:
    gateway: str  # the socket of the gateway that served it
    opened: float
    events: int = 0
    terminal: bool = False


@dataclass(eq=False)  # compared and hashed by identity
class Follower:
    """One SSE client of one task: reconnects with Last-Event-ID until the terminal event."""

    path: str
    events: list[SSEEvent] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    attempts: int = 0  # connections tried, including refused ones
    statuses: list[int] = field(default_factory=list)  # non-200 answers
    errors: list[str] = field(default_factory=list)
    drops: list[float] = field(default_factory=list)  # when a stream ended without its terminal
    resumed: list[tuple[float, float]] = field(default_factory=list)  # drop -> 200, drop -> event
    done: bool = False

    @property
    def reconnects(self) -> int:
        return len(self.connections) - 1

    async def run(self, socket: Path, max_attempts: int = 30) -> None:
        while self.attempts < max_attempts:
            self.attempts += 1
            last_id = self.events[-1].id if self.events else None
            dropped = self.drops[-1] if self.drops else None
            client = None
            try:
                client = await RawSSE.open(socket, self.path, {"Last-Event-ID": last_id} if last_id else None)
                await client.read_head()
                if client.status != 200:
                    self.statuses.append(client.status)
                    await asyncio.sleep(0.1)
                    continue
                connection = Connection(served_by(client.headers.get("x-test-upstream")), time.monotonic())
                self.connections.append(connection)
                while (event := await client.next_event()) is not None:
                    if dropped is not None and connection.events == 0:
                        self.resumed.append((connection.opened - dropped, time.monotonic() - dropped))
                    self.events.append(event)
                    connection.events += 1
                    if event.event in TERMINAL:
                        connection.terminal = self.done = True
                        return
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.errors.append(repr(exc))  # a reset, or EOF in the middle of a chunk
            finally:
                if client is not None:
                    client.close()
            self.drops.append(time.monotonic())
        self.errors.append(f"gave up after {max_attempts} attempts")


def summary(values: Sequence[float]) -> str:
    if not values:
        return "none"
    ms = sorted(v * 1000 for v in values)
    return f"n={len(ms)} median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms"


# -- 1. three gateways, kill -9 one mid-stream -------------------------------------------------


@pytest.mark.timeout(150)
async def test_300_clients_through_nginx_survive_kill_9_of_a_gateway(
    r: Redis, project: Project, tmp_path: Path
) -> None:
    gateways = [project.gateway(f"gw{i}") for i in (1, 2, 3)]
    workers = [project.worker(f"w{i}", concurrency=20) for i in (1, 2)]
    tasks, per_task, steps = 30, 10, 40
    expected_types = ["start"] + ["progress"] * steps + ["complete"]

    with running_nginx(tmp_path / "nginx", [g.socket for g in gateways]) as nginx:
        async with through(nginx) as http:
            health = await http.get("/health")
            assert (health.status_code, health.text) == (200, "OK"), health.text

        followers: list[Follower] = []
        running: list[asyncio.Task[None]] = []
        created_tasks: list[dict[str, Any]] = []
        try:
            async for created in create_tasks_streamed(project, tasks, "ProgressTask", f"steps={steps}", "delay=0.1"):
                assert created["started"] is True, created
                created_tasks.append(created)
                for _ in range(per_task):
                    follower = Follower(created["stream"])
                    followers.append(follower)
                    running.append(asyncio.create_task(follower.run(nginx.socket)))

            # ~1 s of events after every client got its first one, then kill -9 the gateway
            # that serves the most unfinished streams.
            deadline = time.monotonic() + 30
            while not all(f.events for f in followers):
                assert time.monotonic() < deadline, "not every client got an event within 30 s"
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            live = [f for f in followers if not f.done and f.connections]
            load = {g.socket: sum(1 for f in live if f.connections[-1].gateway == str(g.socket)) for g in gateways}
            victim = max(gateways, key=lambda g: load[g.socket])
            on_victim = [f for f in live if f.connections[-1].gateway == str(victim.socket)]
            others = [f for f in live if f not in on_victim]
            victim.process.kill()
            killed_at = time.monotonic()
            assert on_victim, f"no unfinished stream on any gateway at the kill: {load}"

            try:
                await asyncio.wait_for(asyncio.gather(*running), 60)
            except TimeoutError:
                unfinished = [f for f in followers if not f.done]
                raise AssertionError(
                    f"{len(unfinished)} clients did not finish within 60 s of the kill; first: "
                    f"{unfinished[0]}\n{nginx.log_tail()}"
                ) from None
        finally:
            for task in running:
                task.cancel()
        assert victim.process.wait(5) == -signal.SIGKILL

    # Every client: the exact sequence, 1..N, no gap, no duplicate, one terminal event, last.
    by_stream: dict[str, list[Follower]] = {}
    for follower in followers:
        by_stream.setdefault(follower.path, []).append(follower)
        what = f"{follower.path} ({follower.reconnects} reconnects, errors {follower.errors}, statuses {follower.statuses})"
        assert follower.done, what
        assert [e.event for e in follower.events] == expected_types, (what, triples(follower.events))
        assert_gap_free(follower.events, what)
        assert len({e.id for e in follower.events}) == len(follower.events), what
    assert len(by_stream) == tasks
    for path, group in by_stream.items():
        for follower in group[1:]:
            assert triples(follower.events) == triples(group[0].events), f"{path}: clients differ"

    # Clients of the killed gateway resumed on the others; nobody else was disturbed.
    victim_socket = str(victim.socket)
    for follower in on_victim:
        first = follower.connections[0]
        assert first.gateway == victim_socket
        if not first.terminal:  # (its terminal event might have left just before the kill)
            assert follower.reconnects >= 1, follower
            assert all(c.gateway != victim_socket for c in follower.connections[1:]), follower.connections
    for follower in others:
        assert follower.reconnects == 0, (follower.connections, follower.errors)
    reconnected = [f for f in followers if f.reconnects]
    total = sum(f.reconnects for f in followers)
    assert total >= 1 and len(reconnected) >= 1
    assert set(reconnected) <= set(on_victim), "a client of a live gateway reconnected"

    # nginx saw each reconnect with the Last-Event-ID the client had (the gap-free sequences
    # show that it passed it on).
    logged = nginx.access_log.read_text().splitlines()
    resumed_requests = [line for line in logged if '"-"' not in line and "/stream/" in line]
    assert len(resumed_requests) == sum(f.attempts - 1 for f in followers), resumed_requests[:5]

    detect = [f.drops[0] - killed_at for f in reconnected]
    to_head = [head for f in reconnected for head, _ in f.resumed]
    to_event = [event for f in reconnected for _, event in f.resumed]
    moved_to = {Path(c.gateway).name for f in reconnected for c in f.connections[1:]}
    load_names = {Path(k).name: v for k, v in load.items()}
    print(
        f"\nnginx failover: {len(followers)} clients on {tasks} tasks; killed {victim.socket.name} with "
        f"{len(on_victim)} unfinished streams (load {load_names}); {len(reconnected)} clients "
        f"reconnected {total} times (attempts incl. refused: {sum(f.attempts - 1 for f in followers)}, "
        f"non-200: {sum(len(f.statuses) for f in followers)}) onto {sorted(moved_to)}; "
        f"kill -> drop seen {summary(detect)}; drop -> 200 {summary(to_head)}; "
        f"drop -> first resumed event {summary(to_event)}"
    )
    assert "Traceback" not in "".join(w.log_text() for w in workers)


# -- 2. the config passes nginx -t and streams unbuffered ------------------------------------------


async def test_config_passes_nginx_t_and_streams_each_event_at_once(
    r: Redis, project: Project, sse: Any, tmp_path: Path
) -> None:
    gateway = project.gateway("gw1")
    project.worker("w1")
    with running_nginx(tmp_path / "nginx", [gateway.socket]) as nginx:
        assert "syntax is ok" in nginx.checked and "test is successful" in nginx.checked, nginx.checked
        rendered = (nginx.directory / "streamcoord.conf").read_text()
        assert f"server unix:{gateway.socket} {SERVER_PARAMS};" in rendered
        assert f"listen unix:{nginx.socket}" in rendered and "gateway1:8001" not in rendered
        assert f"server unix:{gateway.socket};" in rendered and "django:8000" not in rendered

        async with through(nginx) as http:
            for path, status, body in (("/health", 200, "OK"), ("/ready", 200, "READY"), ("/stats", 404, None)):
                response = await http.get(path)
                assert response.status_code == status, (path, response.text)
                if body is not None:
                    assert response.text == body, (path, response.text)

        # A task that waits until told to go on, created but not started: connecting starts it
        # (lazy start), so its first event is sent while the response is already open, and
        # must reach the client at once while the stream stays open (a buffering proxy holds
        # a small event back until its buffer fills or the response ends).
        created = project.create_task("ContinueTask")
        assert (await r.hget(f"sc:{{examples.ContinueTask:{created['id']}}}:state", "state")) == b"pending"
        client: RawSSE = await sse(nginx.socket, created["stream"])
        opened = time.monotonic()
        assert client.status == 200
        assert client.headers["content-type"].startswith("text/event-stream"), client.headers
        assert served_by(client.headers.get("x-test-upstream")) == str(gateway.socket), client.headers
        first = await asyncio.wait_for(client.next_event(), 15)
        arrived = time.monotonic() - opened
        assert first is not None and first.event == "started", first
        assert client.comments[0] == "stream open", client.comments  # nothing held back before it
        assert not client.ended
        waiting = asyncio.create_task(client.next_event())
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        assert not done, f"an event arrived before the flag was set: {waiting.result()}"

        set_continue(project, created["id"])
        second = await asyncio.wait_for(waiting, 15)
        assert second is not None
        rest = await asyncio.wait_for(client.events_until_end(), 15)
        events = [first, second, *rest]
        assert [e.event for e in events] == ["started", "final", "complete"], triples(events)
        assert_gap_free(events, "ContinueTask through nginx")
        assert client.ended  # the terminating chunk came through
        print(f"\nnginx unbuffered: the live first event arrived {arrived * 1000:.0f} ms after the response head")


# -- 3. unbuffered also means backpressure: a client that stops reading is the gateway's to cut --


async def test_a_client_that_stops_reading_is_cut_by_its_gateway_not_spooled_by_nginx(
    r: Redis, project: Project, sse: Any, tmp_path: Path
) -> None:
    # A gateway that lets a client leave only a few frames untaken, and a task that writes
    # ~18 MB of events. With `proxy_buffering off` nginx reads from the gateway only as fast
    # as the client takes, so the gateway sees the client fall behind and cuts it (the client
    # would resume with Last-Event-ID). A buffering nginx would read it all into its temp files
    # (up to 1 GB per connection by default) and the gateway would never know.
    gateway = project.gateway("gw1", client_queue_size=5)
    project.worker("w1")
    with running_nginx(tmp_path / "nginx", [gateway.socket]) as nginx:
        created = project.create_task("ProgressTask", "steps=300", "delay=0.01", "payload_bytes=60000")
        # Connecting starts it (lazy start): every event is live, none is history.
        client: RawSSE = await sse(nginx.socket, created["stream"], rcvbuf=4096)
        assert client.status == 200  # ... and never reads again

        async with httpx.AsyncClient(  # /stats: on the gateway's admin listener
            transport=httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket)), base_url="http://gw", timeout=10
        ) as direct:
            deadline = time.monotonic() + 30
            while True:
                stats = (await direct.get("/stats")).json()
                if stats.get("closed_overflow") or stats.get("finished"):
                    break
                assert time.monotonic() < deadline, f"the stream neither overflowed nor finished: {stats}"
                await asyncio.sleep(0.1)
        assert stats.get("closed_overflow") == 1 and not stats.get("finished"), (
            f"the gateway never saw its client fall behind (nginx buffered the stream?): {stats}"
        )
        written = await r.hget(f"sc:{{examples.ProgressTask:{created['id']}}}:state", "last_seq")
        print(f"\nnginx backpressure: the gateway cut the stalled client; stats {stats}; events written then: {written!r}")


async def test_the_shipped_access_log_leaves_stream_tokens_out(r: Redis, project: Project, tmp_path: Path) -> None:
    gateway = project.gateway("gw1")
    nginx = Nginx(tmp_path / "nginx", [gateway.socket], shipped_logging=True).start()
    try:
        async with through(nginx) as http:
            assert (await http.get("/health", params={"token": "SECRET-TOKEN-VALUE"})).status_code == 200

        def logged() -> bool:
            return nginx.shipped_log.exists() and "/health" in nginx.shipped_log.read_text()

        wait_for(logged, 10, "nginx to log the request")
        line = nginx.shipped_log.read_text()
        assert '"GET /health HTTP/1.1" 200' in line and "SECRET-TOKEN-VALUE" not in line and "token" not in line
    finally:
        nginx.stop()


async def test_many_tasks_on_one_connection_go_to_the_gateways_and_resume(
    r: Redis, project: Project, tmp_path: Path
) -> None:
    """GET /streams reaches a gateway through the shipped config (not Django), unbuffered, and
    a reconnect through nginx with the composite Last-Event-ID resumes every task exactly."""
    gateways = [project.gateway("gw1"), project.gateway("gw2")]
    project.worker("w1")
    created = [project.create_task("ProgressTask", "steps=12", "delay=0.1", start=True) for _ in range(4)]
    tasks = [TaskRef(c["app_label"], c["model"], str(c["id"])) for c in created]
    path = streams_path(tasks)
    with running_nginx(tmp_path / "nginx", [g.socket for g in gateways]) as nginx:
        tally = Tally(tasks)
        for stop_after in (5, 9, None):
            headers = {"Last-Event-ID": tally.last_id} if tally.last_id else {}
            async with through(nginx) as http, aconnect_sse(http, "GET", path, headers=headers) as source:
                assert source.response.status_code == 200, await source.response.aread()
                assert served_by(source.response.headers.get("x-test-upstream")) in {str(g.socket) for g in gateways}
                got = []
                async with contextlib.aclosing(source.aiter_sse()) as events:  # closed in this task
                    async for event in events:
                        if event.data:
                            got.append((event.id, event.event, json.loads(event.data)))
                        if stop_after is not None and len(got) >= stop_after:
                            break
            tally.take(got)
        assert tally.ended == {ref.label for ref in tasks}
        assert tally.problems({ref.label: 14 for ref in tasks}) == []
