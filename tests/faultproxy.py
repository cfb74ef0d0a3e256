"""A fault-injecting proxy in front of a real redis-server, for the failures Redis itself
never produces on demand: a command that never reaches Redis, a reply that never comes back.

It forwards bytes between a unix socket of its own and the server's, and looks at each chunk:

- ``cut_command(match)``: the next command chunk that ``match`` accepts is not forwarded, and
  the client's connection is cut, as a network failure before the command reached Redis would;
- ``cut_reply(match)``: the next reply chunk that ``match`` accepts is swallowed and the
  connection cut, as a network failure after Redis ran the command would.

Each fault fires once (or ``times`` times: more than a client's retries, for a failure that
outlasts them); ``faults`` counts those that fired, ``clear()`` drops those that did not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

Match = Callable[[bytes], bool]


class FaultProxy:
    def __init__(self, path: Path, upstream: Path) -> None:
        self.path, self.upstream = path, upstream
        self.faults = 0
        self._commands: list[Match] = []
        self._replies: list[Match] = []

    def cut_command(self, match: Match, times: int = 1) -> None:
        self._commands += [match] * times

    def cut_reply(self, match: Match, times: int = 1) -> None:
        self._replies += [match] * times

    def clear(self) -> None:
        self._commands.clear()
        self._replies.clear()

    def _fires(self, rules: list[Match], data: bytes) -> bool:
        for rule in rules:
            if rule(data):
                rules.remove(rule)
                self.faults += 1
                return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))

        async def forward(source: asyncio.StreamReader, sink: asyncio.StreamWriter, rules: list[Match]) -> None:
            while data := await source.read(65536):
                if self._fires(rules, data):
                    writer.transport.abort()  # the client's connection, either way
                    return
                sink.write(data)
                await sink.drain()

        tasks = [
            asyncio.create_task(forward(reader, up_writer, self._commands)),
            asyncio.create_task(forward(up_reader, writer, self._replies)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        up_writer.close()
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FaultProxy]:
        server = await asyncio.start_unix_server(self._handle, str(self.path))
        async with server:
            yield self
