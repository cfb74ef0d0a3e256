"""The latest events of one stream, kept encoded by a gateway process.

A window holds frames contiguous in sequence and of one epoch, so it can tell exactly which
positions it covers: a client whose last event is in the window (or just before it) is sent
the rest from memory, without a Redis read or a decode. Anything that breaks contiguity (a
trimmed or lost range, a stream created anew) empties the window, which then grows again from
the next frame.

The functions at the end measure runs of frames in bytes: what a client's history holds in
memory at once is bounded in bytes (:func:`history_bytes`), not only in frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from .codec import Frame
from .ids import EventId
from .settings import Settings


class Window:
    """Up to ``limit`` frames, oldest first (kept up to twice that, trimmed in one step)."""

    __slots__ = ("frames", "limit")

    def __init__(self, limit: int, frames: Iterable[Frame] = ()) -> None:
        self.limit = limit
        self.frames: list[Frame] = []
        self.extend(frames)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def last(self) -> int:
        """Sequence of the newest frame (0 when empty)."""
        return self.frames[-1].seq if self.frames else 0

    @property
    def epoch(self) -> bytes:
        return self.frames[0].epoch if self.frames else b""

    @property
    def ended(self) -> bool:
        """The newest frame is a terminal event."""
        return bool(self.frames) and self.frames[-1].terminal

    def clear(self) -> None:
        self.frames = []

    def extend(self, frames: Iterable[Frame]) -> None:
        if self.limit <= 0:
            return
        kept = self.frames
        for frame in frames:
            if kept and (frame.seq != kept[-1].seq + 1 or frame.epoch != kept[-1].epoch):
                kept = self.frames = []  # not contiguous: what we held no longer leads here
            kept.append(frame)
        if len(kept) > 2 * self.limit:  # amortised: one slice per ``limit`` frames
            del kept[: len(kept) - self.limit]

    def after(self, seq: int, epoch: bytes) -> list[Frame] | None:
        """The frames after ``seq`` of ``epoch``, or None when the window cannot tell them all
        (another epoch, a position before the window or past its end, an empty window)."""
        frames = self.frames
        if not frames or epoch != frames[0].epoch or not frames[0].seq - 1 <= seq <= frames[-1].seq:
            return None
        return frames_after(frames, seq)

    def start_frames(self, last_id: EventId | None, latest: bool) -> list[Frame] | None:
        """What a client starting from the window is sent first: the frames after ``last_id``,
        else the latest frame alone (``latest``), else the whole stream; None when the window
        cannot tell (it does not reach back that far, or holds another epoch)."""
        if last_id is not None:
            return self.after(last_id.seq, last_id.epoch.encode())
        if latest:
            return self.frames[-1:] or None
        return self.after(0, self.epoch)


def frames_after(frames: list[Frame], seq: int) -> list[Frame]:
    """The frames of a contiguous run (oldest first) with a sequence above ``seq``: all of them
    when ``seq`` is before the run, none when it is at or past its end."""
    if not frames:
        return []
    return frames[max(seq + 1 - frames[0].seq, 0):]


def history_bytes(settings: Settings) -> int:
    """Bytes of encoded frames one client's history may hold in memory at once: half of its
    ``client_queue_bytes``, so the other half is room for live events queued meanwhile. A
    client starting from the window gets it only if what it is sent from there fits (else it
    reads Redis); one reading Redis holds the snapshot's tail and a page, half of it each."""
    return max(settings.client_queue_bytes // 2, 1)


def frames_bytes(frames: Iterable[Frame]) -> int:
    """The encoded size of ``frames``."""
    return sum(len(frame.data) for frame in frames)


def newest_within(frames: list[Frame], limit: int) -> list[Frame]:
    """The newest frames of ``frames`` (oldest first) whose sizes add up to at most ``limit``
    bytes; the newest one at least. ``frames`` itself when all of them fit (never changed)."""
    size = 0
    for index in range(len(frames) - 1, -1, -1):
        size += len(frames[index].data)
        if size > limit:
            return frames[min(index + 1, len(frames) - 1):]
    return frames


def runs_within(frames: Sequence[Frame], limit: int, used: int = 0) -> Iterator[Sequence[Frame]]:
    """``frames`` cut, in order, into runs of at most ``limit`` bytes (a larger frame goes
    alone), the first of at most ``limit - used`` (it may be empty: ``used`` is full already)."""
    start, size = 0, used
    for index, frame in enumerate(frames):
        if size and size + len(frame.data) > limit:
            yield frames[start:index]
            start, size = index, 0
        size += len(frame.data)
    if start < len(frames):
        yield frames[start:]
