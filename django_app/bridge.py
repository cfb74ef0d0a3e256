"""The Django side's one event loop for Redis: a daemon thread per process, and its client.

Django code calls the coordinator from everywhere: sync views under WSGI (a thread per request)
and under ASGI (a thread that asgiref's async server loop waits for), async views under ASGI (the
server's loop) and under WSGI (a new loop per request), the shell, management commands, signal
handlers inside ``transaction.atomic``. A Redis client belongs to the event loop that made it, so
a client per calling loop would mean a connection per WSGI request (one leaked each time the
request's loop went away), and a private ``asyncio.run()`` per sync call deadlocks under ASGI
(the async ORM inside it waits for the thread-sensitive executor: the caller itself).

So every Redis call of the Django side runs here, on one loop of its own, with one client that
lives as long as the process: sync callers wait for the result, async callers await it without
blocking their loop. Only Redis work comes here; the ORM stays in the caller's thread and
transaction. A forked child (a preforking server) starts its own loop on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: How long a sync caller waits for one call before it gives up (the Redis client's own socket
#: timeouts end a call to an unreachable Redis much sooner; this only stops a caller hanging
#: forever on something unforeseen).
CALL_TIMEOUT_SECONDS = 60.0


class RedisLoop:
    """Runs coroutines on this process's Redis loop, from any thread or loop."""

    def __init__(self, name: str = "streamcoord-redis") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        # A forked child has no loop thread, and may inherit the lock held by another thread
        # of its parent: it starts afresh.
        os.register_at_fork(after_in_child=self._forget_parent)

    def _forget_parent(self) -> None:
        self._lock = threading.Lock()
        self._loop = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started on first use (and again in a forked child)."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._loop, self._pid = asyncio.new_event_loop(), os.getpid()
                threading.Thread(target=self._loop.run_forever, name=self._name, daemon=True).start()
            return self._loop

    def is_current(self) -> bool:
        """Whether the caller runs on the Redis loop itself."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def call(self, work: Callable[[], Awaitable[T]], timeout: float = CALL_TIMEOUT_SECONDS) -> T:
        """Run ``work()`` on the loop and wait for its result (sync callers)."""
        if self.is_current():
            raise RuntimeError("a sync call made on streamcoord's Redis loop would wait for itself")
        future = asyncio.run_coroutine_threadsafe(_awaited(work), self.loop())
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"streamcoord: a Redis call took more than {timeout:.0f} s") from None

    async def acall(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work()`` on the loop and await its result (async callers, on any loop)."""
        if self.is_current():
            return await work()
        future = asyncio.run_coroutine_threadsafe(_awaited(work), self.loop())
        return await asyncio.wrap_future(future)


async def _awaited(work: Callable[[], Awaitable[T]]) -> T:
    return await work()
