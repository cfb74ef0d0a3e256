"""A raw SSE client: light enough for hundreds of connections in one test process, and exact
about the bytes it reads (no client library between the test and the wire)."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: str

    @property
    def seq(self) -> int:
        assert self.id is not None
        return int(self.id.rsplit("-", 1)[1])

    def json(self) -> Any:
        return json.loads(self.data)


class RawSSE:
    """An HTTP/1.1 GET over a unix socket, decoding the chunked body as SSE by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.comments: list[str] = []
        self.ended = False  # the chunked body's terminating chunk arrived
        self._buffer = b""
        self._last_id: str | None = None

    @classmethod
    async def open(
        cls, socket_path: Path, path: str, headers: dict[str, str] | None = None, rcvbuf: int | None = None
    ) -> RawSSE:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(socket_path))
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        lines = [f"GET {path} HTTP/1.1", "Host: gateway", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        return cls(reader, writer)

    async def read_head(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if line:
                key, _, value = line.partition(":")
                self.headers[key.strip().lower()] = value.strip()

    async def _fill(self) -> bool:
        """Read one chunk into the buffer; False at the end of the body."""
        if self.ended:
            return False
        size_line = await self.reader.readline()
        if not size_line:
            self.ended = True  # connection closed without the last chunk
            return False
        size = int(size_line.strip(), 16)
        if size == 0:
            await self.reader.readline()
            self.ended = True
            return False
        self._buffer += await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return True

    async def next_event(self) -> SSEEvent | None:
        """The next event, parsed line by line as the SSE spec does (comments are collected
        aside); None when the stream ended."""
        event_id, event_type, data = self._last_id, "message", []
        while True:
            while b"\n" not in self._buffer:
                if not await self._fill():
                    return None
            raw, self._buffer = self._buffer.split(b"\n", 1)
            line = raw.decode()
            if line == "":
                if data:
                    self._last_id = event_id
                    return SSEEvent(event_id, event_type, "\n".join(data))
                event_id, event_type = self._last_id, "message"
                continue
            name, _, value = line.partition(": ")
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif name == "id":
                event_id = value
            elif name == "event":
                event_type = value
            elif name == "data":
                data.append(value)

    async def events_until_end(self) -> list[SSEEvent]:
        events = []
        while (event := await self.next_event()) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        self.writer.close()


async def sse_get(socket_path: Path, path: str, headers: dict[str, str] | None = None) -> RawSSE:
    client = await RawSSE.open(socket_path, path, headers)
    await client.read_head()
    return client


