"""The window of recent frames: which positions it can tell exactly, and when it lets go."""

from __future__ import annotations

from streamcoord.codec import Frame
from streamcoord.ids import EventId
from streamcoord.window import Window


def frames(first: int, last: int, epoch: bytes = b"e1") -> list[Frame]:
    return [Frame(n, epoch, False, b"f%d" % n) for n in range(first, last + 1)]


def seqs(got: list[Frame] | None) -> list[int] | None:
    return None if got is None else [f.seq for f in got]


def test_an_empty_window_covers_nothing() -> None:
    window = Window(10)
    assert (window.last, window.epoch, window.ended) == (0, b"", False)
    assert window.after(0, b"") is None
    assert window.start_frames(None, latest=False) is None
    assert window.start_frames(None, latest=True) is None


def test_it_tells_the_frames_after_any_position_it_covers() -> None:
    window = Window(10, frames(5, 9))
    assert seqs(window.after(4, b"e1")) == [5, 6, 7, 8, 9]  # just before the window
    assert seqs(window.after(7, b"e1")) == [8, 9]
    assert seqs(window.after(9, b"e1")) == []  # at the head: nothing yet
    assert window.after(3, b"e1") is None  # before it: 4 is not here
    assert window.after(10, b"e1") is None  # past its end: not ours to judge
    assert window.after(7, b"e2") is None  # another epoch


def test_it_keeps_at_least_limit_frames_and_at_most_twice_that() -> None:
    window = Window(4)
    for n in range(1, 101):
        window.extend(frames(n, n))
        assert min(n, 4) <= len(window) <= 8
        oldest = n - len(window) + 1  # it covers every position from just before its oldest frame
        assert window.last == n and seqs(window.after(oldest - 1, b"e1")) == list(range(oldest, n + 1))
        assert oldest == 1 or window.after(oldest - 2, b"e1") is None
    assert seqs(window.after(96, b"e1")) == [97, 98, 99, 100]


def test_a_gap_or_a_new_epoch_starts_it_afresh() -> None:
    window = Window(10, frames(1, 5))
    window.extend(frames(8, 9))  # 6 and 7 were trimmed before the hub read them
    assert seqs(window.frames) == [8, 9]
    assert window.after(5, b"e1") is None
    window.extend(frames(1, 2, b"e2"))
    assert (seqs(window.frames), window.epoch) == ([1, 2], b"e2")


def test_ended_means_the_newest_frame_is_terminal() -> None:
    window = Window(10, frames(1, 2))
    assert not window.ended
    window.extend([Frame(3, b"e1", True, b"done")])
    assert window.ended


def test_a_limit_of_zero_keeps_nothing() -> None:
    window = Window(0, frames(1, 5))
    assert len(window) == 0 and window.after(0, b"e1") is None


def test_where_a_client_starts_from_it() -> None:
    whole = Window(10, frames(1, 5))
    assert seqs(whole.start_frames(EventId("e1", 3), latest=False)) == [4, 5]
    assert seqs(whole.start_frames(EventId("e1", 3), latest=True)) == [4, 5]  # a position wins
    assert seqs(whole.start_frames(None, latest=True)) == [5]
    assert seqs(whole.start_frames(None, latest=False)) == [1, 2, 3, 4, 5]
    assert whole.start_frames(EventId("e2", 3), latest=False) is None  # another epoch
    later = Window(10, frames(4, 5))
    assert later.start_frames(None, latest=False) is None  # the stream's start is not here
    assert seqs(later.start_frames(None, latest=True)) == [5]
    assert later.start_frames(EventId("e1", 2), latest=False) is None
