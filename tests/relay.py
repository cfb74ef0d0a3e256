"""A TCP server of a test's own in front of unix sockets, for browsers (which speak TCP): on
127.0.0.1, a port the kernel picks, each connection relayed to an upstream until either side
ends. The machine is shared: no fixed port; every connection's task is cancelled on exit."""

from __future__ import annotations

import asyncio
import contextlib


async def relay(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    record: bytearray | None = None,
) -> None:
    """Pipe bytes both ways until either side ends (the response ended, the upstream died, the
    browser went); ``record`` keeps what the client sent."""

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, kept: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if kept is not None:
                    kept.extend(data)
                sink.write(data)
                await sink.drain()

    pipes = [
        asyncio.create_task(pipe(client[0], upstream[1], record)),
        asyncio.create_task(pipe(upstream[0], client[1], None)),
    ]
    try:
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for each in pipes:
            each.cancel()


class LocalServer:
    """Serves each connection with :meth:`handle` in a task of its own; ``async with`` starts
    and stops it (open connections included)."""

    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]]

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> LocalServer:
        self._tasks = set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()
