"""An ASGI app of the benchmark served by uvicorn in a child process, on a unix socket.

The child side (:func:`serve`) binds the socket itself, says ``listening on`` and runs uvicorn
on uvloop with httptools, as the gateway does. The suite side (:class:`ServedApp`) starts that
child, reads its ``/stats`` (``listeners``: open stream connections) and stops it by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ..procs import Child, clean_env


def serve(app: Any, socket_path: str) -> None:
    """Serve ``app`` on ``socket_path`` until SIGTERM (the child side)."""
    import uvicorn
    import uvloop

    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(socket_path)
    sock.listen(2048)
    config = uvicorn.Config(
        app, lifespan="off", access_log=False, log_level="warning", http="httptools",
        ws="none", loop="none", timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    print(f"listening on unix:{socket_path}", file=sys.stderr, flush=True)
    uvloop.run(server.serve(sockets=[sock]))


class ServedApp:
    """The suite's handle on one served app."""

    def __init__(self, name: str, socket: Path, argv: list[str]) -> None:
        self.name = name
        self.socket = socket
        self.argv = argv  # the child's command line; it binds ``socket``
        self.child: Child | None = None
        self._http: Any = None  # httpx.AsyncClient, made on start

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    async def start(self, env: dict[str, str] | None = None) -> None:
        import httpx

        self.child = await Child.spawn(self.name, self.argv, env=env or clean_env())
        await self.child.wait_for_line("listening on", 30)
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket))
        self._http = httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=30)

    async def get(self, path: str) -> dict[str, Any]:
        response = await self._http.get(path)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def post(self, path: str, params: dict[str, Any], within: float) -> dict[str, Any]:
        response = await self._http.post(path, params=params, timeout=within)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def wait_for_listeners(self, expected: int, within: float) -> None:
        """Poll ``/stats`` until the server holds ``expected`` stream connections (and, for
        a streamcoord gateway, follows each of their streams live: subscribed, read up to
        date; what publishing measures is the steady state, not the subscribing)."""

        def ready(stats: dict[str, Any]) -> bool:
            return bool(stats["listeners"] >= expected and not stats.get("streams_catching_up"))

        try:
            async with asyncio.timeout(within):
                while not ready(await self.get("/stats")):
                    if self.child is not None and not self.child.running:
                        raise RuntimeError(f"{self.name} exited:\n{self.child.log_tail()}")
                    await asyncio.sleep(0.1)
        except TimeoutError:
            stats = await self.get("/stats")
            raise TimeoutError(
                f"{self.name}: {stats['listeners']} of {expected} clients after {within:g}s"
            ) from None

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self.child is not None:
            await self.child.stop()
