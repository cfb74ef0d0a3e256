"""Reading a worker's entry in the registry (``sc:workers``): pure logic, no Redis.

A worker's heartbeat is read from ``heartbeat_ms`` (the Redis clock), from ``heartbeat_at`` for
an entry written before that field existed, and anything else is malformed: a ValueError that
says what is wrong, which the recovery round logs before it drops the entry.
"""

from __future__ import annotations

import json

import pytest

from django_app.worker.presence import heartbeat_ms


def entry(**fields: object) -> bytes:
    return json.dumps({"host": "h", "pid": 1, **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (entry(heartbeat_ms=1_796_290_120_044), 1_796_290_120_044),
        # heartbeat_ms wins over the host's clock, however far off that is
        (entry(heartbeat_ms=1_796_290_120_044, heartbeat_at="2001-01-01T00:00:00+00:00"), 1_796_290_120_044),
        (entry(heartbeat_ms=1_796_290_120_044.7), 1_796_290_120_044),
        # an entry of a worker from before heartbeat_ms (a rolling upgrade)
        (entry(heartbeat_at="2026-12-03T09:00:00+00:00"), 1_796_288_400_000),
        (entry(heartbeat_at="2026-12-03T09:00:00"), 1_796_288_400_000),  # naive: UTC
    ],
)
def test_a_heartbeat_is_read_from_heartbeat_ms_or_an_older_heartbeat_at(raw: bytes, expected: int) -> None:
    assert heartbeat_ms(raw) == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"notjson", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"17", "not a JSON object"),
        (entry(), "no heartbeat_ms or heartbeat_at"),
        (entry(heartbeat_at="yesterday"), "heartbeat_at is not an ISO 8601 time: 'yesterday'"),
        (entry(heartbeat_at=None), "heartbeat_at is not an ISO 8601 time: None"),
        (entry(heartbeat_ms="soon"), "heartbeat_ms is not a number: 'soon'"),
        (entry(heartbeat_ms=True), "heartbeat_ms is not a number: True"),
        (entry(heartbeat_ms=None, heartbeat_at="2026-12-03T09:00:00+00:00"), "heartbeat_ms is not a number: None"),
        # JSON numbers Python reads as floats that are no time (int() of them raises OverflowError)
        (b'{"heartbeat_ms": 1e400}', "heartbeat_ms is not a finite number: inf"),
        (b'{"heartbeat_ms": Infinity}', "heartbeat_ms is not a finite number: inf"),
        (b'{"heartbeat_ms": -Infinity}', "heartbeat_ms is not a finite number: -inf"),
        (b'{"heartbeat_ms": NaN}', "heartbeat_ms is not a finite number: nan"),
    ],
)
def test_a_malformed_entry_says_what_is_wrong(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError) as raised:
        heartbeat_ms(raw)
    assert str(raised.value) == problem
