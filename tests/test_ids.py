from __future__ import annotations

import re

import pytest

from streamcoord.errors import InvalidEventId
from streamcoord.ids import MAX_SEQ, EventId, new_epoch, parse_event_id


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3f9a02bc-17", EventId("3f9a02bc", 17)),
        ("a-1", EventId("a", 1)),
        ("0-1", EventId("0", 1)),
        ("abc-10", EventId("abc", 10)),
        ("abc-999999999999999", EventId("abc", 999_999_999_999_999)),
        ("0123456789abcdef-1", EventId("0123456789abcdef", 1)),
    ],
)
def test_parse_valid(raw: str, expected: EventId) -> None:
    parsed = parse_event_id(raw)
    assert parsed == expected
    assert type(parsed.seq) is int
    assert str(parsed) == raw


def test_max_seq_is_accepted_and_one_more_is_not() -> None:
    assert parse_event_id(f"a-{MAX_SEQ}").seq == MAX_SEQ
    with pytest.raises(InvalidEventId):
        parse_event_id(f"a-{MAX_SEQ + 1}")


MALFORMED = [
    "",
    "-",
    "abc",
    "abc-",
    "-5",
    "abc-0",
    "abc-00",
    "abc-01",
    "abc--1",
    "abc-" + "1" * 61,  # 65 characters
    "a" * 65,
    "abc-1" + "0" * 100,
    "abc-1\n",
    "abc-\n1",
    "\nabc-1",
    "abc-1\r",
    "abc-1\r\n",
    "abc-1\x00",
    "ab\x00c-1",
    "abc-\t1",
    "abc-1\t",
    "abc-1\x7f",
    "abc-1\x1b",
    "abc-1\u2028",
    "abç-1",
    "abc-\u0661",  # ARABIC-INDIC DIGIT ONE
    "abc-\uff11",  # FULLWIDTH DIGIT ONE
    "$",
    "+",
    "abc-$",
    "abc-+",
    "*",
    " 1-1",
    "abc-1 ",
    "abc- 1",
    "ABC-1",
    "Abc-1",
    "abc-" + "9" * 16,
    "abc-1e9",
    "abc-1.5",
    "abc-0x1",
    "abc-1_000",
    "abc-+1",
    "1-0-0",
    "abc-1-2",
    "0123456789abcdef0-1",  # 17-character epoch
    "ab_c-1",
    "ab.c-1",
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_parse_rejects_malformed(raw: str) -> None:
    with pytest.raises(InvalidEventId) as info:
        parse_event_id(raw)
    message = str(info.value)
    # The message reaches HTTP clients: plain, one line, no internals, no echo of the input.
    assert message
    assert message.isprintable()
    assert message.isascii()
    assert "Traceback" not in message
    assert "EventId(" not in message
    assert "re.compile" not in message
    assert "object at 0x" not in message
    assert info.value.__context__ is None
    if len(raw) > 3:
        assert raw not in message


def test_invalid_event_id_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_event_id("nope")


def test_new_epoch_shape() -> None:
    epoch = new_epoch()
    assert re.fullmatch(r"[0-9a-f]{8}", epoch)
    assert parse_event_id(f"{epoch}-1") == EventId(epoch, 1)


def test_new_epoch_differs() -> None:
    assert new_epoch() != new_epoch()


@pytest.mark.parametrize(
    "raw", ["abc-1\n", "abc-\x001", "abc-1\t", "abc-1\x7f", "abç-1", "abc-\u0661"]
)
def test_control_and_non_ascii_reason(raw: str) -> None:
    """Such ids are refused before any pattern sees them, with a reason that says why."""
    with pytest.raises(InvalidEventId, match="control or non-ASCII"):
        parse_event_id(raw)
