"""Server-Sent Events wire format (WHATWG HTML, "server-sent events"). Pure functions, bytes out.

A frame is complete before it is written, so a heartbeat can never split an event.

Comment and ``retry:`` lines go out without a blank line of their own: a blank line ends an
event block, and some clients (httpx-sse 0.4) then report a block without data as an empty
event once they have seen an id or a retry. Written between whole event frames, the lines join
the next event's block, where every client ignores (comments) or applies (retry) them.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")

#: Comment lines (ignored by clients). Sent by the gateway as soon as a stream opens, so
#: headers leave at once; and on an idle stream, to keep proxies from timing it out.
OPEN_COMMENT = b": stream open\n"
HEARTBEAT = b": heartbeat\n"


def _field(name: bytes, value: bytes) -> bytes:
    if b"\n" in value or b"\r" in value:
        raise ValueError(f"SSE {name.decode()} must not contain line breaks")
    return name + b": " + value + b"\n"


def encode_event(data: bytes, *, event: bytes | None = None, id: bytes | None = None) -> bytes:
    """One event frame. ``data`` may hold line breaks (each line becomes a ``data:`` line);
    ``event`` and ``id`` may not."""
    out = b""
    if id is not None:
        if b"\0" in id:
            raise ValueError("SSE id must not contain NUL")
        out += _field(b"id", id)
    if event is not None:
        out += _field(b"event", event)
    if b"\n" in data or b"\r" in data:
        out += b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(data))
    else:
        out += b"data: " + data + b"\n"
    return out + b"\n"


def encode_retry(milliseconds: int) -> bytes:
    """The reconnect delay a client should use (a ``retry:`` line)."""
    if milliseconds < 0:
        raise ValueError("retry must not be negative")
    return b"retry: %d\n" % milliseconds
