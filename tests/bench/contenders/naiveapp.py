"""The naive gateway: every SSE client runs its own blocking XREAD loop on the stream's key.

The design the issue calls naive, written the way one would (asgineer on uvicorn, redis.asyncio
with hiredis): a client's handler reads ``naive:<n>`` from its Last-Event-ID (a Redis entry id;
from the start without one), blocking up to a second at a time, encodes what it read as SSE and
sends it in one write per read, until the ``complete`` event. Every open stream holds one Redis
connection from a pool of ``--max-connections``.

Routes: ``GET /stream/<n>``, ``GET /stats`` (``{"listeners": open streams}``).
Run: ``python -m tests.bench.contenders.naiveapp --socket PATH --redis-url URL --max-connections N``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import asgineer
from redis.asyncio import Redis

from .served import serve

BLOCK_MS = 1000
READ_COUNT = 500
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-store",
    "x-accel-buffering": "no",
}


def stream_key(stream: int | str) -> str:
    return f"naive:{stream}"


class NaiveApp:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.listeners = 0

    async def handle(self, request: asgineer.HttpRequest) -> Any:
        if request.path == "/stats":
            return 200, {"content-type": "application/json"}, json.dumps({"listeners": self.listeners})
        if not request.path.startswith("/stream/"):
            return 404, {}, "not found"
        key = stream_key(int(request.path.rsplit("/", 1)[1]))
        last = request.headers.get("last-event-id") or "0-0"
        await request.accept(200, SSE_HEADERS)
        await request.send(b": stream open\n")
        self.listeners += 1
        pump = asyncio.create_task(self.pump(request, key, last))
        watch = asyncio.create_task(wait_disconnect(request))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.listeners -= 1
            pump.cancel()
            watch.cancel()
        if pump.done() and not pump.cancelled() and pump.exception() is None:
            await request.send(b"", more=False)
        return None

    async def pump(self, request: asgineer.HttpRequest, key: str, last: str) -> None:
        while True:
            reply: Any = await self.redis.xread({key: last}, count=READ_COUNT, block=BLOCK_MS)
            for _, entries in reply or ():
                out, ended = [], False
                for entry_id, fields in entries:
                    last = entry_id
                    kind = fields[b"type"]
                    out.append(b"id: %s\nevent: %s\ndata: %s\n\n" % (entry_id, kind, fields[b"data"]))
                    ended = kind == b"complete"
                await request.send(b"".join(out))
                if ended:
                    return


async def wait_disconnect(request: asgineer.HttpRequest) -> None:
    try:
        while True:
            await request.sleep_while_connected(3600)
    except asgineer.DisconnectedError:
        return


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.contenders.naiveapp")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--max-connections", type=int, required=True)
    args = parser.parse_args()
    redis = Redis.from_url(
        args.redis_url, max_connections=args.max_connections, socket_timeout=30,
        client_name=f"naive:{os.getpid()}",
    )
    serve(asgineer.to_asgi(NaiveApp(redis).handle), args.socket)


if __name__ == "__main__":
    main()
