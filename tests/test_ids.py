from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamcoord.errors import InvalidEventId
from streamcoord.ids import (
    MAX_PART_CHARS,
    MAX_SEQ,
    PART_SEPARATOR,
    TAG_CHARS,
    EventId,
    composite_part,
    new_epoch,
    parse_composite_id,
    parse_event_id,
    task_tag,
)


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


# -- composite ids (GET /streams) -------------------------------------------------------------

@pytest.mark.parametrize(
    ("label", "tag"),
    [
        # FNV-1a 32 of the UTF-8 label, base 36, 7 characters: what streamcoord.js computes too.
        ("", "0ztntfp"),  # the offset basis, 2166136261
        ("a", "1r9wi7g"),  # 0xe40c292c
        ("examples.ProgressTask:1", "0ike8nn"),
    ],
)
def test_task_tag_is_fnv1a_in_base_36(label: str, tag: str) -> None:
    assert task_tag(label) == tag


@given(st.text(max_size=80))
def test_task_tags_have_one_shape(label: str) -> None:
    tag = task_tag(label)
    assert len(tag) == TAG_CHARS and re.fullmatch(r"[0-9a-z]{7}", tag)
    assert int(tag, 36) < 2**32


positions = st.dictionaries(
    st.integers(0, 2**32 - 1).map(lambda n: task_tag(str(n))),
    st.builds(EventId, st.from_regex(r"[0-9a-z]{1,16}", fullmatch=True), st.integers(1, MAX_SEQ)),
    min_size=1, max_size=100,
)


@given(positions)
def test_composite_ids_round_trip(given_positions: dict[str, EventId]) -> None:
    raw = PART_SEPARATOR.join(
        composite_part(tag.encode(), pos.epoch.encode(), pos.seq).decode() for tag, pos in given_positions.items()
    )
    assert len(raw) <= len(given_positions) * MAX_PART_CHARS
    assert parse_composite_id(raw, 100) == given_positions


@given(st.text(max_size=300))
def test_any_text_parses_or_gets_a_plain_reason(raw: str) -> None:
    try:
        parsed = parse_composite_id(raw, 100)
    except InvalidEventId as exc:
        message = str(exc)
        assert message.isprintable() and message.isascii() and exc.__context__ is None
        if len(raw) > 8:
            assert raw not in message
    else:
        assert parsed and all(re.fullmatch(r"[0-9a-z]{7}", tag) for tag in parsed)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "<tag>-<epoch>-<sequence>"),
        ("0ike8nn-3f9a02bc-0", "<tag>-<epoch>-<sequence>"),
        ("0ike8nn-3f9a02bc-17.", "<tag>-<epoch>-<sequence>"),
        ("0ike8n-3f9a02bc-17", "<tag>-<epoch>-<sequence>"),
        ("0IKE8NN-3f9a02bc-17", "<tag>-<epoch>-<sequence>"),
        ("3f9a02bc-17", "<tag>-<epoch>-<sequence>"),  # a single task's id
        ("0ike8nn-3f9a02bc-17.0ike8nn-3f9a02bc-18", "twice"),
        ("0ike8nn-3f9a02bc-17\n", "control"),
        ("0ike8nn-3f9a02bc-17.1r9wi7g-ab-1", "more than 1 tasks"),
        ("x" * (MAX_PART_CHARS + 1), "longer than"),
    ],
)
def test_composite_ids_refused(raw: str, reason: str) -> None:
    with pytest.raises(InvalidEventId, match=re.escape(reason)):
        parse_composite_id(raw, 1 if "1r9wi7g" in raw or raw.startswith("x") else 100)
