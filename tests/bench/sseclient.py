"""A raw, cheap SSE connection for the load client: one ``asyncio.Protocol`` per connection.

It writes a plain HTTP/1.1 GET, reads the status line, undoes chunked transfer coding (or takes
the body as it comes) and splits the SSE text into frames at blank lines, keeping whatever is
left for the next read, so an event may arrive in any number of pieces: streamcoord writes
whole frames, the predecessor writes ``event:`` and ``data:`` lines as separate chunks. A frame
counts as an event when its data carries the benchmark's ``"t"`` (publish time) and ``"n"``
(number) fields; comments, ``retry:`` lines and other events are skipped. Nothing else is parsed:
no JSON decoding, no StreamReader, one ``time.time()`` and one regex pass per read.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import cast


def build_request(path: str, last_event_id: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: bench", "Accept: text/event-stream"]
    if last_event_id is not None:
        lines.append(f"Last-Event-ID: {last_event_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


#: The benchmark's fields as every contender writes them: "t" first, then "n".
_T_N = re.compile(rb'"t":\s*([-+.0-9eE]+),\s*"n":\s*(\d+)')
_T_OR_N = re.compile(rb'"([tn])":\s*([-+.0-9eE]+)')

Stamps = list[tuple[bytes, bytes]]  # the "t" and "n" of each event, as they were written


def stamps_of(text: bytes) -> Stamps:
    """The ``"t"`` and ``"n"`` of every event in ``text`` (whole frames), in order: one regex
    pass for the usual field order, frame by frame for any other."""
    stamps: Stamps = _T_N.findall(text)
    if len(stamps) == text.count(b'"t":'):
        return stamps
    stamps = []
    for frame in text.split(b"\n\n"):
        fields = dict(_T_OR_N.findall(frame))
        if b"t" in fields and b"n" in fields:
            stamps.append((fields[b"t"], fields[b"n"]))
    return stamps


class SseConnection(asyncio.Protocol):
    """One SSE connection. Subclasses say what its events mean (:meth:`on_events`)."""

    def __init__(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        #: Resolved when the connection is finished with, for whatever reason.
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.BaseTransport | None = None
        self.started = time.time()  # reset by the opener just before it connects
        self.status = 0
        self.events = 0
        self.completed = False  # the terminal event arrived
        self._in_head = True
        self._chunked = True
        self._raw = b""  # bytes not de-chunked yet
        self._text = b""  # SSE text not split into frames yet
        self._chunk_left = 0
        self._skip = 0  # bytes of the CRLF after a chunk still to skip
        self._body_ended = False

    # -- what events mean (subclasses) ------------------------------------------------------

    def on_events(self, stamps: Stamps, terminal: bool, now: float) -> None:
        """The events of one read (``terminal``: the last of them ends the stream), all
        received at ``now``. ``self.events`` already counts them."""
        if terminal:
            self.completed = True
            self.finish()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        cast(asyncio.WriteTransport, transport).write(self.request)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        now = time.time()
        raw = self._raw + data if self._raw else data
        pos = 0
        if self._in_head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self._raw = raw
                return
            head = raw[:end].lower()
            self.status = int(raw[9:12])  # "HTTP/1.1 200 OK"
            self._chunked = b"transfer-encoding: chunked" in head
            self._in_head = False
            if self.status != 200:
                self.finish()
                return
            pos = end + 4
        if self._chunked:
            body = self._dechunk(raw, pos) if pos or self._chunk_left or self._skip else self._one_chunk(raw)
        else:
            body, self._raw = raw[pos:], b""
        if body:
            self._take_frames(body, now)
        if self._body_ended:
            self.finish()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()

    # -- parsing -----------------------------------------------------------------------------

    def _one_chunk(self, raw: bytes) -> bytes:
        """The common read: exactly one whole chunk (the server's one write)."""
        eol = raw.find(b"\r\n")
        if eol > 0:
            size = int(raw[:eol].split(b";", 1)[0], 16)
            start = eol + 2
            if size and start + size + 2 == len(raw):
                self._raw = b""
                return raw[start : start + size]
        return self._dechunk(raw, 0)

    def _dechunk(self, raw: bytes, pos: int) -> bytes:
        parts = []
        size = len(raw)
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                pos += step
                self._skip -= step
            elif self._chunk_left:
                step = min(self._chunk_left, size - pos)
                parts.append(raw[pos : pos + step])
                pos += step
                self._chunk_left -= step
                if not self._chunk_left:
                    self._skip = 2
            else:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                chunk = int(raw[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if chunk == 0:  # the last chunk: the response is complete
                    self._body_ended = True
                    pos = size
                    break
                self._chunk_left = chunk
        self._raw = raw[pos:]
        return b"".join(parts)

    def _whole_frames(self, body: bytes) -> bytes:
        """The whole frames ``body`` completes (b"" for none); the rest waits for more."""
        text = self._text + body if self._text else body
        cut = text.rfind(b"\n\n") + 2
        if cut < 2:
            self._text = text
            return b""
        whole, self._text = text[:cut], text[cut:]
        return whole

    def _take_frames(self, body: bytes, now: float) -> None:
        whole = self._whole_frames(body)
        if not whole:
            return
        stamps = stamps_of(whole)
        if stamps:
            self.events += len(stamps)
            # The terminal event is the last of its stream, so the last one read.
            self.on_events(stamps, b"event: complete\n" in whole, now)

    # -- ending ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Done with this connection: resolve ``done`` and close the socket."""
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
