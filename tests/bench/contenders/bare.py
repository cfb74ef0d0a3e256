"""The limit: a bare ASGI app on uvicorn fanning pre-encoded frames out from memory (bareapp.py).

No Redis at all: events are generated inside the server process, so its deliveries/s is what
one Python process can push to SSE clients, the ceiling for every design that adds Redis.
"""

from __future__ import annotations

from pathlib import Path

from ..procs import make_dir, python_argv
from . import Endpoint
from .served import ServedApp


class Bare:
    name = "bare ASGI"

    def __init__(self) -> None:
        self.app: ServedApp | None = None

    async def start(self, workdir: Path, streams: int) -> Endpoint:
        socket = make_dir(workdir) / "bare.sock"
        argv = python_argv("tests.bench.contenders.bareapp", "--socket", str(socket))
        self.app = ServedApp("bare ASGI app", socket, argv)
        await self.app.start()
        return Endpoint(socket=socket, server_pids=[self.app.pid])

    def stream_path(self, stream: int) -> str:
        return f"/stream/{stream}"

    async def wait_for_clients(self, expected: int, within: float) -> None:
        assert self.app is not None
        await self.app.wait_for_listeners(expected, within)

    async def publish(self, stream: int, rate: float, seconds: float) -> int:
        assert self.app is not None
        params = {"stream": stream, "rate": rate, "seconds": seconds}
        reply = await self.app.post("/publish", params, within=seconds * 3 + 30)
        return int(reply["published"])

    # -- beyond the Contender protocol: resume and Redis figures ---------------------------

    async def published(self, stream: int) -> int:
        assert self.app is not None
        return int((await self.app.get("/stats"))["published"].get(str(stream), 0))

    def event_id(self, stream: int, n: int) -> str:
        return str(n)

    async def redis_connections(self) -> int | None:
        return 0

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
