"""The processes a benchmark starts: children watched by pid, our own redis-server, time limits.

Every :class:`Child` is recorded while it runs, so the suite can stop whatever is left (by pid,
never by name) on the way out, whatever failed or timed out in between.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parent.parent.parent


@contextlib.asynccontextmanager
async def time_limit(seconds: float, what: str) -> AsyncIterator[None]:
    """``asyncio.timeout`` whose TimeoutError says what was being waited for."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            yield
    except TimeoutError:
        if not timeout.expired():  # an inner limit's error, already saying what it was
            raise
        raise TimeoutError(f"timed out after {seconds:g}s waiting for {what}") from None


class Child:
    """A subprocess we started. Its output goes to a short log, line by line (stdout and stderr
    together), unless ``report`` is set: then stdout is kept whole (:meth:`report`) and stderr
    goes to the log. Stopped by its own pid only (SIGTERM, then SIGKILL)."""

    #: Children started and not yet stopped, for the suite's last-resort cleanup.
    running_children: ClassVar[set[Child]] = set()

    def __init__(self, name: str, process: asyncio.subprocess.Process, report: bool) -> None:
        self.name = name
        self.process = process
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._waiters: list[tuple[str, asyncio.Future[str]]] = []
        self._tasks: list[asyncio.Task[bytes]] = []
        assert process.stdout is not None
        if report:
            assert process.stderr is not None
            self._tasks.append(asyncio.create_task(process.stdout.read()))
            self._tasks.append(asyncio.create_task(self._pump(process.stderr)))
        else:
            self._tasks.append(asyncio.create_task(self._pump(process.stdout)))
        Child.running_children.add(self)

    @classmethod
    async def spawn(
        cls, name: str, argv: list[str], *, report: bool = False, env: dict[str, str] | None = None
    ) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if report else asyncio.subprocess.STDOUT,
        )
        return cls(name, process, report)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    async def _pump(self, stream: asyncio.StreamReader) -> bytes:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            for marker, future in self._waiters:
                if marker in line and not future.done():
                    future.set_result(line)
        for marker, future in self._waiters:
            if not future.done():
                future.set_exception(RuntimeError(
                    f"{self.name} ended its output before logging {marker!r}:\n{self.log_tail()}"
                ))
        return b""

    async def wait_for_line(self, marker: str, seconds: float) -> str:
        """The first log line (already logged, or to come) containing ``marker``."""
        for line in self.log:
            if marker in line:
                return line
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self._tasks[-1].done():  # the output already ended
            raise RuntimeError(f"{self.name} exited before logging {marker!r}:\n{self.log_tail()}")
        self._waiters.append((marker, future))
        try:
            async with time_limit(seconds, f"{self.name} to log {marker!r}"):
                return await future
        finally:
            self._waiters.remove((marker, future))

    async def report(self) -> bytes:
        """The whole stdout of a ``report`` child (once it has exited)."""
        return await self._tasks[0]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def stop(self, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the output readers end with it."""
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.process.wait()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
        except TimeoutError:  # a grandchild holds the pipe open
            for task in self._tasks:
                task.cancel()
        Child.running_children.discard(self)


async def stop_all_children() -> None:
    """Stop every child still running (the suite's last resort), each by its pid."""
    children = list(Child.running_children)
    await asyncio.gather(*(child.stop(grace=5) for child in children), return_exceptions=True)


def make_dir(path: Path) -> Path:
    """``path``, created if missing (with its parents)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without STREAMCOORD_* variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCOORD_")}
    env.update(overrides)
    return env


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class RedisServer:
    """A redis-server of our own on a unix socket in ``workdir`` (``--port 0``: no TCP)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "redis.sock"
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    async def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (./run bench installs it)")
        make_dir(self.workdir)
        self.child = await Child.spawn("redis-server", [
            binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
            "--maxclients", "15000",
        ])
        try:
            # "Ready to accept connections" (7.x) or "The server is now ready to accept ...".
            await self.child.wait_for_line("eady to accept connections", 10)
        except BaseException:
            await self.child.stop()
            raise
        return self

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()
