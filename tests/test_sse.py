from __future__ import annotations

import pytest

from streamcoord import sse


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"a":1}', b'data: {"a":1}\n\n'),
        (b"", b"data: \n\n"),
        (b"a\nb", b"data: a\ndata: b\n\n"),
        (b"a\r\nb", b"data: a\ndata: b\n\n"),
        (b"a\rb", b"data: a\ndata: b\n\n"),
        (b"a\r\n\rb\n", b"data: a\ndata: \ndata: b\ndata: \n\n"),
        # A trailing newline must survive: the client joins data lines with "\n".
        (b"a\n", b"data: a\ndata: \n\n"),
        (b"\n", b"data: \ndata: \n\n"),
    ],
)
def test_encode_event_data(data: bytes, expected: bytes) -> None:
    assert sse.encode_event(data) == expected


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"event": b"progress", "id": b"3f9a02bc-17"},
            b'id: 3f9a02bc-17\nevent: progress\ndata: {"a":1}\n\n',
        ),
        ({"event": b"progress"}, b'event: progress\ndata: {"a":1}\n\n'),
        ({"id": b"3f9a02bc-17"}, b'id: 3f9a02bc-17\ndata: {"a":1}\n\n'),
        ({"id": b""}, b'id: \ndata: {"a":1}\n\n'),
    ],
)
def test_encode_event_fields(kwargs: dict[str, bytes], expected: bytes) -> None:
    assert sse.encode_event(b'{"a":1}', **kwargs) == expected


def test_encode_event_multiline_data_with_fields() -> None:
    assert (
        sse.encode_event(b"x\ny", event=b"e", id=b"i-1")
        == b"id: i-1\nevent: e\ndata: x\ndata: y\n\n"
    )


@pytest.mark.parametrize("field", ["id", "event"])
@pytest.mark.parametrize("value", [b"a\nb", b"a\rb", b"a\r\nb", b"ab\n", b"\r"])
def test_encode_event_rejects_line_breaks_in_fields(field: str, value: bytes) -> None:
    with pytest.raises(ValueError, match="line breaks"):
        sse.encode_event(b"x", **{field: value})


@pytest.mark.parametrize("value", [b"\0", b"a\0b", b"ab\0"])
def test_encode_event_rejects_nul_in_id(value: bytes) -> None:
    """Browsers ignore an id line holding NUL, which would silently break resumption."""
    with pytest.raises(ValueError, match="NUL"):
        sse.encode_event(b"x", id=value)


@pytest.mark.parametrize(
    ("constant", "expected"),
    [(sse.HEARTBEAT, b": heartbeat\n"), (sse.OPEN_COMMENT, b": stream open\n")],
)
def test_heartbeat_and_open_are_single_comment_lines(constant: bytes, expected: bytes) -> None:
    """One comment line each, with no blank line of its own (see the module's docstring)."""
    assert constant == expected


@pytest.mark.parametrize(("ms", "expected"), [(0, b"retry: 0\n"), (2000, b"retry: 2000\n")])
def test_encode_retry(ms: int, expected: bytes) -> None:
    assert sse.encode_retry(ms) == expected


def test_encode_retry_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        sse.encode_retry(-1)


def test_httpx_sse_sees_only_the_events_of_a_stream_with_heartbeats() -> None:
    """httpx-sse (the predecessor's documented client) reports any data-less block after an id
    or a retry as an empty event; our preamble and heartbeats must never form such a block."""
    from httpx_sse._decoders import SSEDecoder

    stream = (
        sse.OPEN_COMMENT + sse.encode_retry(2000) + sse.HEARTBEAT
        + sse.encode_event(b'{"n":1}', event=b"progress", id=b"ab-1")
        + sse.HEARTBEAT + sse.HEARTBEAT
        + sse.encode_event(b'{"n":2}', event=b"complete", id=b"ab-2")
        + sse.HEARTBEAT
    )
    decoder = SSEDecoder()
    events = [e for line in stream.decode().splitlines() if (e := decoder.decode(line)) is not None]
    assert [(e.event, e.id, e.data, e.retry) for e in events] == [
        ("progress", "ab-1", '{"n":1}', 2000),
        ("complete", "ab-2", '{"n":2}', None),
    ]
