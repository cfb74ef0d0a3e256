"""Real processes for tests: a redis-server, gateway processes, and the example Django project.

Everything binds unix sockets in a temporary directory (the machine is shared: no fixed ports),
and every process is stopped by the pid we started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def redis_answers(path: Path) -> bool:
    """A redis-server takes connections on the unix socket ``path`` (an unauthenticated PING
    that gets NOAUTH is an answer too)."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Stop a process we started: ``sig``, then SIGKILL if it is still there after ``timeout``
    seconds; its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


@dataclass
class RedisServer:
    """A redis-server of our own on a unix socket (no TCP port at all)."""

    directory: Path
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run the tests with ./run test")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no",
             "--logfile", str(self.directory / "redis.log"), *self.extra],
        )
        wait_for(lambda: redis_answers(self.socket), 10, "redis-server to answer PING")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@dataclass
class Gateway:
    """A ``python -m streamcoord gateway`` subprocess on a unix socket."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: Path
    #: The admin listener's socket (``GET /stats``), when the process has one.
    admin_socket: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        return stop_process(self.process, sig, timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_gateway(directory: Path, redis_url: str, name: str = "gw", **settings: Any) -> Gateway:
    sock = directory / f"{name}.sock"
    admin = directory / f"{name}.admin.sock"
    log = directory / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCOORD_")}
    env["STREAMCOORD_REDIS_URL"] = redis_url
    env["STREAMCOORD_STREAM_AUTH"] = "public"  # tests/test_stream_auth.py covers tokens
    env.update({f"STREAMCOORD_{k.upper()}": str(v) for k, v in settings.items()})
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamcoord", "gateway", "--socket", str(sock), "--admin-socket", str(admin)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    gateway = Gateway(sock, process, log, admin)

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log_text()}")
        return "listening on" in gateway.log_text()

    wait_for(listening, 20, "the gateway to listen")
    return gateway


def gateway_redis_connections(client_list: list[dict[str, Any]], pid: int) -> int:
    """Connections a gateway process holds, by the client names streamcoord gives them."""
    return sum(1 for c in client_list if c.get("name", "").endswith(f":{pid}"))


# -- Django-side processes: manage.py commands against a database file of the test's own -----


@dataclass
class Project:
    """The example Django project, set up for one test: its own SQLite file and embedded-URL
    file in the test's temporary directory, and (optionally) a real Redis."""

    directory: Path
    redis_url: str = ""
    #: Every process ``start`` launched, for ``stop_all``.
    started: list[Gateway] = field(default_factory=list)

    def stop_all(self) -> None:
        """Stop every process this project started, by pid."""
        for handle in self.started:
            handle.stop()

    @property
    def db(self) -> Path:
        return self.directory / "db.sqlite3"

    def env(self, **settings: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_"))}
        env["DJANGO_SETTINGS_MODULE"] = "django_app.project.settings"
        env["DJANGO_DB_PATH"] = str(self.db)
        env["STREAMCOORD_EMBEDDED_URL_FILE"] = str(self.directory / "embedded.url")
        if self.redis_url:
            env["STREAMCOORD_REDIS_URL"] = self.redis_url
        # Streams open to any client unless a test asks for tokens (tests/test_stream_auth.py).
        env["STREAMCOORD_STREAM_AUTH"] = "public"
        env.update({f"STREAMCOORD_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def manage(self, *args: str, input: str | None = None, timeout: float = 60, **settings: Any) -> str:
        """Run ``manage.py <args>`` to completion; its stdout (raises with the output on failure)."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO, env=self.env(**settings), input=input,
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def create_task(self, model: str, *fields: str, start: bool = False, **settings: Any) -> dict[str, Any]:
        args = ["create_task", model, *(f"--set={f}" for f in fields)] + (["--start"] if start else [])
        return json.loads(self.manage(*args, **settings).strip().splitlines()[-1])  # type: ignore[no-any-return]

    def start(self, name: str, *args: str, ready: str, **settings: Any) -> Gateway:
        """Start ``manage.py <args>`` in the background; wait for ``ready`` in its output."""
        log = self.directory / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "manage.py", *args], cwd=REPO, env=self.env(**settings),
                stdout=out, stderr=subprocess.STDOUT,
            )
        handle = Gateway(self.directory / f"{name}.sock", process, log)
        self.started.append(handle)

        def started() -> bool:
            if ready in handle.log_text():
                return True  # even if it has exited since (a worker a poison task killed)
            if process.poll() is not None:
                raise RuntimeError(f"manage.py {' '.join(args)} exited with {process.returncode}:\n{handle.log_text()}")
            return False

        try:
            wait_for(started, 30, f"manage.py {' '.join(args)} to be ready")
        except BaseException:
            handle.stop()  # never leave a process behind that nobody will stop
            raise
        return handle

    def gateway(self, name: str = "gw", **settings: Any) -> Gateway:
        """``runserver_stream --socket --admin-socket`` (a stateless gateway when redis_url is set)."""
        admin = self.directory / f"{name}.admin.sock"
        handle = self.start(name, "runserver_stream", "--socket", str(self.directory / f"{name}.sock"),
                            "--admin-socket", str(admin), ready="listening on", **settings)
        handle.admin_socket = admin
        return handle

    def worker(self, name: str = "worker", concurrency: int = 20, **settings: Any) -> Gateway:
        return self.start(name, "runworker", "--concurrency", str(concurrency), ready="started", **settings)
