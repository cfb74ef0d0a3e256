"""A task's event log: one Redis Stream per task, written by one writer, read by anyone.

Writing goes through :class:`TaskWriter`, which numbers events 1, 2, 3, ... within an epoch and
appends each with the atomic script in ``append.lua``. Reading is plain XRANGE on the
``<seq>-0`` ids, so ``XRANGE <key> 5 10`` in redis-cli reads events 5 to 10.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backoff import Backoff
from .codec import DataEncoder, Frame, entry_frame
from .connection import is_cluster_url
from .errors import AppendError, StreamLost, TaskEnded, WriterFenced
from .ids import EventId, new_epoch
from .keys import KeySpace, TaskRef
from .publisher import Append, Publisher, Reply, Status
from .settings import Settings
from .taskstate import TERMINAL_EVENTS, Field, State, TaskState

log = logging.getLogger(__name__)


class EventLog:
    """The event logs of one deployment (one Redis, one key prefix)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = KeySpace(settings.key_prefix)
        self.publisher = Publisher(redis, settings, clustered=is_cluster_url(settings.redis_url))

    def writer(self, ref: TaskRef, run_token: str = "") -> TaskWriter:
        """A writer of the task's events; a worker passes its run's token."""
        return TaskWriter(self.redis, self.publisher, self.keys, ref, self.settings, run_token)

    async def declare(self, ref: TaskRef, state: State = State.PENDING) -> bool:
        """Create the task's state record if it has none, so gateways know the task before its
        first event. Returns False when the record already existed (nothing is changed)."""
        key = self.keys.state(ref)
        now = datetime.now(UTC).isoformat()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(key, Field.STATE, state)
        pipe.hsetnx(key, Field.CREATED_AT, now)
        created, _ = await pipe.execute()
        return bool(created)

    async def state(self, ref: TaskRef) -> TaskState | None:
        raw: Any = await self.redis.hgetall(self.keys.state(ref))
        return TaskState.from_hash(raw)

    async def set_final_value(self, ref: TaskRef, value: Any) -> None:
        """Record a run's final value in its state record (for the completed-task JSON answer),
        when the task sent its terminal event itself."""
        await self.redis.hset(self.keys.state(ref), Field.FINAL_VALUE, json.dumps(value))

    async def read_frames(
        self, ref: TaskRef, after: int = 0, before: int | None = None, count: int | None = None
    ) -> list[Frame]:
        """The frames of the events with a sequence above ``after`` (and below ``before``),
        oldest first, at most ``count``."""
        high = f"({before}-0" if before is not None else "+"
        entries: Any = await self.redis.xrange(self.keys.events(ref), f"({after}-0", high, count=count)
        return [entry_frame(entry_id, fields) for entry_id, fields in entries]


class TaskWriter:
    """Appends one task's events in order. One writer per run; a second one is fenced off.

    Sequence numbers are handed out when an append is submitted, so a task may fire several
    sends at once. Each writer has a token, so the script tells a retry of this writer's own
    append (written once) from another writer's append of the same number (fenced off). While
    Redis is unreachable an append is re-sent with the same number for
    ``Settings.send_retry_seconds``. An append whose outcome is unknown (it failed for good, or
    its caller was cancelled) makes the writer re-read the stream before the next one, once
    every queued append has been answered, so it never skips or repeats a number; should a late
    append of its own still take a number first (one cut off on the wire lands after the
    re-read), the script answers ``stale`` and the event is numbered again.

    A worker passes its ``run_token``: once another worker has taken the task over (this one's
    lease expired), every append of this writer is refused with :class:`WriterFenced`.
    """

    #: How often one append may be numbered anew (``stale``, or ``lost`` once) before giving up.
    MAX_RENUMBERS = 4

    def __init__(
        self, redis: Redis, publisher: Publisher, keys: KeySpace, ref: TaskRef, settings: Settings,
        run_token: str = "",
    ) -> None:
        self.ref = ref
        self.run_token = run_token
        self.encoder = DataEncoder(ref, settings.max_payload_bytes)
        self.token = secrets.token_hex(4)
        #: The terminal event type this writer appended ('' while the run goes on).
        self.ended = ""
        self._redis = redis
        self._publisher = publisher
        self._events_key, self._state_key = keys.events(ref), keys.state(ref)
        self._retry_seconds = settings.send_retry_seconds
        self._epoch = ""
        self._next_seq = 0
        self._resync = True  # (re-)read the stream's position before the next append

    @property
    def epoch(self) -> str:
        return self._epoch

    async def append(self, event_type: str, payload: dict[str, Any], *, final_value: Any = None) -> EventId:
        """Append one event and return its id. A terminal type (``complete``, ``error``,
        ``cancelled``) ends the run; ``final_value`` is stored with it."""
        data = self.encoder.encode(event_type, payload)
        terminal = TERMINAL_EVENTS.get(event_type, "")
        final = json.dumps(final_value) if terminal and final_value is not None else ""
        request: Append | None = None
        backoff, deadline, renumbered = Backoff(first=0.05, cap=1.0), 0.0, 0
        while True:
            if request is None:  # number the event (again)
                if self._resync:
                    await self._open()
                request = Append(
                    self._events_key, self._state_key, self._epoch, self._next_seq, event_type,
                    data, terminal, final, self.token, self.run_token,
                )
                self._next_seq += 1
            try:
                reply = await self._send(request)
            except _UNREACHABLE as exc:
                # The same append again: written once, however many times it is sent.
                # (ClusterError: redirections ran out while slots move between nodes.)
                now = asyncio.get_running_loop().time()
                deadline = deadline or now + self._retry_seconds
                delay = backoff.delay()
                if now + delay > deadline:
                    self._resync = True
                    raise
                log.warning("append to %s failed (%s); retrying in %.2fs", self.ref, exc, delay)
                await asyncio.sleep(delay)
                continue
            if reply.status in (Status.OK, Status.DUP):
                self.ended = self.ended or (event_type if terminal else "")
                return EventId(self._epoch, request.seq)
            self._resync = True
            renumbered += 1
            if renumbered >= self.MAX_RENUMBERS:
                raise self._refused(reply, event_type)
            if reply.status is Status.STALE or (reply.status is Status.LOST and request.epoch != self._epoch):
                # A late append of ours took the number, or a concurrent append of ours has
                # already started the stream anew: number the event again.
                request = None
                continue
            if reply.status is Status.LOST:
                # Redis lost the stream (restart without persistence, failover): start a new
                # epoch, so every reader learns of the gap through a reset.
                self._epoch, self._next_seq, self._resync, request = new_epoch(), 1, False, None
                continue
            raise self._refused(reply, event_type)

    async def _send(self, request: Append) -> Reply:
        try:
            return await self._publisher.append(request)
        except BaseException:
            self._resync = True  # cancelled or failed: the outcome is unknown
            raise

    async def _open(self) -> None:
        """Read where the stream stands, once every append queued so far is answered."""
        await self._publisher.settled()
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(self._events_key)
        pipe.hmget(self._state_key, [Field.EPOCH, Field.LAST_SEQ])
        exists, (epoch, last_seq) = await pipe.execute()
        if exists and epoch:
            if self._epoch and epoch.decode() != self._epoch:
                raise WriterFenced(f"task {self.ref}: epoch {epoch.decode()} replaced ours ({self._epoch})")
            self._epoch, self._next_seq = epoch.decode(), int(last_seq or 0) + 1
        else:
            self._epoch, self._next_seq = new_epoch(), 1
        self._resync = False

    def _refused(self, reply: Reply, event_type: str) -> AppendError:
        if reply.status is Status.ENDED:
            return TaskEnded(f"task {self.ref} already ended; {event_type!r} was not appended")
        if reply.status is Status.LOST:
            return StreamLost(f"task {self.ref}: the stream vanished; {event_type!r} was not appended")
        return WriterFenced(
            f"task {self.ref}: another writer or run owns the stream (epoch {reply.epoch!r}, last "
            f"event {reply.last_seq}); {event_type!r} was not appended"
        )


#: Failures that mean Redis did not answer (the append may or may not have been written).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ClusterError, OSError)
