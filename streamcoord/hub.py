"""The gateway's fan-out hub: one Redis subscription per process, however many clients.

Every event reaches a gateway by Redis Pub/Sub: ``append.lua`` publishes it on its task's shard
channel in the same atomic step as the XADD, with its sequence and epoch. The hub follows the
channel of every stream that has listeners in this process (:mod:`streamcoord.subscriber`: one
connection per Redis node, no polling), encodes what arrived from one stream once, as one batch,
and appends that batch to each listener's queue, bounded in frames and bytes
(:mod:`streamcoord.listener`): a client in step writes it as it is. Messages that arrive
together (a burst, or a busy loop) go out as one batch per stream. A listener that lets its
queue fill up is closed, and the task writing to it cancelled, so one slow client never holds
up the others; it resumes from Redis with Last-Event-ID.

Pub/Sub may lose messages; the stream never does, and the hub never skips an event:

- a stream's position (its ``cursor``) moves only from one sequence number to the next. A
  message that does not follow it is a gap: the hub reads the stream after the cursor
  (XRANGE) and goes on from there; later messages wait in the stream's buffer meanwhile;
- a stream is read the same way once its subscription is confirmed, the first time and after
  every reconnection (a dropped connection, a Redis restart or failover, Redis cutting the
  subscriber over its output-buffer limit, a cluster slot that moved), so what was published
  before the subscription is never missed: subscribe first, then read, then order by sequence;
- each such read also checks the stream's epoch and length in its state record: a stream
  created anew, or cut back by a failover, makes the hub read it from its start again, and its
  listeners reset their clients (:data:`REWIND`). Every :data:`REVALIDATE_SECONDS` the hub
  checks all streams that way, which also finds a lost message after which none came (a
  stream still short, at one check, of what Redis held at the check before is read).

Catch-up reads of many streams share one pipeline. The reader survives what Redis holds: an
entry or message no frame can be made of (written by hand) is skipped and logged once per stream
and kind (:class:`streamcoord.codec.SkipLog`). While the subscriber is not connected,
:attr:`Hub.reading` is False, and the gateway's ``/ready`` answers 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .backoff import Backoff
from .codec import Frame, MalformedEntry, SkipLog, Skipped, entry_frames, live_frame
from .flight import SingleFlight
from .ids import EventId
from .keys import KeySpace
from .listener import HEARTBEAT, REWIND, Listener, make_batch
from .settings import Settings
from .subscriber import Connector, Subscriber
from .taskstate import Field
from .window import Window, frames_bytes, history_bytes

log = logging.getLogger(__name__)

#: Entries per stream per catch-up read; a stream with more is read again in the next round.
READ_COUNT = 500
#: Streams per catch-up round (one pipeline).
CATCH_UP_STREAMS = 1000
#: How often the hub checks every followed stream against its state record.
REVALIDATE_SECONDS = 30.0
#: Live messages a stream keeps while it is read; past this they are dropped and read again.
BUFFER_LIMIT = 1000
#: Builds a listener of a stream (its key): see :meth:`Hub.subscribe`.
ListenerFactory = Callable[[bytes], Listener]
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


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CountedFlight(SingleFlight[K, V]):
    """A :class:`SingleFlight` that adds the events each call read (``size`` of its result) to
    ``stats[events]``, and the call to ``stats[calls]``: once per read of Redis, however many
    feeds share it (the gateway's metrics count what the process took from Redis)."""

    def __init__(
        self, stats: collections.Counter[str], size: Callable[[V], int], events: str, calls: str | None = None
    ) -> None:
        super().__init__()
        self._stats, self._size = stats, size
        self._events_key, self._calls_key = events, calls

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        async def counted() -> V:  # runs only for the caller that starts the read
            value = await call()
            self._stats[self._events_key] += self._size(value)
            if self._calls_key is not None:
                self._stats[self._calls_key] += 1
            return value

        return await super().run(key, counted)


class _Stream:
    __slots__ = (
        "buffer", "channel", "checked", "cursor", "epoch", "generation", "key", "listeners",
        "queued", "read_after", "subscribed", "window",
    )

    def __init__(self, key: bytes, cursor: int, window: Window) -> None:
        self.key = key
        self.channel = KeySpace.live_of(key)
        self.cursor = cursor
        #: The id of the last entry read when it is not the cursor's (a malformed entry was
        #: skipped after it): the next read goes on after it, not after the cursor.
        self.read_after = b""
        self.epoch = b""  # of the last event; b"" until one was seen
        self.listeners: set[Listener] = set()
        #: The latest frames, ending at ``cursor`` (or empty).
        self.window = window
        #: The server confirmed the subscription to ``channel`` (and has not dropped it since).
        self.subscribed = False
        #: None while live messages go straight out; else they wait here (the stream is being
        #: read, or not subscribed yet).
        self.buffer: list[Frame] | None = []
        #: A catch-up read of the stream is queued or in flight.
        self.queued = False
        #: Moves on whenever what a read in flight saw stops being enough to go live from: the
        #: subscription was lost or made again, or live messages were dropped meanwhile.
        self.generation = 0
        #: The last sequence Redis held at the previous periodic check (0: none yet).
        self.checked = 0

    def lost_events(self, epoch: bytes | None, last_seq: int) -> bool:
        """Redis, whose state record says ``epoch`` and ``last_seq``, lost events this hub
        read: the stream was created anew (another epoch) or cut back (fewer events)."""
        renewed = self.epoch and epoch is not None and epoch != self.epoch
        return bool(renewed) or last_seq < self.cursor

    def next_read(self) -> bytes:
        """The start of the next read of this stream: exclusive, after the cursor."""
        return b"(" + (self.read_after or b"%d-0" % self.cursor)


class Hub:
    """Follows all streams listened to in this process; fans events out in memory."""

    def __init__(self, connector: Connector, redis: Redis, settings: Settings) -> None:
        # Catch-up reads and checks go through ``redis`` (shared with history reads); live
        # messages come through the subscriber's own connections.
        self._redis = redis
        self._settings = settings
        self.gateway_id = secrets.token_hex(6)
        self._subscriber = Subscriber(connector, self)
        self._streams: dict[bytes, _Stream] = {}
        self._by_channel: dict[bytes, _Stream] = {}
        #: Streams whose catch-up read is queued (ordered: the oldest request goes first).
        self._behind: dict[bytes, None] = {}
        self._behind_now = asyncio.Event()
        #: Frames that went live since the last flush, per stream: sent out together.
        self._ready: dict[_Stream, list[Frame]] = {}
        self._flush_soon = False
        self._tasks: list[asyncio.Task[None]] = []
        self.stats: collections.Counter[str] = self._subscriber.stats  # one set of counters
        #: Reads that feeds of one stream, opening at the same moment, share: its state and
        #: tail, a page of its history, its position (to confirm a window).
        # (A snapshot's events: its tail and the malformed entries left out of it.)
        self.history_reads: SingleFlight[str, Any] = CountedFlight(
            self.stats, lambda snapshot: len(snapshot.tail) + len(snapshot.skipped), "history_read_events"
        )
        self.page_reads: SingleFlight[tuple[str, int, int | None], list[Frame]] = CountedFlight(
            self.stats, len, "history_read_events", "history_pages"
        )
        self.position_reads: SingleFlight[str, Position] = SingleFlight()
        self._revalidate_now = False  # a feed saw Redis disagree with a window
        self._check_now = asyncio.Event()
        #: Malformed entries skipped by this process's reads (the hub's, and history reads).
        self.skips = SkipLog()
        self._started = False

    # -- listeners ---------------------------------------------------------------------------

    def subscribe(
        self, key: str, after: int, epoch: bytes = b"", seen: Sequence[Frame] = (),
        make: ListenerFactory | None = None,
    ) -> tuple[Listener, int]:
        """Listen to ``key`` from sequence ``after`` (of ``epoch``, when the caller knows it) on.

        Returns the listener and the hub's own position in that stream. When the hub is already
        past ``after``, the caller must read the events in between from Redis itself; events at
        or below the caller's position may still arrive and are the caller's to skip. ``seen``:
        frames the caller read up to ``after``, which start the window of a stream new here.
        ``make``: builds the listener (one of a multiplexed connection's, say) instead of a
        :class:`Listener` with the client queue's bounds.
        """
        bkey = key.encode()
        stream = self._streams.get(bkey)
        if stream is None:
            window = Window(self._settings.window_events)
            if seen and seen[-1].seq == after:
                window.extend(seen[-window.limit:])
            stream = self._streams[bkey] = _Stream(bkey, after, window)
            stream.epoch = epoch  # so a stream created anew is noticed even before an event
            self._by_channel[stream.channel] = stream
            if self._started:
                self._subscriber.add(stream.channel)
        return self._listen(stream, make), stream.cursor

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
        self, key: str, last_id: EventId | None, latest: bool, confirmed: Position,
        make: ListenerFactory | None = None,
    ) -> tuple[Listener, list[Frame]] | None:
        """Listen to a followed stream whose window holds everything the client lacks.

        ``confirmed`` is the stream's position in Redis, read since the window reached
        ``confirmed.window_last``: the window is used only if Redis has its epoch and at least
        that many events (else the stream was created anew or cut back under the hub, which
        is told to check its streams now). Returns the listener and the frames to send first
        (history up to the hub's position), or None when the window cannot tell, or when those
        frames are more bytes than a client's history may hold (:func:`history_bytes`): then the
        caller reads Redis. Nothing is awaited, so nothing can arrive in between. ``make``: as
        for :meth:`subscribe`.
        """
        usable = self._usable_window(key)
        if usable is None:
            return None
        stream, window = usable
        if not confirmed.confirms(window):
            self._revalidate_now = True
            self._check_now.set()
            return None
        frames = window.start_frames(last_id, latest)
        if frames is None or frames_bytes(frames) > history_bytes(self._settings):
            # Too much to hold for one client at once (big frames): it reads Redis page by page.
            return None
        self.stats["window_hits"] += 1
        return self._listen(stream, make), frames

    def _listen(self, stream: _Stream, make: ListenerFactory | None = None) -> Listener:
        if make is None:
            listener = Listener(stream.key, self._settings.client_queue_size, self._settings.client_queue_bytes)
        else:
            listener = make(stream.key)
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
                del self._by_channel[stream.channel]
                self._behind.pop(stream.key, None)
                self._ready.pop(stream, None)
                if self._started:
                    self._subscriber.remove(stream.channel)

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
    def catching_up_count(self) -> int:
        """Followed streams whose live messages wait: not subscribed yet, or being read."""
        return sum(1 for s in self._streams.values() if s.buffer is not None)

    @property
    def reading(self) -> bool:
        """Started, and the subscriber connected: live events arrive."""
        return self._started and self._subscriber.connected

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        self._subscriber.start()
        for stream in self._streams.values():
            self._subscriber.add(stream.channel)
        self._tasks = [
            asyncio.create_task(self._keep_running(self._catch_up_forever), name="streamcoord-hub-catch-up"),
            asyncio.create_task(self._keep_running(self._check_forever), name="streamcoord-hub-check"),
            asyncio.create_task(self._heartbeat_forever(), name="streamcoord-hub-heartbeat"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._subscriber.stop()
        self._started = False
        self.close_all("shutdown")

    async def _keep_running(self, loop: Any) -> None:
        """Run ``loop``; if it fails (a bug, a reply of a shape no one expected), log why and
        run it again after a backoff. Positions are kept, so nothing is lost meanwhile."""
        backoff = Backoff(first=0.1, cap=5.0)
        while True:
            try:
                await loop()
            except Exception:  # anything: a reader that stays dead freezes every stream here
                delay = backoff.delay()
                log.exception("hub %s failed; restarting it in %.2fs", loop.__name__.strip("_"), delay)
                self.stats["reader_restarts"] += 1
                await asyncio.sleep(delay)

    # -- live messages (the subscriber's sink) -------------------------------------------------

    def on_message(self, channel: bytes, message: bytes) -> None:
        stream = self._by_channel.get(channel)
        if stream is None:  # the last listener left while the message was on its way
            return
        try:
            frame = live_frame(message)
        except MalformedEntry as exc:  # not published by append.lua; a real event lost this
            # way shows as a gap at the next message, or at the next check
            self.skips.report(channel, [Skipped(exc.entry_id, exc.kind)])
            self.stats["skipped_messages"] += 1
            return
        self.stats["messages"] += 1
        buffer = stream.buffer
        if buffer is None:
            self._go_on(stream, frame)
        elif len(buffer) < BUFFER_LIMIT:
            buffer.append(frame)
        else:  # the read under way will not reach these: read again after it
            buffer.clear()
            stream.generation += 1
            self._queue(stream)

    def on_subscribed(self, channel: bytes) -> None:
        stream = self._by_channel.get(channel)
        if stream is None:
            return
        # Every message from now on arrives: read what was appended before (or while the
        # subscriber was away), then go on with what arrives meanwhile.
        stream.subscribed = True
        stream.generation += 1  # a read already in flight may predate the subscription
        if stream.buffer is None:
            stream.buffer = []
        self._queue(stream)

    def on_lost(self, channels: Iterable[bytes]) -> None:
        for channel in channels:
            stream = self._by_channel.get(channel)
            if stream is not None:
                self._flush_one(stream)
                stream.subscribed = False
                stream.generation += 1
                stream.buffer = []  # nothing arrives until subscribed again, then it is read

    def _go_on(self, stream: _Stream, frame: Frame) -> None:
        """A live frame of a stream in step: the next event, a repeat, or a gap."""
        if frame.epoch != stream.epoch and stream.epoch:
            # Created anew (Redis lost the stream; its writer started it again). Go on from
            # here: listeners reset their clients on the new epoch and read what precedes this
            # frame from Redis themselves.
            self._flush_one(stream)
            stream.cursor, stream.read_after = frame.seq - 1, b""
        elif frame.seq <= stream.cursor:
            return  # a repeat: a read already brought it
        if frame.seq != stream.cursor + 1:
            self.stats["gaps"] += 1
            stream.buffer = [frame]
            self._queue(stream)
            return
        stream.cursor, stream.epoch, stream.read_after = frame.seq, frame.epoch, b""
        ready = self._ready.get(stream)
        if ready is None:
            self._ready[stream] = [frame]
            if not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)
        else:
            ready.append(frame)

    def _flush(self) -> None:
        """Send what went live since the last flush: one batch per stream."""
        self._flush_soon = False
        ready, self._ready = self._ready, {}
        for stream, frames in ready.items():
            self._send(stream, frames)

    def _flush_one(self, stream: _Stream) -> None:
        frames = self._ready.pop(stream, None)
        if frames:
            self._send(stream, frames)

    def _send(self, stream: _Stream, frames: list[Frame]) -> None:
        stream.window.extend(frames)
        batch = make_batch(frames)
        for listener in stream.listeners:
            listener.push(batch)
        self.stats["events"] += len(frames)
        self.stats["deliveries"] += len(frames) * len(stream.listeners)

    def _rewind(self, stream: _Stream) -> None:
        """Redis lost events of ``stream`` (created anew, or cut back): read it from its start;
        its listeners reset their clients."""
        self._flush_one(stream)
        log.info("stream %s lost events in Redis; reading it from its start", stream.key.decode())
        stream.cursor, stream.epoch, stream.read_after = 0, b"", b""
        stream.window.clear()
        self.stats["rewinds"] += 1
        for listener in stream.listeners:
            listener.push(REWIND)

    # -- reading the streams -------------------------------------------------------------------

    def _queue(self, stream: _Stream) -> None:
        """Read ``stream`` after its cursor soon (live messages wait in its buffer meanwhile)."""
        if stream.buffer is None:
            stream.buffer = []
        if not stream.queued:
            stream.queued = True
            self._behind[stream.key] = None
            self._behind_now.set()

    async def _catch_up_forever(self) -> None:
        backoff = Backoff(first=0.05, cap=2.0)
        while True:
            if not self._behind:
                self._behind_now.clear()
                await self._behind_now.wait()
            keys = list(itertools.islice(self._behind, CATCH_UP_STREAMS))
            try:
                await self._catch_up(keys)
            except (RedisError, OSError) as exc:  # reads with explicit ids are safe to retry
                delay = backoff.delay()
                log.warning("hub read failed (%s); retrying in %.2fs", exc, delay)
                self.stats["read_errors"] += 1
                await asyncio.sleep(delay)
                continue
            backoff.reset()

    async def _catch_up(self, keys: list[bytes]) -> None:
        """One round: the state and what follows the cursor of each stream in ``keys``."""
        streams = [self._streams[key] for key in keys]
        generations = [stream.generation for stream in streams]
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.hmget(KeySpace.state_of(stream.key), POSITION_FIELDS)
            pipe.xrange(stream.key, stream.next_read(), b"+", count=READ_COUNT)
        replies = await pipe.execute()
        self.stats["reads"] += 1
        for index, stream in enumerate(streams):
            if self._streams.get(stream.key) is not stream:
                continue  # its listeners left while it was read
            del self._behind[stream.key]
            stream.queued = False
            (epoch, last_seq), entries = replies[2 * index], replies[2 * index + 1]
            self.stats["catch_ups"] += 1
            if (last_seq or b"0").isdigit() and stream.lost_events(epoch, int(last_seq or 0)):
                self._rewind(stream)
                self._queue(stream)
                continue
            self._dispatch(stream.key, entries)
            if len(entries) >= READ_COUNT or stream.generation != generations[index]:
                self._queue(stream)  # more to read, or what this read saw is not enough
                continue
            if stream.subscribed:
                waiting, stream.buffer = stream.buffer or [], None  # live from here
                for frame in waiting:
                    if stream.buffer is not None:  # a gap among them: read again
                        stream.buffer.append(frame)
                    elif epoch is None or frame.epoch == epoch:
                        self._go_on(stream, frame)
                    # else published before this read, by an incarnation of the stream Redis
                    # no longer holds: stale

    def _dispatch(self, key: bytes, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Hand the listeners of ``key`` what a read brought (entries after its cursor)."""
        stream = self._streams.get(key)
        if stream is None or not entries:  # the last listener left while the read was in flight
            return
        frames, skipped = entry_frames(entries)
        self.stats["caught_up_events"] += len(frames)
        if skipped:
            self.skips.report(key, skipped)
            self.stats["skipped_entries"] += len(skipped)
        last_id = entries[-1][0]
        if not frames:
            stream.read_after = last_id
            return
        self._flush_one(stream)  # what went live before this read goes out first
        stream.cursor, stream.epoch = frames[-1].seq, frames[-1].epoch
        stream.read_after = b"" if last_id == b"%d-0" % stream.cursor else last_id
        self._send(stream, frames)

    async def _check_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REVALIDATE_SECONDS):
                    await self._check_now.wait()
            self._check_now.clear()
            self._revalidate_now = False
            try:
                await self._revalidate()
            except (RedisError, OSError) as exc:
                log.warning("hub check of its streams failed: %s", exc)
                self.stats["check_errors"] += 1

    async def _revalidate(self) -> None:
        """Check every followed stream against its state record: one that lost events in Redis
        (created anew under a new epoch, or cut back by a failover) is read from its start, and
        its listeners reset their clients; one Redis holds more of than the hub saw (a lost
        message after which none came) is read after its cursor."""
        streams = list(self._streams.items())
        # In pipelines of CATCH_UP_STREAMS: building and parsing one of 10,000 would hold the
        # loop, and every live event with it, for tens of milliseconds.
        for start in range(0, len(streams), CATCH_UP_STREAMS):
            await self._check(streams[start:start + CATCH_UP_STREAMS])

    async def _check(self, streams: list[tuple[bytes, _Stream]]) -> None:
        # Where each stream was when the check was sent: live messages move cursors while it
        # is on its way, and a stream that moved on meanwhile is plainly alive.
        followed = [(key, stream, stream.cursor, stream.epoch) for key, stream in streams]
        pipe = self._redis.pipeline(transaction=False)
        for key, *_ in followed:
            pipe.hmget(KeySpace.state_of(key), POSITION_FIELDS)
        replies = await pipe.execute()
        for (key, stream, cursor, seen_epoch), (epoch, last_seq) in zip(followed, replies, strict=True):
            if self._streams.get(key) is not stream or not (last_seq or b"0").isdigit():
                continue  # gone meanwhile, or a state record written by hand: it cannot tell
            if stream.cursor != cursor or stream.epoch != seen_epoch or stream.queued:
                continue  # moved on meanwhile, or being read anyway
            if stream.lost_events(epoch, int(last_seq or 0)):
                self._rewind(stream)
                self._queue(stream)
            elif not stream.subscribed:
                self._queue(stream)  # its subscription is down: serve it by reads meanwhile
            elif stream.checked > stream.cursor and epoch == stream.epoch and stream.buffer is None:
                # Still short of what Redis held a whole check ago: a message was lost. (Short of
                # what it holds now says nothing: a hub busy with a burst reads its messages late,
                # and reading those streams too would only add to the burst.)
                self.stats["behind"] += 1
                self._queue(stream)
            stream.checked = int(last_seq or 0) if epoch == stream.epoch else 0

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            for stream in self._streams.values():
                for listener in stream.listeners:
                    listener.push(HEARTBEAT)
