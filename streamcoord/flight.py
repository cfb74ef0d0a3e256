"""Single flight: concurrent callers asking for the same thing share one call.

A gateway restarted under load sees a thousand clients reconnect at once, all to the same few
streams; each asking Redis itself would make a thousand reads of one answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """At most one call in flight per key; callers arriving meanwhile await its result."""

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Future[V]] = {}

    def in_flight(self, key: K) -> bool:
        return key in self._calls

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """``call()``'s result, and whether it was shared with (started by) another caller.

        A caller that is cancelled does not cancel the call the others wait for."""
        future = self._calls.get(key)
        shared = future is not None
        if future is None:
            future = self._calls[key] = asyncio.ensure_future(call())
            future.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(future), shared

    def _forget(self, key: K, done: asyncio.Future[V]) -> None:
        if self._calls.get(key) is done:
            del self._calls[key]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone away meanwhile
