"""A step a worker repeats for as long as it lives: heartbeats, lease renewals, recovery rounds.

One failed round must never end the loop (the worker would silently stop renewing its leases,
and every task it runs would be taken over), so a failure is logged and the step is tried again.
The next try comes sooner than the period, through :class:`~streamcoord.backoff.Backoff`: a lease
renewal that failed while Redis blinked is retried within a fraction of a second, not a third
of a lease later; repeated failures slow down to the period again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from streamcoord.backoff import Backoff

log = logging.getLogger(__name__)

#: The first retry after a failed round, in seconds (doubling up to the period).
FIRST_RETRY_SECONDS = 0.1


async def every(seconds: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    """Await ``step`` every ``seconds`` until cancelled, surviving its failures. ``what`` names
    the step in the log (``"renewing leases failed: ..."``)."""
    backoff = Backoff(first=min(FIRST_RETRY_SECONDS, seconds), cap=seconds, jitter=0.2)
    delay = seconds
    while True:
        await asyncio.sleep(delay)
        try:
            await step()
        except (RedisError, OSError) as exc:  # Redis away: expected, no traceback
            log.warning("%s failed: %s", what, exc)
            delay = backoff.delay()
        except Exception:
            log.exception("%s failed", what)
            delay = backoff.delay()
        else:
            backoff.reset()
            delay = seconds
