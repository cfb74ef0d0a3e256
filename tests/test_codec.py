from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from streamcoord import sse
from streamcoord.codec import DataEncoder, entry_frame
from streamcoord.errors import (
    EventRejected,
    InvalidEventType,
    PayloadNotSerializable,
    PayloadTooLarge,
)
from streamcoord.keys import TaskRef

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
REF = TaskRef("app", "Model", "1")
META = b'"_task_id":1,"_model":"Model","_app":"app","_timestamp":"2026-01-02T03:04:05+00:00"'


def encoder(limit: int = 64 * 1024, ref: TaskRef = REF) -> DataEncoder:
    return DataEncoder(ref, limit)


def test_encode_splices_metadata_exactly() -> None:
    data = encoder().encode("progress", {"a": 1, "b": [1, 2]}, now=NOW)
    assert data == b'{"a":1,"b":[1,2],' + META + b"}"
    assert json.loads(data) == {
        "a": 1,
        "b": [1, 2],
        "_task_id": 1,
        "_model": "Model",
        "_app": "app",
        "_timestamp": "2026-01-02T03:04:05+00:00",
    }


def test_encode_empty_payload() -> None:
    data = encoder().encode("progress", {}, now=NOW)
    assert data == b"{" + META + b"}"
    assert json.loads(data)["_task_id"] == 1


def test_encode_string_pk() -> None:
    data = encoder(ref=TaskRef("shop", "Order", "ab-12")).encode("progress", {}, now=NOW)
    assert json.loads(data) == {
        "_task_id": "ab-12",
        "_model": "Order",
        "_app": "shop",
        "_timestamp": "2026-01-02T03:04:05+00:00",
    }


def test_encode_without_now_stamps_current_utc_time() -> None:
    before = datetime.now(UTC)
    stamp = datetime.fromisoformat(json.loads(encoder().encode("progress", {}))["_timestamp"])
    after = datetime.now(UTC)
    assert stamp.utcoffset() is not None
    assert before <= stamp <= after


def test_metadata_wins_over_payload_keys() -> None:
    payload = {"_task_id": "x", "_model": "y", "_app": "z", "_timestamp": "t", "keep": True}
    decoded = json.loads(encoder().encode("progress", payload, now=NOW))
    assert decoded == {
        "_task_id": 1,
        "_model": "Model",
        "_app": "app",
        "_timestamp": "2026-01-02T03:04:05+00:00",
        "keep": True,
    }


class _Opaque:
    pass


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        "text",
        None,
        42,
        {"s": {1, 2}},
        {"o": _Opaque()},
        {"n": math.nan},
        {"n": math.inf},
        {"nested": {"n": -math.inf}},
        {"b": b"bytes"},
        {(1, 2): "tuple key"},
    ],
)
def test_payload_not_serializable(payload: Any) -> None:
    with pytest.raises(PayloadNotSerializable) as info:
        encoder().encode("progress", payload, now=NOW)
    assert "app.Model:1" in str(info.value)
    assert "'progress'" in str(info.value)
    assert info.value.task == "app.Model:1"
    assert info.value.event_type == "progress"
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_payload_too_large() -> None:
    payload = {"a": "x" * 13}  # 21 bytes of JSON
    with pytest.raises(PayloadTooLarge) as info:
        encoder(limit=20).encode("progress", payload, now=NOW)
    message = str(info.value)
    assert "app.Model:1" in message
    assert "'progress'" in message
    assert "21 bytes" in message
    assert "limit is 20" in message


def test_payload_exactly_at_limit_is_accepted() -> None:
    payload = {"a": "x" * 12}  # 20 bytes of JSON
    assert len(json.dumps(payload, separators=(",", ":"))) == 20
    data = encoder(limit=20).encode("progress", payload, now=NOW)
    assert json.loads(data)["a"] == "x" * 12


def test_payload_limit_counts_utf8_bytes() -> None:
    payload = {"a": "é"}  # 9 characters, 10 bytes
    encoder(limit=10).encode("progress", payload, now=NOW)
    with pytest.raises(PayloadTooLarge):
        encoder(limit=9).encode("progress", payload, now=NOW)


@pytest.mark.parametrize(
    "event_type",
    ["", "a b", "a\nb", "progress\n", "x" * 65, "reset", "message", "é", "a/b", "a{b}"],
)
def test_invalid_event_type(event_type: str) -> None:
    with pytest.raises(InvalidEventType) as info:
        encoder().encode(event_type, {}, now=NOW)
    assert "app.Model:1" in str(info.value)


def test_non_string_event_type() -> None:
    with pytest.raises(InvalidEventType):
        encoder().encode(7, {}, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("event_type", ["progress", "x" * 64, "a.b:c-d_e", "complete", "Error9"])
def test_valid_event_type(event_type: str) -> None:
    assert json.loads(encoder().encode(event_type, {}, now=NOW))["_app"] == "app"


def test_rejections_are_value_errors() -> None:
    """Callers may catch either the streamcoord family or plain ValueError."""
    for exc in (InvalidEventType, PayloadNotSerializable, PayloadTooLarge):
        assert issubclass(exc, EventRejected)
        assert issubclass(exc, ValueError)


def test_unicode_payload_is_raw_utf8() -> None:
    data = encoder().encode("progress", {"msg": "héllo ✓ 日本 😀"}, now=NOW)
    assert data.startswith('{"msg":"héllo ✓ 日本 😀",'.encode())
    assert b"\\u" not in data
    assert json.loads(data.decode("utf-8"))["msg"] == "héllo ✓ 日本 😀"


def test_lone_surrogate_is_rejected_or_valid_utf8() -> None:
    try:
        data = encoder().encode("progress", {"s": "\ud800"}, now=NOW)
    except PayloadNotSerializable:
        return
    data.decode("utf-8")


ENTRY = {b"epoch": b"3f9a02bc", b"type": b"progress", b"data": b'{"a":1}'}


def test_entry_frame() -> None:
    assert entry_frame(b"17-0", ENTRY) == (
        17, b"3f9a02bc", False, b'id: 3f9a02bc-17\nevent: progress\ndata: {"a":1}\n\n'
    )


def test_frame_of_encoded_data_round_trips() -> None:
    data = encoder().encode("progress", {"line": "a\nb"}, now=NOW)
    frame = entry_frame(b"3-0", {b"epoch": b"e", b"type": b"progress", b"data": data}).data
    assert frame.startswith(b"id: e-3\nevent: progress\ndata: {")
    assert frame.count(b"\n\n") == 1
    assert json.loads(frame.split(b"data: ", 1)[1])["line"] == "a\nb"


@pytest.mark.parametrize(
    ("event_type", "terminal"),
    [
        (b"complete", True),
        (b"error", True),
        (b"cancelled", True),
        (b"progress", False),
        (b"completed", False),
        (b"Complete", False),
        (b"failed", False),
    ],
)
def test_terminal(event_type: bytes, terminal: bool) -> None:
    assert entry_frame(b"1-0", {**ENTRY, b"type": event_type}).terminal is terminal


@pytest.mark.parametrize(
    "fields",
    [
        ENTRY,
        {b"epoch": b"e", b"type": b"progress", b"data": b"line one\nline two\r\nthree"},
        {b"epoch": b"e", b"type": b"complete", b"data": b""},
    ],
)
def test_frame_matches_the_sse_encoder(fields: dict[bytes, bytes]) -> None:
    """The formatted fast path and the general encoder give the same bytes."""
    frame = sse.encode_event(fields[b"data"], event=fields[b"type"], id=fields[b"epoch"] + b"-9")
    assert entry_frame(b"9-0", fields) == (9, fields[b"epoch"], fields[b"type"] == b"complete", frame)


@pytest.mark.parametrize("epoch", [b"e\n1", b"e\r1", b"e\x001"])
def test_frame_refuses_a_junk_epoch_written_by_hand(epoch: bytes) -> None:
    with pytest.raises(ValueError):
        entry_frame(b"1-0", {b"epoch": epoch, b"type": b"progress", b"data": b"{}"})


# -- final values: the payloads' rules --------------------------------------------------------


@pytest.mark.parametrize("value", [7, "done", [1, 2], {"total": 3}, True, 1.5, "é"])
def test_final_value_encodes_compact_json(value: Any) -> None:
    text = encoder().encode_final_value("complete", value)
    assert json.loads(text) == value
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, {"x": [math.nan]}, "\ud800", {"a": object()}, {1j}]
)
def test_final_value_refuses_what_payloads_refuse(value: Any) -> None:
    with pytest.raises(PayloadNotSerializable, match="final value"):
        encoder().encode_final_value("complete", value)


def test_final_value_is_held_to_the_payload_size_limit() -> None:
    assert encoder(limit=12).encode_final_value("complete", "x" * 10) == '"' + "x" * 10 + '"'
    with pytest.raises(PayloadTooLarge, match="final value is 13 bytes"):
        encoder(limit=12).encode_final_value("complete", "x" * 11)
    with pytest.raises(PayloadTooLarge):
        encoder(limit=12).encode_final_value("complete", "é" * 6)  # 14 bytes in 7 characters
