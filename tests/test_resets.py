"""The reset policy: when a client is reset and why, and the bytes of a reset. Pure: no Redis."""

from __future__ import annotations

import pytest

from streamcoord.codec import RESERVED_TYPES, Frame
from streamcoord.ids import EventId
from streamcoord.keys import TaskRef
from streamcoord.resets import (
    RESET_EVENT,
    ResetReason,
    epoch_reset,
    gap_reset,
    reset_frame,
    resume_reset,
)

REF = TaskRef("shop", "Job", "7")


def run(first: int, last: int, epoch: bytes = b"e1") -> list[Frame]:
    return [Frame(n, epoch, False, b"") for n in range(first, last + 1)]


def test_the_wire_values_are_the_documented_ones() -> None:
    assert [r.value for r in ResetReason] == ["epoch", "position", "trimmed", "expired", "lost"]
    assert RESET_EVENT in RESERVED_TYPES  # a task cannot send one itself


def test_a_reset_frame_is_byte_exact() -> None:
    assert reset_frame(ResetReason.TRIMMED, b"3f9a02bc", REF) == (
        b"event: reset\n"
        b'data: {"reason":"trimmed","epoch":"3f9a02bc","_task_id":7,"_model":"Job","_app":"shop"}\n\n'
    )
    assert reset_frame(ResetReason.LOST, b"", TaskRef("shop", "Job", "007")) == (
        b'event: reset\ndata: {"reason":"lost","epoch":"","_task_id":"007","_model":"Job","_app":"shop"}\n\n'
    )


@pytest.mark.parametrize(
    ("last_id", "epoch", "last_seq", "page", "expected"),
    [
        # The stream holds what follows: no reset.
        (EventId("e1", 4), b"e1", 9, run(5, 9), None),
        (EventId("e1", 9), b"e1", 9, [], None),  # at the head
        # Another incarnation of the stream, or a stream without an epoch yet.
        (EventId("e0", 4), b"e1", 9, run(5, 9), ResetReason.EPOCH),
        (EventId("e1", 4), b"", 0, [], ResetReason.EPOCH),
        # Past the end: Redis lost the tail the client saw.
        (EventId("e1", 12), b"e1", 9, [], ResetReason.POSITION),
        # What follows the client's event was trimmed away (or nothing is retained at all).
        (EventId("e1", 4), b"e1", 9, run(7, 9), ResetReason.TRIMMED),
        (EventId("e1", 4), b"e1", 9, [], ResetReason.TRIMMED),
    ],
)
def test_on_connecting(
    last_id: EventId, epoch: bytes, last_seq: int, page: list[Frame], expected: ResetReason | None
) -> None:
    assert resume_reset(last_id, epoch, last_seq, page) is expected


def test_on_a_connected_client() -> None:
    assert epoch_reset(b"e1", b"e1") is None
    assert epoch_reset(b"e1", b"e2") is ResetReason.EPOCH  # created anew under it
    assert epoch_reset(b"", b"e2") is None  # nothing sent yet (or since a reset): nothing to undo
    assert gap_reset(4, 5) is None
    assert gap_reset(4, 7) is ResetReason.TRIMMED  # 5 and 6 are gone
    assert gap_reset(0, 7) is None  # nothing sent yet: the stream simply starts at 7
