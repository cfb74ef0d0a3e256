"""The control channel: cancel requests for this worker's tasks, from any process on any host.

``JobQueue.request_cancel`` (the coordinator, ``manage.py cancel_task``) finds which worker
runs a task in its state record and adds ``{"cancel": "<app.Model:pk>"}`` to that worker's
stream, ``sc:worker:<id>:control``. The worker reads it with a blocking XREAD on a connection of
its own (a blocked read holds its connection), so a cancel reaches a running task within one
round trip, on whatever host it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamcoord.backoff import Backoff

log = logging.getLogger(__name__)


class ControlChannel:
    """Reads one worker's control stream and hands each cancel request to ``cancel``."""

    def __init__(self, redis: Redis, key: str, block_ms: int, cancel: Callable[[str], None]) -> None:
        self.redis = redis
        self.key = key
        self.block_ms = block_ms
        #: Called with the label (``app.Model:pk``) of each task a request names.
        self.cancel = cancel

    async def listen_forever(self) -> None:
        """Take requests until cancelled; a failed read is retried after a backoff (and the
        position kept, so no request is lost or taken twice)."""
        last = "0-0"
        backoff = Backoff(first=0.1, cap=1.0, jitter=0.5)
        while True:
            try:
                reply: Any = await self.redis.xread({self.key: last}, block=self.block_ms)
            except (RedisError, OSError) as exc:
                log.warning("control read failed (%s); retrying", exc)
                await backoff.sleep()
                continue
            backoff.reset()
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    label = fields.get(b"cancel", b"").decode()
                    if label:
                        self.cancel(label)
