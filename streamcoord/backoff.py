"""Retry delays: the one backoff every loop that talks to Redis uses.

A loop that fails waits ``first`` seconds, then twice that after each further failure, never
more than ``cap``; a success starts it over. ``jitter`` spreads the waits of many processes
that failed at the same moment (a Redis restart), so they do not all come back at once::

    backoff = Backoff(first=0.05, cap=1.0)
    while True:
        try:
            await step()
        except RedisError:
            await backoff.sleep()
        else:
            backoff.reset()
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Doubling delays between ``first`` and ``cap`` seconds, each shortened by up to
    ``jitter`` (a fraction) at random."""

    __slots__ = ("_next", "cap", "failures", "first", "jitter")

    def __init__(self, first: float = 0.05, cap: float = 1.0, jitter: float = 0.0) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, got first={first}, cap={cap}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter is a fraction in [0, 1), got {jitter}")
        self.first, self.cap, self.jitter = first, cap, jitter
        self._next = first
        #: Failures since the last success.
        self.failures = 0

    def delay(self) -> float:
        """The wait before the next try, and one more failure counted."""
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        self.failures += 1
        if self.jitter:
            delay *= 1 - self.jitter * random.random()  # spreading, not secrecy
        return delay

    async def sleep(self) -> None:
        """Wait the next delay."""
        await asyncio.sleep(self.delay())

    def reset(self) -> None:
        """A success: the next failure waits ``first`` again."""
        self._next = self.first
        self.failures = 0
