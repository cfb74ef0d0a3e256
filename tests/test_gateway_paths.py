from __future__ import annotations

import pytest

from streamcoord.gateway import parse_stream_path, text


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/stream/M/1", (None, "M", "1")),
        ("/stream/app/M/1", ("app", "M", "1")),
        ("/stream/M/1/", (None, "M", "1")),
        ("/stream/app/M/1/", ("app", "M", "1")),
        ("/stream/", None),
        ("/stream", None),
        ("/stream/M", None),
        ("/stream/M/", None),
        ("/stream/a/b/c/d", None),
        ("/streams/M/1", None),
        ("/other/stream/M/1", None),
        ("stream/M/1", None),
        ("/stream//1", None),
        ("/stream/M//1", None),
        ("/stream/app//1", None),
        ("/", None),
        ("", None),
    ],
)
def test_parse_stream_path(path: str, expected: tuple[str | None, str, str] | None) -> None:
    assert parse_stream_path(path) == expected


def test_text_response() -> None:
    status, headers, body = text(404, "no such task")
    assert status == 404
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    assert body == "no such task"  # exact: /health answers "OK", nothing more
