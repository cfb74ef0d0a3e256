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

from .codec import DataEncoder, Frame, entry_frame
from .connection import is_cluster_url
from .errors import StreamLost, TaskEnded, WriterFenced
from .ids import EventId, new_epoch
from .keys import KeySpace, TaskRef
from .publisher import Publisher
from .settings import Settings
from .taskstate import TERMINAL_EVENTS, TaskState

log = logging.getLogger(__name__)


class EventLog:
    """The event logs of one deployment (one Redis, one key prefix)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = KeySpace(settings.key_prefix)
        self.publisher = Publisher(redis, settings, clustered=is_cluster_url(settings.redis_url))

    def writer(self, ref: TaskRef, run: str = "") -> TaskWriter:
        return TaskWriter(self, ref, run)

    async def declare(self, ref: TaskRef, state: str = "pending") -> bool:
        """Create the task's state record if it has none, so gateways know the task before its
        first event. Returns False when the record already existed (nothing is changed)."""
        key = self.keys.state(ref)
        now = datetime.now(UTC).isoformat()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(key, "state", state)
        pipe.hsetnx(key, "created_at", now)
        created, _ = await pipe.execute()
        return bool(created)

    async def state(self, ref: TaskRef) -> TaskState | None:
        raw: Any = await self.redis.hgetall(self.keys.state(ref))
        return TaskState.from_hash(raw)

    async def set_final_value(self, ref: TaskRef, value: Any) -> None:
        """Record a run's final value in its state record (for the completed-task JSON answer),
        when the task sent its terminal event itself."""
        await self.redis.hset(self.keys.state(ref), "final_value", json.dumps(value))

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
    Redis is unreachable an append is retried with the same number for
    ``Settings.send_retry_seconds``; an append that finally fails or is cancelled makes the
    writer re-read the stream before the next one, so it never skips or repeats a number.

    A worker passes its ``run`` token: once another worker has taken the task over (this one's
    lease expired), every append of this writer is refused with :class:`WriterFenced`.
    """

    def __init__(self, log: EventLog, ref: TaskRef, run: str = "") -> None:
        self.log = log
        self.ref = ref
        self.run = run
        self.encoder = DataEncoder(ref, log.settings.max_payload_bytes)
        self._keys = (log.keys.events(ref), log.keys.state(ref))
        self._epoch = ""
        self._next_seq = 0  # 0: not opened yet
        self._inflight: set[asyncio.Future[list[Any]]] = set()
        self._resync = True
        self.token = secrets.token_hex(4)
        #: The terminal event type this writer appended ('' while the run goes on).
        self.ended = ""

    @property
    def epoch(self) -> str:
        return self._epoch

    async def _open(self) -> None:
        if self._inflight:
            await asyncio.wait(self._inflight)
        events_key, state_key = self._keys
        pipe = self.log.redis.pipeline(transaction=False)
        pipe.exists(events_key)
        pipe.hmget(state_key, ["epoch", "last_seq"])
        exists, (epoch, last_seq) = await pipe.execute()
        if exists and epoch:
            if self._epoch and epoch.decode() != self._epoch:
                raise WriterFenced(f"task {self.ref}: epoch {epoch.decode()} replaced ours ({self._epoch})")
            self._epoch, self._next_seq = epoch.decode(), int(last_seq or 0) + 1
        else:
            self._epoch, self._next_seq = new_epoch(), 1
        self._resync = False

    async def append(self, event_type: str, payload: dict[str, Any], *, final_value: Any = None) -> EventId:
        """Append one event and return its id. A terminal type (``complete``, ``error``,
        ``cancelled``) ends the run; ``final_value`` is stored with it."""
        data = self.encoder.encode(event_type, payload)
        terminal = TERMINAL_EVENTS.get(event_type, "")
        final = json.dumps(final_value) if terminal and final_value is not None else ""
        if self._resync:
            await self._open()
        for _ in range(2):
            seq = self._next_seq
            self._next_seq += 1
            reply = await self._submit_until_answered(seq, event_type, data, terminal, final)
            status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if status in ("ok", "dup"):
                if terminal:
                    self.ended = event_type
                return EventId(self._epoch, seq)
            self._resync = True
            if status == "lost" and not self._inflight:
                # Redis lost the stream (restart without persistence, failover): start a new
                # epoch, so every reader learns of the gap through a reset.
                self._epoch, self._next_seq, self._resync = new_epoch(), 1, False
                continue
            break
        if status == "ended":
            raise TaskEnded(f"task {self.ref} already ended; {event_type!r} was not appended")
        if status == "lost":
            raise StreamLost(f"task {self.ref}: the stream vanished; {event_type!r} was not appended")
        raise WriterFenced(
            f"task {self.ref}: another writer or run owns the stream (epoch {reply[1]!r}, last "
            f"event {reply[2]}); {event_type!r} was not appended"
        )

    async def _submit_until_answered(self, seq: int, event_type: str, data: bytes, terminal: str, final: str) -> list[Any]:
        """Submit one append, re-sending it (same number: never written twice) while Redis is
        unreachable, for up to ``send_retry_seconds``."""
        deadline, delay = 0.0, 0.05  # the clock is read only once an append has failed
        while True:
            try:
                return await self._submit(seq, event_type, data, terminal, final)
            except (RedisConnectionError, RedisTimeoutError, ClusterError, OSError) as exc:
                # (ClusterError: redirections ran out while slots move between nodes.)
                now = asyncio.get_running_loop().time()
                deadline = deadline or now + self.log.settings.send_retry_seconds
                if now + delay > deadline:
                    self._resync = True
                    raise
                log.warning("append to %s failed (%s); retrying in %.2fs", self.ref, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except BaseException:
                self._resync = True  # cancelled or refused: the outcome is unknown
                raise

    async def _submit(self, seq: int, event_type: str, data: bytes, terminal: str, final: str) -> list[Any]:
        event = (self._epoch, seq, event_type, data, terminal, final, self.token, self.run)
        return await self.log.publisher.append((self._keys, event), self._inflight)
