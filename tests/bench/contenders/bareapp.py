"""The bare ASGI app: the Python ceiling for SSE fan-out (no Redis, no framework).

Routes::

    GET  /stream/<n>                        stream n: its history from memory (after the
                                            Last-Event-ID, a number), then live frames
    POST /publish?stream=n&rate=r&seconds=s generate stamped events in this process on a fixed
                                            schedule, then ``complete``; answers when done
    GET  /stats                             {"listeners": open streams, "published": {n: count}}

Each event is encoded once, when it is generated, and the same bytes go to every client's queue;
a client's writer sends everything queued in one write. A client that leaves ``QUEUE_LIMIT``
frames untaken is cut. Run: ``python -m tests.bench.contenders.bareapp --socket PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from ..pacing import APP, MODEL, event_count, paced
from .served import serve

QUEUE_LIMIT = 10_000
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]

Scope = dict[str, Any]
Receive = Any
Send = Any


class Listener:
    __slots__ = ("closed", "frames", "ready")

    def __init__(self, backlog: list[bytes]) -> None:
        self.frames = backlog
        self.ready = asyncio.Event()
        self.closed = ""  # why the stream ends: "ended" (terminal event) or "overflow"


class Channel:
    """One stream: its frames so far (frame i is event i + 1) and its listeners."""

    def __init__(self) -> None:
        self.history: list[bytes] = []
        self.listeners: set[Listener] = set()
        self.ended = False

    def push(self, frame: bytes, terminal: bool) -> None:
        self.history.append(frame)
        for listener in self.listeners:
            if len(listener.frames) >= QUEUE_LIMIT:
                listener.closed = "overflow"
            else:
                listener.frames.append(frame)
                if terminal:
                    listener.closed = "ended"
            listener.ready.set()
        self.ended = self.ended or terminal


def encode(stream: int, n: int, terminal: bool) -> bytes:
    stamp = datetime.now(UTC).isoformat()
    data = (
        f'{{"t":{time.time():.6f},"n":{n},"_task_id":{stream},"_model":"{MODEL}",'
        f'"_app":"{APP}","_timestamp":"{stamp}"}}'
    )
    kind = "complete" if terminal else "progress"
    return f"id: {n}\nevent: {kind}\ndata: {data}\n\n".encode()


class BareApp:
    def __init__(self) -> None:
        self.channels: dict[int, Channel] = {}

    def channel(self, stream: int) -> Channel:
        if stream not in self.channels:
            self.channels[stream] = Channel()
        return self.channels[stream]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith("/stream/"):
            await self.stream(int(path.rsplit("/", 1)[1]), scope, receive, send)
        elif path == "/publish":
            query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
            count = await self.publish(int(query["stream"]), float(query["rate"]), float(query["seconds"]))
            await respond(send, 200, {"published": count})
        elif path == "/stats":
            await respond(send, 200, {
                "listeners": sum(len(c.listeners) for c in self.channels.values()),
                "published": {n: len(c.history) for n, c in self.channels.items()},
            })
        else:
            await respond(send, 404, {"error": "not found"})

    async def publish(self, stream: int, rate: float, seconds: float) -> int:
        channel = self.channel(stream)
        total = event_count(rate, seconds)
        async for n in paced(total, rate):
            channel.push(encode(stream, n, False), False)
        channel.push(encode(stream, total + 1, True), True)
        return total

    async def stream(self, stream: int, scope: Scope, receive: Receive, send: Send) -> None:
        channel = self.channel(stream)
        last = dict(scope["headers"]).get(b"last-event-id")
        listener = Listener([b": stream open\n", *channel.history[int(last) if last else 0 :]])
        if channel.ended:
            listener.closed = "ended"
        else:
            channel.listeners.add(listener)  # before any await: no frame can slip past
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        writer = asyncio.create_task(write(listener, send))
        watcher = asyncio.create_task(wait_disconnect(receive))
        try:
            await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            watcher.cancel()
            channel.listeners.discard(listener)
        if writer.done() and not writer.cancelled() and listener.closed == "ended":
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def write(listener: Listener, send: Send) -> None:
    """Send whatever is queued, in one write, until the stream ends (or overflows)."""
    while True:
        while not listener.frames and not listener.closed:
            listener.ready.clear()
            await listener.ready.wait()
        if listener.closed == "overflow":
            return
        frames, listener.frames = listener.frames, []
        if frames:
            await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
        if listener.closed == "ended" and not listener.frames:
            return


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond(send: Send, status: int, body: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.contenders.bareapp")
    parser.add_argument("--socket", required=True)
    serve(BareApp(), parser.parse_args().socket)


if __name__ == "__main__":
    main()
