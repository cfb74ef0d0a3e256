"""SingleFlight: callers asking for the same key at once share one call."""

from __future__ import annotations

import asyncio

import pytest

from streamcoord.flight import SingleFlight

TIMEOUT = 2.0


async def test_concurrent_callers_share_one_call_and_later_ones_make_their_own() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def call() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    waiting = [asyncio.create_task(flight.run("k", call)) for _ in range(10)]
    await asyncio.sleep(0)
    assert flight.in_flight("k") and not flight.in_flight("other")
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT)
    assert calls == 1
    assert results[0] == (1, False) and all(r == (1, True) for r in results[1:])
    assert not flight.in_flight("k")
    assert await flight.run("k", call) == (2, False)


async def test_one_caller_cancelled_does_not_cancel_the_others() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()

    async def call() -> str:
        await gate.wait()
        return "done"

    first = asyncio.create_task(flight.run("k", call))
    second = asyncio.create_task(flight.run("k", call))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await asyncio.wait_for(second, TIMEOUT) == ("done", True)
    assert first.cancelled()


async def test_a_failure_reaches_every_caller_and_is_not_kept() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()

    async def failing() -> str:
        await gate.wait()
        raise ConnectionError("redis went away")

    waiting = [asyncio.create_task(flight.run("k", failing)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    for task in waiting:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(task, TIMEOUT)
    assert not flight.in_flight("k")
