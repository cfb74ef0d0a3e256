"""The predecessor, django-streaming-coordinator 0.2.1 from PyPI, as a benchmark contender.

How the predecessor works (read from its code in the venv's ``site-packages/streaming``)
    One process, everything in memory. ``manage.py runserver_stream --socket PATH`` runs
    ``uvicorn.run("streaming.server:app", uds=PATH, log_level="info")``: an asgineer app with
    ``GET /health`` ("OK") and ``GET /stream/<app_label>/<Model>/<pk>`` (0.2.x has the app label in
    the path; 0.1.0 did not). A task is a concrete subclass of the abstract model
    ``streaming.models.StreamTask`` whose ``async process()`` calls
    ``await self.send_event(type, data)``. The singleton ``streaming.coordinator.coordinator``
    keeps the running task instances; each instance keeps a set of per-client
    ``asyncio.Queue()`` (unbounded). ``send_event`` caches the event as "latest" (a client
    that connects later gets it first) and ``asyncio.gather``-s one ``queue.put`` per client
    (one asyncio task per client per event). The stream handler's async generator takes each
    event from its queue, adds ``_task_id``/``_app``/``_model``/``_timestamp`` to the (shared)
    data dict, ``json.dumps`` it (once per client) and yields ``"event: <type>\\n"`` and
    ``"data: <json>\\n\\n"`` separately: two HTTP chunks per delivery. The generator ends after
    a ``complete`` or ``error`` event, which ends the chunked body. asgineer sends the response
    headers only with the first chunk, so a client sees nothing until the first event.

How the tasks start (lazily, on the first connection)
    The stream handler calls ``coordinator.get_task_instance(app, model, pk)``, which loads the
    row (``aget``) and, if it has no ``completed_at``, calls ``coordinator.start_task``: an
    ``asyncio.create_task`` in the server's own loop. So the first client of a stream starts its
    task; nothing else is needed (no ``ready()`` hook, no second process). Our task,
    ``bench.Job`` (a generated app, label ``bench``, so the path is ``/stream/bench/Job/<n>``
    like streamcoord's), then touches ``started-<n>`` and polls for a file ``go-<n>`` every
    5 ms. ``publish()`` writes ``go-<n>`` (``"<rate> <seconds>"``, atomically); the task
    sends ``rate * seconds`` (rounded, at least 1) ``progress`` events ``{"t": time.time(),
    "n": i}`` on a fixed schedule (like the suite's own publisher: a late event does not
    shift the later ones), then ``complete`` ``{"t": ..., "n": total + 1}``, writes
    ``done-<n>`` (JSON: events, first, last) and returns; the coordinator then saves
    ``completed_at``. A stream can be published ONCE per ``start()``: a completed task
    answers later GETs with a JSON status, not a stream. A stream nobody connected to has
    no running task: ``publish()`` on it fails (after waiting up to 5 s for ``started-<n>``).

What this contender sets up
    * A virtualenv of its own, cached at ``<repo>/.bench-cache/predecessor-venv`` and reused
      across runs (rebuilt if missing or if its requirements changed; a stamp file written
      last marks it complete, and a lock file serializes concurrent builds). It holds
      ``django-streaming-coordinator==0.2.1`` plus ``uvloop`` and ``httptools``, which uvicorn
      picks up by itself ("auto"), as in the FIELD-NOTES measurement (the package itself
      depends on plain ``uvicorn``, which would run asyncio + h11).
    * A minimal Django project generated in ``<workdir>/predecessor/`` (``config.settings``,
      the predecessor's default settings module; apps ``streaming`` and ``bench``; SQLite),
      ``migrate --run-syncdb`` and rows ``bench.Job`` 1..streams.
    * The server: ``<venv>/bin/python manage.py runserver_stream --socket <workdir>/pred.sock``
      (a unix socket: the suite's load client speaks unix sockets only), stdout and stderr to
      ``<workdir>/predecessor/server.log``, ready once ``/health`` answers 200.

``wait_for_clients``
    The predecessor has no stats endpoint. We count the socket descriptors the server process
    holds (``/proc/<pid>/fd``) above its idle count: that is the connections uvicorn has
    accepted. Then we settle ``0.5 s + expected / 5000 s`` so the accepted requests reach
    ``add_client`` (only the first one of a stream waits for a database read). If the count
    does not reach ``expected`` within ``within`` seconds, TimeoutError.

Its wire format, which the suite's load client (``tests.bench.fanout.StreamCounter``) reads::

    event: progress\\n                                             <- one chunk
    data: {"t": 1761.5, "n": 1, "_task_id": 1, "_app": "bench", "_model": "Job", "_timestamp": "..."}\\n\\n   <- another

``"t"`` and ``"n"`` come first (Python dicts keep order) and ``"n"`` is followed by a comma,
as the load client's parser expects. There is no ``id:``, no ``retry:``, no comment at open.

Demo (one stream, N load clients in a child process of ``tests.bench.fanout``)::

    .venv/bin/python -m tests.bench.contenders.predecessor --clients 100 --rate 100 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.contenders import Endpoint

REPO = Path(__file__).resolve().parents[3]
#: Where the predecessor's virtualenv is cached (reused across runs; ``.bench-cache/`` is not
#: part of the repository).
VENV = REPO / ".bench-cache" / "predecessor-venv"
PACKAGE = "django-streaming-coordinator"
VERSION = "0.2.1"
#: What the venv holds: the predecessor, and the fast loop and parser uvicorn uses if present.
REQUIREMENTS = (f"{PACKAGE}=={VERSION}", "uvloop", "httptools")
APP_LABEL, MODEL = "bench", "Job"

VENV_BUILD_TIMEOUT = 600.0
SETUP_TIMEOUT = 120.0
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
#: How long publish() waits for a task to start (its first client is being handled).
START_WAIT = 5.0
#: After ``seconds``, how long publish() waits for the task to finish before giving up.
PUBLISH_MARGIN = 60.0
POLL = 0.02


# -- the Django project, generated into <workdir>/predecessor/ ----------------------------------

PROJECT_FILES = {
    "manage.py": """
        import os
        import sys

        if __name__ == "__main__":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
            from django.core.management import execute_from_command_line

            execute_from_command_line(sys.argv)
    """,
    "config/__init__.py": "",
    "config/settings.py": """
        from pathlib import Path

        BASE_DIR = Path(__file__).resolve().parent.parent
        BENCH_DIR = BASE_DIR  # go-<n>, started-<n>, done-<n>, failed-<n>
        SECRET_KEY = "benchmark-only"
        DEBUG = False
        ALLOWED_HOSTS = ["*"]
        INSTALLED_APPS = ["streaming", "bench"]
        DATABASES = {
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}
        }
        USE_TZ = True
        DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
    """,
    "bench/__init__.py": "",
    "bench/apps.py": """
        from django.apps import AppConfig


        class BenchConfig(AppConfig):
            name = "bench"
            default_auto_field = "django.db.models.BigAutoField"
    """,
    "bench/models.py": """
        import asyncio
        import json
        import os
        import time
        import traceback
        from pathlib import Path

        from django.conf import settings
        from streaming.models import StreamTask

        GO_POLL = 0.005


        def _write(path, text):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


        class Job(StreamTask):
            \"\"\"Waits for go-<pk> ("<rate> <seconds>"), then publishes on a fixed schedule.\"\"\"

            async def process(self):
                folder = Path(settings.BENCH_DIR)
                (folder / f"started-{self.pk}").touch()
                try:
                    go = folder / f"go-{self.pk}"
                    while not go.exists():
                        await asyncio.sleep(GO_POLL)
                    rate, seconds = (float(x) for x in go.read_text().split())
                    total = max(1, round(rate * seconds))
                    loop = asyncio.get_running_loop()
                    start = loop.time()
                    first = time.time()
                    for n in range(1, total + 1):
                        delay = start + (n - 1) / rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        await self.send_event("progress", {"t": time.time(), "n": n})
                    await self.send_event("complete", {"t": time.time(), "n": total + 1})
                    last = time.time()
                except BaseException:
                    _write(folder / f"failed-{self.pk}", traceback.format_exc())
                    raise
                done = {"events": total, "first": first, "last": last}
                _write(folder / f"done-{self.pk}", json.dumps(done))
                return done
    """,
    "setup_bench.py": """
        import os
        import sys

        import django

        os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
        django.setup()

        from django.core.management import call_command  # noqa: E402

        from bench.models import Job  # noqa: E402

        call_command("migrate", run_syncdb=True, verbosity=0)
        Job.objects.all().delete()
        Job.objects.bulk_create([Job(pk=pk) for pk in range(1, int(sys.argv[1]) + 1)])
        print("rows", Job.objects.count())
    """,
}


def write_project(folder: Path) -> None:
    for name, text in PROJECT_FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


# -- the cached virtualenv ----------------------------------------------------------------------


def _run(argv: list[str], timeout: float, cwd: Path | None = None) -> str:
    """Run a command to completion (killed after ``timeout``); its output, or RuntimeError."""
    try:
        done = subprocess.run(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {timeout:g}s: {' '.join(argv)}") from exc
    if done.returncode:
        raise RuntimeError(
            f"exit {done.returncode}: {' '.join(argv)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def ensure_venv(venv: Path = VENV) -> Path:
    """The predecessor's virtualenv (built on first use, reused after); its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-stamp"
    wanted = json.dumps(list(REQUIREMENTS))
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it right now
        if python.exists() and stamp.exists() and stamp.read_text() == wanted:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], 120)
        _run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], VENV_BUILD_TIMEOUT)
        _run([str(python), "-c", "import streaming, uvloop, httptools"], 60)
        stamp.write_text(wanted)  # last: a venv without it is half-built and gets rebuilt
    return python


# -- helpers on the server process --------------------------------------------------------------


def socket_fds(pid: int) -> int:
    """How many sockets a process holds open (its listening socket, connections, ...)."""
    count = 0
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                count += 1
    return count


async def http_status(socket_path: Path, path: str, limit: float = 2.0) -> int:
    """The status of a ``GET path`` over a unix socket (0 if it cannot connect)."""
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: predecessor\r\n"
                             "Connection: close\r\n\r\n".encode())
                head = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return 0
    parts = head.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


def _spawn_server(python: Path, project: Path, socket_path: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV")}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(python), "manage.py", "runserver_stream", "--socket", str(socket_path)],
            cwd=project, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )


def _read(path: Path) -> str:
    return path.read_text()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the contender ------------------------------------------------------------------------------


class Predecessor:
    """django-streaming-coordinator 0.2.1: one in-memory uvicorn process (see the module doc)."""

    name = f"predecessor {VERSION}"

    def __init__(self, venv: Path = VENV, publish_margin: float = PUBLISH_MARGIN) -> None:
        self.venv = venv
        self.publish_margin = publish_margin
        self.process: subprocess.Popen[bytes] | None = None
        self.project: Path | None = None
        self.socket: Path | None = None
        self.log: Path | None = None
        self.idle_sockets = 0
        #: What each stream's task reported: {"events", "first", "last"} (publisher time.time()).
        self.published: dict[int, dict[str, float]] = {}

    async def start(self, workdir: Path, streams: int) -> Endpoint:
        python = await asyncio.to_thread(ensure_venv, self.venv)
        self.project = project = workdir / "predecessor"
        self.socket = workdir / "pred.sock"
        self.log = project / "server.log"
        project.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_project, project)
        await asyncio.to_thread(
            _run, [str(python), "setup_bench.py", str(streams)], SETUP_TIMEOUT, project
        )
        self.process = _spawn_server(python, project, self.socket, self.log)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return Endpoint(socket=self.socket, server_pids=[self.process.pid])

    async def _wait_ready(self) -> None:
        assert self.process is not None and self.socket is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while await http_status(self.socket, "/health") != 200:
            if self.process.poll() is not None:
                raise RuntimeError(f"the predecessor's server exited with "
                                   f"{self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the predecessor's server did not answer /health within "
                                   f"{READY_TIMEOUT:g}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        # Its idle socket count, once the /health connection is gone on its side too.
        previous = -1
        for _ in range(50):
            count = socket_fds(self.process.pid)
            if count == previous:
                break
            previous = count
            await asyncio.sleep(0.05)
        self.idle_sockets = previous

    def stream_path(self, stream: int) -> str:
        return f"/stream/{APP_LABEL}/{MODEL}/{stream}"

    async def wait_for_clients(self, expected: int, within: float) -> None:
        """Wait until the server has accepted ``expected`` connections (counted from its socket
        descriptors), then settle briefly so that they reach ``add_client``."""
        assert self.process is not None
        deadline = time.monotonic() + within
        while (held := socket_fds(self.process.pid) - self.idle_sockets) < expected:
            if self.process.poll() is not None:
                raise RuntimeError(f"the predecessor's server exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the predecessor's server holds {held} of {expected} "
                                   f"connections after {within:g}s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(min(0.5 + expected / 5000, max(0.0, deadline - time.monotonic())))

    async def publish(self, stream: int, rate: float, seconds: float) -> int:
        assert self.project is not None and self.process is not None
        folder = self.project
        go, started = folder / f"go-{stream}", folder / f"started-{stream}"
        if go.exists():
            raise RuntimeError(f"stream {stream} was published already (once per start())")
        await self._poll(
            started.exists, START_WAIT,
            f"stream {stream}'s task to start: the predecessor starts a task only when its "
            "first client connects",
        )
        await asyncio.to_thread(_write_atomically, go, f"{rate!r} {seconds!r}")
        done, failed = folder / f"done-{stream}", folder / f"failed-{stream}"
        await asyncio.sleep(max(0.0, seconds - 0.1))
        await self._poll(
            lambda: done.exists() or failed.exists(), self.publish_margin,
            f"stream {stream}'s task to finish publishing",
        )
        if failed.exists():
            raise RuntimeError(f"stream {stream}'s task failed:\n{await asyncio.to_thread(_read, failed)}")
        report = json.loads(await asyncio.to_thread(_read, done))
        self.published[stream] = report
        return int(report["events"])

    async def _poll(self, condition: Callable[[], bool], limit: float, what: str) -> None:
        assert self.process is not None
        deadline = time.monotonic() + limit
        while not condition():
            if self.process.poll() is not None:
                raise RuntimeError(f"the predecessor's server exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {limit:g}s waiting for {what}")
            await asyncio.sleep(POLL)

    async def stop(self) -> None:
        """SIGTERM the server (uvicorn waits for open streams: it has no graceful-shutdown
        limit), SIGKILL it after ``STOP_GRACE`` seconds."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 10)

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# -- demo: python -m tests.bench.contenders.predecessor --clients 100 ---------------------------


async def demo(clients: int, rate: float, seconds: float) -> dict[str, Any]:
    """One stream, ``clients`` load clients (``tests.bench.fanout --client-mode``, a child
    process), ``rate`` events/s for ``seconds``; returns the numbers."""
    from tests.bench import fanout

    contender = Predecessor()
    with tempfile.TemporaryDirectory(prefix="predbench-") as tmp:
        workdir = Path(tmp)
        endpoint = await contender.start(workdir, 1)
        assert endpoint.socket is not None
        pid = endpoint.server_pids[0]
        client: asyncio.subprocess.Process | None = None
        try:
            argv = [
                sys.executable, "-m", "tests.bench.fanout", "--client-mode",
                "--socket", str(endpoint.socket), "--path", contender.stream_path(1),
                "--clients", str(clients), "--max-seconds", f"{seconds + 60:g}",
            ]
            client = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            await contender.wait_for_clients(clients, 60)
            rss_ready = fanout.proc_rss_mb(pid)
            cpu_before = fanout.proc_cpu_seconds(pid)
            events = await contender.publish(1, rate, seconds)
            async with asyncio.timeout(seconds + 90):
                out, err = await client.communicate()
            cpu_after, rss_after = fanout.proc_cpu_seconds(pid), fanout.proc_rss_mb(pid)
        finally:
            if client is not None and client.returncode is None:
                client.terminate()
                await client.wait()
            await contender.stop()
    report = json.loads(out)
    histogram = {int(k): v for k, v in report["latency_histogram"].items()}
    first, last = contender.published[1]["first"], contender.published[1]["last"]
    window = max(report["last_delivery"] - first, 1e-9)
    return {
        "clients": clients, "rate": rate, "seconds": seconds,
        "published": events + 1,
        # The publisher shares the server's event loop: under overload it slows down.
        "publish_seconds": round(last - first, 3),
        "publish_rate_achieved": round(events / max(last - first, 1e-9), 1),
        "connections": report["connections"], "connect_errors": report["connect_errors"],
        "statuses": report["statuses"],
        "received": report["events"], "expected": (events + 1) * clients,
        "completed_flag": report["completed"], "all_ended": report["all_ended"],
        "out_of_order": report["out_of_order"],
        "window_s": round(window, 3),
        "deliveries_per_s": round(report["events"] / window, 1),
        "p50_ms": fanout.percentile_ms(histogram, 0.5),
        "p99_ms": fanout.percentile_ms(histogram, 0.99),
        "max_ms": fanout.percentile_ms(histogram, 1.0),
        "server_cpu_percent": round(100 * (cpu_after - cpu_before) / window, 1),
        "server_rss_mb": f"{rss_ready:.1f} -> {rss_after:.1f}",
        "load_client_stderr": err.decode(errors="replace").strip()[-500:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the predecessor contender once.")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    result = asyncio.run(demo(args.clients, args.rate, args.seconds))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
