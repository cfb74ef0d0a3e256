"""The self-contained demo: a gateway, a page, and an in-process publisher of example tasks.

With no ``STREAMCOORD_REDIS_URL`` it runs on the embedded stand-in, so it needs nothing
installed. The page starts a ``demo.Countdown`` task and follows it with a plain EventSource.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import json
import logging

from asgineer import HttpRequest

from .connection import RedisFactory
from .embedded import EmbeddedRedis
from .eventlog import EventLog
from .gateway import Response, text
from .keys import TaskRef
from .registry import register_models
from .server import serve
from .settings import Settings

log = logging.getLogger(__name__)

APP, MODEL = "demo", "Countdown"
PAGE = importlib.resources.files(__package__).joinpath("demo.html").read_bytes()


async def countdown(log_: EventLog, ref: TaskRef, steps: int = 10, delay: float = 0.4) -> None:
    """The example task: ``start``, ``progress`` 1..steps, ``complete``."""
    writer = log_.writer(ref)
    await writer.append("start", {"total_steps": steps, "message": f"Counting {steps} steps"})
    for step in range(1, steps + 1):
        await asyncio.sleep(delay)
        await writer.append("progress", {"step": step, "total_steps": steps})
    await writer.append(
        "complete", {"message": "Task completed successfully"}, final_value={"steps": steps}
    )


class DemoRoutes:
    def __init__(self, log_: EventLog) -> None:
        self.log = log_
        self._running: set[asyncio.Task[None]] = set()

    async def __call__(self, request: HttpRequest) -> Response | None:
        if request.path == "/" and request.method == "GET":
            return 200, {"content-type": "text/html; charset=utf-8"}, PAGE
        if request.path == "/demo/start":
            if request.method != "POST":
                return text(405, "use POST")
            return await self._start()
        return None

    async def _start(self) -> Response:
        pk = await self.log.redis.incr(f"{self.log.keys.prefix}:demo:next_id")
        ref = TaskRef(APP, MODEL, str(pk))
        await self.log.declare(ref)
        task = asyncio.create_task(countdown(self.log, ref))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        body = {"model": MODEL, "id": pk, "stream": f"/stream/{APP}/{MODEL}/{pk}"}
        return 200, {"content-type": "application/json"}, json.dumps(body)


async def run_demo(
    settings: Settings, *, host: str | None = None, port: int | None = None, socket_path: str | None = None
) -> None:
    embedded = EmbeddedRedis(settings.embedded_url_file) if settings.embedded else None
    if embedded is not None:
        settings = dataclasses.replace(settings, redis_url=embedded.url)
    factory = RedisFactory(settings)
    redis = factory.client("demo")
    event_log = EventLog(redis, settings)
    await register_models(redis, event_log.keys, [(APP, MODEL)])
    if embedded is not None:
        log.info("embedded default: Redis stand-in at %s (set STREAMCOORD_REDIS_URL for a real one)", embedded.url)
    try:
        await serve(settings, host=host, port=port, socket_path=socket_path, factory=factory,
                extra_routes=DemoRoutes(event_log),
                announce="streamcoord demo listening on {url}: open {url}/ in a browser")
    finally:
        if embedded is not None:
            embedded.close()
