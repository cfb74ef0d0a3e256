"""The events every contender publishes: how many, when, and what they carry.

Each event's data is a JSON object whose first fields are ``"t"`` (the publisher's
``time.time()`` when it sent the event) and ``"n"`` (its number, 1, 2, 3, ...; the terminal
``complete`` event carries the next number), followed by the metadata streamcoord adds
(``_task_id``, ``_model``, ``_app``, ``_timestamp``), so every contender sends frames of the
same size. Events go out on a fixed schedule; a publisher that falls behind catches up without
sleeping, so a slow moment does not lower the rate offered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

APP, MODEL = "bench", "Job"


def event_count(rate: float, seconds: float) -> int:
    """Events (without ``complete``) published at ``rate`` per second for ``seconds``."""
    return max(1, round(rate * seconds))


async def paced(total: int, rate: float) -> AsyncIterator[int]:
    """Yield 1..total, the n-th at ``(n - 1) / rate`` seconds after the first."""
    start = time.monotonic()
    for n in range(1, total + 1):
        delay = start + (n - 1) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield n


def stamped_data(stream: int, n: int) -> bytes:
    """An event's data as streamcoord would encode it (for contenders that encode themselves)."""
    stamp = datetime.now(UTC).isoformat()
    return (
        f'{{"t":{time.time():.6f},"n":{n},"_task_id":{stream},"_model":"{MODEL}",'
        f'"_app":"{APP}","_timestamp":"{stamp}"}}'
    ).encode()
