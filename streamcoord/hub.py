"""The gateway's fan-out hub: one Redis reader per process, however many clients.

One task reads every stream that has listeners in this process with a single blocking XREAD
(a concrete last id per key), encodes what it read from each stream once, as one batch, and
appends that batch to each listener's queue, bounded in frames and bytes
(:mod:`streamcoord.listener`): a client in step writes it as it is. A listener that lets its
queue fill up is closed, and the task writing to it cancelled, so one slow client never holds
up the others; it resumes from Redis with Last-Event-ID.

Adding a stream while the XREAD blocks: the hub appends to its own small :class:`WakeStream`,
which the XREAD always includes, so the read returns and the next one covers the new key.

In a Redis Cluster one XREAD can neither span hash slots nor block on several, so there the
hub polls instead: one pipeline per round with one non-blocking XREAD per slot's streams,
which redis-py sends node by node (one connection per node, however many clients).

The reader survives what Redis returns: an entry no frame can be made of (written by hand) is
skipped and logged once per stream and kind (:class:`streamcoord.codec.SkipLog`), and a reader
that fails anyway is logged with its traceback and started again, with a backoff. While it is
down, :attr:`Hub.reading` is False, and the gateway's ``/ready`` answers 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from .backoff import Backoff
from .codec import Frame, SkipLog, entry_frames
from .flight import SingleFlight
from .ids import EventId
from .keys import KeySpace
from .listener import HEARTBEAT, REWIND, Listener, make_batch
from .settings import Settings
from .taskstate import Field
from .window import Window, frames_bytes, history_bytes

log = logging.getLogger(__name__)

#: Entries per key per XREAD; a stream with more pending is read again on the next call.
READ_COUNT = 500
#: How often an idle hub checks that no followed stream was created anew under it.
REVALIDATE_SECONDS = 30.0
#: Cluster polling: the pause after a round that read nothing (the added latency, at most).
POLL_SECONDS = 0.01
WAKE_TTL_SECONDS = 24 * 3600
#: The state record's fields that give a stream's position in Redis (HMGET, in this order).
POSITION_FIELDS = [Field.EPOCH, Field.LAST_SEQ]


class Position(NamedTuple):
    """A stream's position in Redis, read to confirm the hub's window before serving from it."""

    epoch: bytes
    last_seq: int
    #: The window's last sequence when the read was sent: Redis must hold at least that much.
    window_last: int

    def confirms(self, window: Window) -> bool:
        """Redis holds the stream ``window`` saw: its epoch, and at least as many events as
        the window had when this position was read (else it was created anew or cut back)."""
        return self.epoch == window.epoch and self.last_seq >= self.window_last


class _Stream:
    __slots__ = ("cursor", "epoch", "listeners", "read_after", "window")

    def __init__(self, cursor: int, window: Window) -> None:
        self.cursor = cursor
        #: The id of the last entry read when it is not the cursor's (a malformed entry was
        #: skipped after it): the next XREAD goes on after it, not after the cursor.
        self.read_after = b""
        self.epoch = b""  # of the last entry read; b"" until one was
        self.listeners: set[Listener] = set()
        #: The latest frames read, ending at ``cursor`` (or empty).
        self.window = window

    def lost_events(self, epoch: bytes | None, last_seq: int) -> bool:
        """Redis, whose state record says ``epoch`` and ``last_seq``, lost events this hub
        read: the stream was created anew (another epoch) or cut back (fewer events)."""
        renewed = self.epoch and epoch is not None and epoch != self.epoch
        return bool(renewed) or last_seq < self.cursor

    def next_read(self) -> str | bytes:
        """The id the next XREAD of this stream reads after."""
        return self.read_after or f"{self.cursor}-0"


class WakeStream:
    """A gateway's own small stream, which its hub's blocking XREAD always includes: appending
    to it makes the read return. Stream ids are persistent, so a wake-up is never missed."""

    def __init__(self, redis: Redis, key: str) -> None:
        self.key = key
        self.bkey = key.encode()
        #: The id the next XREAD reads the wake stream after.
        self.last = "0-0"
        #: A wake-up was sent since the current read began (one is enough).
        self.pending = False
        self._redis = redis
        self._sending: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Make the current read return (soon): append to the stream, in the background."""
        if not self.pending:
            self.pending = True
            task = asyncio.create_task(self._send(), name="streamcoord-hub-wake")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self) -> None:
        try:
            await self.append()
        except RedisError as exc:  # the reader's own retry covers the new key soon after
            log.warning("could not wake the hub reader: %s", exc)

    async def append(self) -> str:
        """Append an entry (the stream keeps 10, and expires unless woken for a day); its id."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self.key, {"w": "1"}, maxlen=10, approximate=False)
        pipe.expire(self.key, WAKE_TTL_SECONDS)
        entry_id, _ = await pipe.execute()
        return str(entry_id.decode())

    async def delete(self) -> None:
        with contextlib.suppress(RedisError):  # else the key expires by itself
            await self._redis.delete(self.key)


class Hub:
    """Reads all streams listened to in this process; fans events out in memory."""

    def __init__(self, reader: Redis, redis: Redis, settings: Settings, *, clustered: bool = False) -> None:
        # The blocking XREAD holds the reader's connection, so it needs a client of its own;
        # wake-ups go through ``redis`` (shared with history reads), or they would wait for it.
        self._reader = reader
        self._redis = redis
        self._settings = settings
        self._clustered = clustered
        self._changed = asyncio.Event()  # cluster polling: a stream was added
        self.gateway_id = secrets.token_hex(6)
        self._wake_stream = WakeStream(redis, KeySpace(settings.key_prefix).gateway_wake(self.gateway_id))
        self._streams: dict[bytes, _Stream] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.stats: collections.Counter[str] = collections.Counter()
        #: Reads that feeds of one stream, opening at the same moment, share: its state and
        #: tail, a page of its history, its position (to confirm a window).
        self.history_reads: SingleFlight[str, Any] = SingleFlight()
        self.page_reads: SingleFlight[tuple[str, int, int | None], list[Frame]] = SingleFlight()
        self.position_reads: SingleFlight[str, Position] = SingleFlight()
        self._revalidate_now = False  # a feed saw Redis disagree with a window
        #: Malformed entries skipped by this process's reads (the hub's, and history reads).
        self.skips = SkipLog()
        self._reading = False

    # -- listeners ---------------------------------------------------------------------------

    def subscribe(
        self, key: str, after: int, epoch: bytes = b"", seen: Sequence[Frame] = ()
    ) -> tuple[Listener, int]:
        """Listen to ``key`` from sequence ``after`` (of ``epoch``, when the caller knows it) on.

        Returns the listener and the hub's own position in that stream. When the hub is already
        past ``after``, the caller must read the events in between from Redis itself; events at
        or below the caller's position may still arrive and are the caller's to skip. ``seen``:
        frames the caller read up to ``after``, which start the window of a stream new here.
        """
        bkey = key.encode()
        stream = self._streams.get(bkey)
        if stream is None:
            window = Window(self._settings.window_events)
            if seen and seen[-1].seq == after:
                window.extend(seen[-window.limit:])
            stream = self._streams[bkey] = _Stream(after, window)
            stream.epoch = epoch  # so a stream created anew is noticed even before an entry
            self._wake()
        return self._listen(stream, bkey), stream.cursor

    def _usable_window(self, key: str) -> tuple[_Stream, Window] | None:
        stream = self._streams.get(key.encode())
        if stream is None or not stream.window or stream.window.last != stream.cursor or stream.window.ended:
            return None
        return stream, stream.window

    def has_window(self, key: str) -> bool:
        """The hub follows ``key`` and holds a window of it that new clients may start from."""
        return self._usable_window(key) is not None

    def window_last(self, key: str) -> int:
        usable = self._usable_window(key)
        return usable[1].last if usable else 0

    def attach(
        self, key: str, last_id: EventId | None, latest: bool, confirmed: Position
    ) -> tuple[Listener, list[Frame]] | None:
        """Listen to a followed stream whose window holds everything the client lacks.

        ``confirmed`` is the stream's position in Redis, read since the window reached
        ``confirmed.window_last``: the window is used only if Redis has its epoch and at least
        that many events (else the stream was created anew or cut back under the hub, which
        is told to check its streams now). Returns the listener and the frames to send first
        (history up to the hub's position), or None when the window cannot tell, or when those
        frames are more bytes than a client's history may hold (:func:`history_bytes`): then the
        caller reads Redis. Nothing is awaited, so nothing can arrive in between.
        """
        usable = self._usable_window(key)
        if usable is None:
            return None
        stream, window = usable
        if not confirmed.confirms(window):
            self._revalidate_now = True
            self._wake()
            return None
        frames = window.start_frames(last_id, latest)
        if frames is None or frames_bytes(frames) > history_bytes(self._settings):
            # Too much to hold for one client at once (big frames): it reads Redis page by page.
            return None
        self.stats["window_hits"] += 1
        return self._listen(stream, key.encode()), frames

    def _listen(self, stream: _Stream, bkey: bytes) -> Listener:
        listener = Listener(bkey, self._settings.client_queue_size, self._settings.client_queue_bytes)
        stream.listeners.add(listener)
        self.stats["subscribed"] += 1
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        listener.close("unsubscribed")
        stream = self._streams.get(listener.key)
        if stream is not None:
            stream.listeners.discard(listener)
            if not stream.listeners:
                del self._streams[listener.key]

    def close_all(self, reason: str) -> None:
        """Close every listener (graceful shutdown): their streams end and clients reconnect."""
        for stream in self._streams.values():
            for listener in stream.listeners:
                listener.close(reason)

    @property
    def listener_count(self) -> int:
        return sum(len(s.listeners) for s in self._streams.values())

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def reading(self) -> bool:
        """The reader is running (started, and not down between a failure and its restart)."""
        return self._reading

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._clustered:
            self._wake_stream.last = await self._wake_stream.append()
        self._reading = True
        self._tasks = [
            asyncio.create_task(self._keep_reading(), name="streamcoord-hub-reader"),
            asyncio.create_task(self._heartbeat_forever(), name="streamcoord-hub-heartbeat"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._reading = False
        self.close_all("shutdown")
        await self._wake_stream.delete()

    # -- reading -----------------------------------------------------------------------------

    def _wake(self) -> None:
        """Make the reader notice a new stream, or a request to revalidate, now."""
        if self._clustered:
            self._changed.set()
        elif self._tasks:  # started: a read is (or will be) in flight
            self._wake_stream.wake()

    async def _keep_reading(self) -> None:
        """Run the reader; if it fails (a bug, a reply of a shape no one expected), log why
        and run it again after a backoff. Positions are kept, so nothing is lost meanwhile."""
        backoff = Backoff(first=0.1, cap=5.0)
        while True:
            reads = self.stats["reads"]
            self._reading = True
            try:
                await (self._poll_forever() if self._clustered else self._read_forever())
            except Exception:  # anything: a reader that stays dead freezes every stream here
                self._reading = False
                if self.stats["reads"] > reads:
                    backoff.reset()  # it read since its last start: not a failure in a row
                delay = backoff.delay()
                log.exception("hub reader failed; restarting it in %.2fs", delay)
                self.stats["reader_restarts"] += 1
                await asyncio.sleep(delay)

    async def _read_forever(self) -> None:
        backoff = Backoff(first=0.05, cap=2.0)
        revalidate_at = time.monotonic() + REVALIDATE_SECONDS
        while True:
            if self._revalidate_now or time.monotonic() >= revalidate_at:
                self._revalidate_now = False
                try:
                    await self._revalidate()
                    revalidate_at = time.monotonic() + REVALIDATE_SECONDS
                except (RedisError, OSError):
                    pass  # the read below fails too and backs off
            self._wake_stream.pending = False
            wanted: dict[str | bytes, str | bytes] = {self._wake_stream.key: self._wake_stream.last}
            for key, stream in self._streams.items():
                wanted[key] = stream.next_read()
            try:
                reply: Any = await self._reader.xread(
                    wanted, count=READ_COUNT, block=self._settings.block_ms  # type: ignore[arg-type]
                )
            except (RedisError, OSError) as exc:  # reads with explicit ids are safe to retry
                # Positions are kept, so nothing is lost: the next read resumes from them (also
                # after a Sentinel failover, whose blocked reads fail with -UNBLOCKED).
                delay = backoff.delay()
                log.warning("hub read failed (%s); retrying in %.2fs", exc, delay)
                self.stats["read_errors"] += 1
                await asyncio.sleep(delay)
                revalidate_at = 0  # Redis may have lost data while we were away
                continue
            backoff.reset()
            self.stats["reads"] += 1
            for key, entries in reply or ():
                self._dispatch(key, entries)

    async def _poll_forever(self) -> None:
        """The cluster's reader: poll every followed stream, one pipeline per round."""
        backoff = Backoff(first=0.05, cap=2.0)
        revalidate_at = time.monotonic() + REVALIDATE_SECONDS
        while True:
            by_slot: dict[int, dict[str | bytes, str | bytes]] = {}
            for key, stream in self._streams.items():
                by_slot.setdefault(key_slot(key), {})[key] = stream.next_read()
            if not by_slot:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._settings.block_ms / 1000)
                continue
            try:
                if self._revalidate_now or time.monotonic() >= revalidate_at:
                    self._revalidate_now = False
                    await self._revalidate()
                    revalidate_at = time.monotonic() + REVALIDATE_SECONDS
                pipe = self._reader.pipeline(transaction=False)
                for streams in by_slot.values():
                    pipe.xread(streams, count=READ_COUNT)  # type: ignore[arg-type]
                replies: Any = await pipe.execute()
            except (RedisError, OSError) as exc:  # reads with explicit ids are safe to retry
                delay = backoff.delay()
                log.warning("hub poll failed (%s); retrying in %.2fs", exc, delay)
                self.stats["read_errors"] += 1
                await asyncio.sleep(delay)
                revalidate_at = 0
                continue
            backoff.reset()
            self.stats["reads"] += 1
            read = False
            for reply in replies:
                for key, entries in reply or ():
                    self._dispatch(key, entries)
                    read = True
            if not read:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), POLL_SECONDS)

    def _dispatch(self, key: bytes, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        if key == self._wake_stream.bkey:
            self._wake_stream.last = entries[-1][0].decode()
            return
        stream = self._streams.get(key)
        if stream is None:  # the last listener left while the read was in flight
            return
        frames, skipped = entry_frames(entries)
        if skipped:
            self.skips.report(key, skipped)
            self.stats["skipped_entries"] += len(skipped)
        last_id = entries[-1][0]
        if not frames:
            stream.read_after = last_id
            return
        stream.cursor, stream.epoch = frames[-1].seq, frames[-1].epoch
        stream.read_after = b"" if last_id == b"%d-0" % stream.cursor else last_id
        stream.window.extend(frames)
        batch = make_batch(frames)
        for listener in stream.listeners:
            listener.push(batch)
        self.stats["events"] += len(frames)
        self.stats["deliveries"] += len(frames) * len(stream.listeners)

    async def _revalidate(self) -> None:
        """Rewind the cursor of every followed stream that lost events in Redis (created anew
        under a new epoch, or cut back by a failover): XREAD from the old position would skip
        what is written from now on. Listeners are told, and reset their clients."""
        followed = list(self._streams.items())
        if not followed:
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, _ in followed:
            pipe.hmget(KeySpace.state_of(key), POSITION_FIELDS)
        replies = await pipe.execute()
        for (key, stream), (epoch, last_seq) in zip(followed, replies, strict=True):
            if not (last_seq or b"0").isdigit():
                continue  # a state record written by hand: it cannot tell
            if stream.lost_events(epoch, int(last_seq or 0)):
                log.info("stream %s lost events in Redis; reading it from its start", key.decode())
                stream.cursor, stream.epoch, stream.read_after = 0, b"", b""
                stream.window.clear()
                self.stats["rewinds"] += 1
                for listener in stream.listeners:
                    listener.push(REWIND)

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            for stream in self._streams.values():
                for listener in stream.listeners:
                    listener.push(HEARTBEAT)
