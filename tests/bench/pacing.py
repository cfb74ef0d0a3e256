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
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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


#: Events due at once that one round sends (one pipeline); the rest go in the next round.
ROUND_EVENTS = 2000
#: An event due: its stream, its number, and whether it is the ``complete`` event.
Due = tuple[int, int, bool]


async def paced_rounds(
    streams: int, rate: float, seconds: float, send: Callable[[list[Due]], Awaitable[None]]
) -> int:
    """Publish to streams 1..streams at ``rate`` each, from one loop: every round sends what
    is due, ``(stream, n, complete)`` (the ``complete`` event is number total + 1), in one call
    of ``send``. Each stream starts at a random point of its first interval. Returns the
    events per stream (without ``complete``).

    Thousands of streams would cost a coroutine wake-up and a round trip per event each on
    their own: the publisher, not the server, would set the pace. One loop costs about what
    the commands cost."""
    total = event_count(rate, seconds)
    schedule = sorted(
        (offset + (min(n, total) - 1) / rate, stream, n, n > total)
        for stream in range(1, streams + 1)
        for offset in (random.random() / rate,)
        for n in range(1, total + 2)  # the last one is ``complete``, right after the last event
    )
    start = time.monotonic()
    index = 0
    while index < len(schedule):
        now = time.monotonic() - start
        due: list[Due] = []
        while index < len(schedule) and schedule[index][0] <= now and len(due) < ROUND_EVENTS:
            due.append(schedule[index][1:])
            index += 1
        if due:
            await send(due)
        elif index < len(schedule):
            await asyncio.sleep(min(schedule[index][0] - now, 0.002))
    return total


def stamped_data(stream: int, n: int) -> bytes:
    """An event's data as streamcoord would encode it (for contenders that encode themselves)."""
    stamp = datetime.now(UTC).isoformat()
    return (
        f'{{"t":{time.time():.6f},"n":{n},"_task_id":{stream},"_model":"{MODEL}",'
        f'"_app":"{APP}","_timestamp":"{stamp}"}}'
    ).encode()
