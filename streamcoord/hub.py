"""The gateway's fan-out hub: one Redis reader per process, however many clients.

One task reads every stream that has listeners in this process with a single blocking XREAD
(a concrete last id per key), encodes what it read from each stream once, as one batch, and
appends that batch to each listener's bounded queue: a client in step writes it as it is. A listener that lets its queue fill up is closed, and the task
writing to it cancelled, so one slow client never holds up the others; it resumes from Redis
with Last-Event-ID.

Adding a stream while the XREAD blocks: the hub appends to its own small wake stream, which the
XREAD always includes, so the read returns and the next one covers the new key. Stream ids are
persistent, so a wake-up can never be missed.

In a Redis Cluster one XREAD can neither span hash slots nor block on several, so there the
hub polls instead: one pipeline per round with one non-blocking XREAD per slot's streams,
which redis-py sends node by node (one connection per node, however many clients).
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

from . import sse
from .codec import Frame, entry_frame
from .flight import SingleFlight
from .ids import EventId
from .keys import KeySpace
from .settings import Settings
from .window import Window

log = logging.getLogger(__name__)

#: Entries per key per XREAD; a stream with more pending is read again on the next call.
READ_COUNT = 500
#: How often an idle hub checks that no followed stream was created anew under it.
REVALIDATE_SECONDS = 30.0
#: Cluster polling: the pause after a round that read nothing (the added latency, at most).
POLL_SECONDS = 0.01
WAKE_TTL_SECONDS = 24 * 3600


class Batch(NamedTuple):
    """What one XREAD brought from one stream, encoded once and shared by every listener."""

    frames: tuple[Frame, ...]
    #: The frames' bytes, joined: what a listener in step with the stream writes.
    data: bytes
    #: The epoch of every frame, or b"" when they differ (then listeners go frame by frame).
    epoch: bytes
    first: int  # sequence of the first frame; 0 for a heartbeat, -1 for a rewind
    last: int
    terminal: bool

    @property
    def heartbeat(self) -> bool:
        return self.first == 0

    @property
    def rewind(self) -> bool:
        """Redis lost events of this stream: what a listener sent may no longer exist."""
        return self.first == -1


def make_batch(frames: list[Frame]) -> Batch:
    epoch = frames[0].epoch if all(f.epoch == frames[0].epoch for f in frames) else b""
    return Batch(
        tuple(frames), b"".join(f.data for f in frames), epoch,
        frames[0].seq, frames[-1].seq, any(f.terminal for f in frames),
    )


HEARTBEAT = Batch((), sse.HEARTBEAT, b"", 0, 0, False)
REWIND = Batch((), b"", b"", -1, -1, False)


class Position(NamedTuple):
    """A stream's position in Redis, read to confirm the hub's window before serving from it."""

    epoch: bytes
    last_seq: int
    #: The window's last sequence when the read was sent: Redis must hold at least that much.
    window_last: int


class Listener:
    """One client's bounded queue of batches from one stream.

    The bound is checked when a batch arrives: a client still holding ``limit`` frames it has
    not taken is not keeping up. A client that keeps up takes whole batches, so a burst larger
    than the bound (one XREAD returns up to READ_COUNT events) does not cut it.
    """

    __slots__ = ("_loop", "_waiter", "batches", "closed", "key", "limit", "pending", "task")

    def __init__(self, key: bytes, limit: int) -> None:
        self.key = key
        self.limit = limit
        self.batches: list[Batch] = []
        self.pending = 0  # frames in ``batches`` (a heartbeat counts as one)
        # A bare future per wait, not an asyncio.Event: this is paid once per client per batch,
        # and Event.wait looks up the running loop each time (a getpid() system call on 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: Why the listener was closed ("overflow", "shutdown"), or None while open.
        self.closed: str | None = None
        #: The task writing this listener's frames; cancelled when the listener overflows.
        self.task: asyncio.Task[Any] | None = None

    def push(self, batch: Batch) -> None:
        """Queue a batch, or close the listener if it is not keeping up."""
        if self.closed:
            return
        if self.pending >= self.limit:
            self.close("overflow")
            if self.task is not None:
                self.task.cancel()
            return
        self.batches.append(batch)
        self.pending += len(batch.frames) or 1
        self._wake()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = reason
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Batch]:
        """Wait for batches and take all of them (empty once closed and drained)."""
        while not self.batches and not self.closed:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        taken, self.batches, self.pending = self.batches, [], 0
        return taken


class _Stream:
    __slots__ = ("cursor", "epoch", "listeners", "window")

    def __init__(self, cursor: int, window: Window) -> None:
        self.cursor = cursor
        self.epoch = b""  # of the last entry read; b"" until one was
        self.listeners: set[Listener] = set()
        #: The latest frames read, ending at ``cursor`` (or empty).
        self.window = window


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
        self._wake_key = KeySpace(settings.key_prefix).gateway_wake(self.gateway_id)
        self._wake_last = "0-0"
        self._wake_pending = False
        self._waking: set[asyncio.Task[None]] = set()
        self._streams: dict[bytes, _Stream] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.stats: collections.Counter[str] = collections.Counter()
        #: Reads that feeds of one stream, opening at the same moment, share: its state and
        #: tail, a page of its history, its position (to confirm a window).
        self.history_reads: SingleFlight[str, Any] = SingleFlight()
        self.page_reads: SingleFlight[tuple[str, int, int | None], list[Frame]] = SingleFlight()
        self.position_reads: SingleFlight[str, Position] = SingleFlight()
        self._revalidate_now = False  # a feed saw Redis disagree with a window

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
        (history up to the hub's position), or None when the window cannot tell (then the
        caller reads Redis). Nothing is awaited, so nothing can arrive in between.
        """
        usable = self._usable_window(key)
        if usable is None:
            return None
        stream, window = usable
        if confirmed.epoch != window.epoch or confirmed.last_seq < confirmed.window_last:
            self._revalidate_now = True
            self._wake()
            return None
        if last_id is not None:
            frames = window.after(last_id.seq, last_id.epoch.encode())
        elif latest:
            frames = window.frames[-1:] or None
        else:
            frames = window.after(0, window.epoch)
        if frames is None:
            return None
        self.stats["window_hits"] += 1
        return self._listen(stream, key.encode()), frames

    def _listen(self, stream: _Stream, bkey: bytes) -> Listener:
        listener = Listener(bkey, self._settings.client_queue_size)
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

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._clustered:
            self._wake_last = await self._append_wake()
        reader = self._poll_forever() if self._clustered else self._read_forever()
        self._tasks = [
            asyncio.create_task(reader, name="streamcoord-hub-reader"),
            asyncio.create_task(self._heartbeat_forever(), name="streamcoord-hub-heartbeat"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.close_all("shutdown")
        with contextlib.suppress(RedisError):  # else the key expires by itself
            await self._redis.delete(self._wake_key)

    # -- reading -----------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._clustered:
            self._changed.set()
        elif not self._wake_pending and self._tasks:
            self._wake_pending = True
            task = asyncio.create_task(self._send_wake(), name="streamcoord-hub-wake")
            self._waking.add(task)
            task.add_done_callback(self._waking.discard)

    async def _send_wake(self) -> None:
        try:
            await self._append_wake()
        except RedisError as exc:  # the reader's own retry covers the new key soon after
            log.warning("could not wake the hub reader: %s", exc)

    async def _append_wake(self) -> str:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"w": "1"}, maxlen=10, approximate=False)
        pipe.expire(self._wake_key, WAKE_TTL_SECONDS)
        entry_id, _ = await pipe.execute()
        return str(entry_id.decode())

    async def _read_forever(self) -> None:
        backoff = 0.05
        revalidate_at = time.monotonic() + REVALIDATE_SECONDS
        while True:
            if self._revalidate_now or time.monotonic() >= revalidate_at:
                self._revalidate_now = False
                try:
                    await self._revalidate()
                    revalidate_at = time.monotonic() + REVALIDATE_SECONDS
                except (RedisError, OSError):
                    pass  # the read below fails too and backs off
            self._wake_pending = False
            wanted: dict[str | bytes, str] = {self._wake_key: self._wake_last}
            for key, stream in self._streams.items():
                wanted[key] = f"{stream.cursor}-0"
            try:
                reply: Any = await self._reader.xread(
                    wanted, count=READ_COUNT, block=self._settings.block_ms  # type: ignore[arg-type]
                )
            except (RedisError, OSError) as exc:  # reads with explicit ids are safe to retry
                # Positions are kept, so nothing is lost: the next read resumes from them (also
                # after a Sentinel failover, whose blocked reads fail with -UNBLOCKED).
                log.warning("hub read failed (%s); retrying in %.2fs", exc, backoff)
                self.stats["read_errors"] += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                revalidate_at = 0  # Redis may have lost data while we were away
                continue
            backoff = 0.05
            self.stats["reads"] += 1
            for key, entries in reply or ():
                self._dispatch(key, entries)

    async def _poll_forever(self) -> None:
        """The cluster's reader: poll every followed stream, one pipeline per round."""
        backoff = 0.05
        revalidate_at = time.monotonic() + REVALIDATE_SECONDS
        while True:
            by_slot: dict[int, dict[str | bytes, str]] = {}
            for key, stream in self._streams.items():
                by_slot.setdefault(key_slot(key), {})[key] = f"{stream.cursor}-0"
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
                log.warning("hub poll failed (%s); retrying in %.2fs", exc, backoff)
                self.stats["read_errors"] += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                revalidate_at = 0
                continue
            backoff = 0.05
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
        if key == self._wake_key.encode():
            self._wake_last = entries[-1][0].decode()
            return
        stream = self._streams.get(key)
        if stream is None:  # the last listener left while the read was in flight
            return
        frames = [entry_frame(entry_id, fields) for entry_id, fields in entries]
        stream.cursor, stream.epoch = frames[-1].seq, frames[-1].epoch
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
            pipe.hmget(KeySpace.state_of(key), ["epoch", "last_seq"])
        replies = await pipe.execute()
        for (key, stream), (epoch, last_seq) in zip(followed, replies, strict=True):
            renewed = stream.epoch and epoch is not None and epoch != stream.epoch
            if renewed or int(last_seq or 0) < stream.cursor:
                log.info("stream %s lost events in Redis; reading it from its start", key.decode())
                stream.cursor, stream.epoch = 0, b""
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
