"""A task's history as one feed reads it from Redis: page by page, each read shared.

A feed that does not start from the hub's window starts from a snapshot: the state record and
the latest frames of the stream (its *tail*), read in one round trip. Older history is read
from Redis a page at a time, up to the tail, then the tail is sent from memory. Pages are
read with an explicit range, and feeds of one stream asking for the same range at the same
moment share one read (a reconnect storm reads each page once). A page may start later than
asked when that range was trimmed away meanwhile: what the client is told then is the reset
policy's (:mod:`streamcoord.resets`). A malformed entry (written by hand) is left out of its
page, and reported to the hub's log.

A page is bounded in bytes, not only in frames: a feed holds one in memory while its client
takes it, and a client that stops reading holds it until it is cut. Redis counts entries only,
so a page asks for as many as fit in half of :func:`streamcoord.window.history_bytes` at the
average size of the frames read so far (the tail, then each page), never more than
:data:`HISTORY_PAGE`.
"""

from __future__ import annotations

import functools
from typing import Any

from .codec import Frame, entry_frames
from .eventlog import EventLog
from .hub import Hub
from .keys import TaskRef
from .window import frames_after, frames_bytes, history_bytes

#: Frames per page read from Redis, at most (fewer when they are big).
HISTORY_PAGE = 1000
#: The size of an SSE frame besides its payload (``id:``, ``event:``, ``data:`` lines), about:
#: with ``max_payload_bytes``, what a frame may take before any was read.
FRAME_OVERHEAD = 128


class History:
    """One feed's reads of ``ref``'s stream, ending at ``tail`` (the snapshot's latest frames,
    oldest first; empty for a feed started from the hub's window)."""

    def __init__(self, log: EventLog, hub: Hub, ref: TaskRef, tail: list[Frame]) -> None:
        self.key = log.keys.events(ref)
        self.tail = tail
        self._log = log
        self._hub = hub
        self._ref = ref
        self._tail_sent = False
        self._page_bytes = max(history_bytes(log.settings) // 2, 1)
        #: The average size of the frames read last (a guess before any was).
        self._frame_bytes = self._average(tail, log.settings.max_payload_bytes + FRAME_OVERHEAD)

    @staticmethod
    def _average(frames: list[Frame], default: int) -> int:
        return max(frames_bytes(frames) // len(frames), 1) if frames else default

    @property
    def page_size(self) -> int:
        """Frames the next page asks Redis for: about half a client's history bytes."""
        return max(1, min(HISTORY_PAGE, self._page_bytes // self._frame_bytes))

    async def page(self, after: int, before: int | None = None) -> list[Frame]:
        """Up to :attr:`page_size` frames after ``after`` (and before ``before``), from Redis.
        Shared with other feeds (a read in flight is shared whatever its size: feeds of one
        stream guess alike): never change it in place."""
        read = functools.partial(self._read_page, after, before, self.page_size)
        frames, _ = await self._hub.page_reads.run((self.key, after, before), read)
        self._frame_bytes = self._average(frames, self._frame_bytes)
        return frames

    async def _read_page(self, after: int, before: int | None, count: int) -> list[Frame]:
        high = f"({before}-0" if before is not None else "+"
        entries: Any = await self._log.redis.xrange(self.key, f"({after}-0", high, count=count)
        frames, skipped = entry_frames(entries)
        self._hub.skips.report(self.key, skipped)
        return frames

    async def first_page(self, after: int) -> list[Frame]:
        """The first frames after ``after``: from the tail when it reaches back that far, else a
        page from Redis (the tail, when that range was trimmed away)."""
        tail = self.tail
        if not tail or after >= tail[0].seq - 1:
            return frames_after(tail, after)
        return await self.page(after, tail[0].seq) or tail

    async def next_page(self, last: int) -> list[Frame] | None:
        """The frames that follow ``last`` (what the feed has sent): pages from Redis up to the
        tail, then the rest of the tail; None once the tail was given."""
        if self._tail_sent:
            return None
        tail = self.tail
        if tail and last < tail[0].seq - 1:
            page = await self.page(last, tail[0].seq)
            if page:
                return page
            # Trimmed away under us: the tail goes on from where the stream does.
        self._tail_sent = True
        return frames_after(tail, last)
