"""A task's event log: one Redis Stream per task, written by one writer, read by anyone.

Writing goes through :class:`TaskWriter`, which numbers events 1, 2, 3, ... within an epoch and
appends each with the atomic script in ``append.lua``. Reading is plain XRANGE on the
``<seq>-0`` ids, so ``XRANGE <key> 5 10`` in redis-cli reads events 5 to 10.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backoff import Backoff
from .codec import DataEncoder
from .connection import is_cluster_url
from .errors import AppendError, TaskEnded, WriterFenced
from .ids import EventId, new_epoch
from .keys import KeySpace, TaskRef
from .publisher import Append, Publisher, Reply, Status
from .settings import Settings
from .taskstate import TERMINAL_EVENTS, Field, State, TaskState

log = logging.getLogger(__name__)

#: The message of the ``cancelled`` event of a task cancelled before any run of it began.
CANCELLED_BEFORE_START = "cancelled before it started"


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

    async def states(self, refs: Sequence[TaskRef]) -> list[TaskState | None]:
        """Several tasks' records in one round trip (one pipeline; a cluster's client splits
        it by node)."""
        if not refs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for ref in refs:
            pipe.hgetall(self.keys.state(ref))
        return [TaskState.from_hash(raw) for raw in await pipe.execute()]

    async def end_cancelled_before_start(self, ref: TaskRef) -> str:
        """Write the ``cancelled`` event of a task ``cancel.lua`` left ``cancelling`` (no worker
        began it), with no run token: no run ever owned it. The canceller does it, and the next
        canceller or a worker that finds the task so when the first was cut off. Another may
        have written it first: that one stands. Returns the task's state afterwards:
        ``cancelled``, or what it turned out to be ('' when Redis knows nothing of it)."""
        try:
            await self.writer(ref).append("cancelled", {"message": CANCELLED_BEFORE_START})
        except (TaskEnded, WriterFenced):
            record = await self.state(ref)
            return record.state if record is not None else ""
        return State.CANCELLED

    async def set_final_value(self, ref: TaskRef, value: Any) -> None:
        """Record a run's final value in its state record (for the completed-task JSON answer),
        when the task sent its terminal event itself. Held to the payloads' rules: raises
        :class:`EventRejected` subclasses before anything reaches Redis."""
        final = DataEncoder(ref, self.settings.max_payload_bytes).encode_final_value("complete", value)
        await self.redis.hset(self.keys.state(ref), Field.FINAL_VALUE, final)


class TaskWriter:
    """Appends one task's events in order. One writer per run; a second one is fenced off.

    Sequence numbers are handed out when an append is submitted, so a task may fire several
    sends at once (they are written in the order they were made). Each writer has a token, so
    the script tells a retry of this writer's own append (written once) from another writer's
    append of the same number (fenced off). While Redis is unreachable an append is re-sent with
    the same number for ``Settings.send_retry_seconds``.

    The writer re-reads where its stream stands (``_open``) when it starts, and after an append
    whose outcome it does not know (failed for good, cancelled) or that the script refused. It
    re-reads only once none of its own appends is still on its way, and one re-read at a time,
    so concurrent sends never number from two different reads. A late append that still lands
    after the re-read (one cut off on the wire) makes the script answer ``stale`` to the next
    one, which is numbered again. Only when Redis holds fewer events than this writer was told
    were written (a restart without persistence, a failover that lost the tail) does the writer
    start the stream anew under a new epoch, so every reader learns of the gap by a reset.

    A worker passes its ``run_token``: once another worker has taken the task over (this one's
    lease expired), every append of this writer is refused with :class:`WriterFenced`.
    """

    #: How often one append may be numbered anew before the writer gives up on it.
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
        self._written = 0  # the highest sequence Redis said it holds (in this epoch)
        self._resync = True  # (re-)read the stream's position before numbering the next append
        self._reading = asyncio.Lock()  # one re-read at a time; numbering waits for it
        self._on_the_way = 0  # this writer's appends numbered and not yet answered
        self._quiet = asyncio.Event()  # set while none is on the way
        self._quiet.set()

    @property
    def epoch(self) -> str:
        return self._epoch

    async def append(self, event_type: str, payload: dict[str, Any], *, final_value: Any = None) -> EventId:
        """Append one event and return its id. A terminal type (``complete``, ``error``,
        ``cancelled``) ends the run; ``final_value`` is stored with it."""
        data = self.encoder.encode(event_type, payload)
        terminal = TERMINAL_EVENTS.get(event_type, "")
        final = ""
        if terminal and final_value is not None:
            final = self.encoder.encode_final_value(event_type, final_value)
        for _ in range(self.MAX_RENUMBERS):
            request = await self._number(event_type, data, terminal, final)
            try:
                reply = await self._deliver(request)
            finally:
                self._answered()
            if reply.status in (Status.OK, Status.DUP):
                if request.epoch == self._epoch:
                    self._written = max(self._written, request.seq)
                self.ended = self.ended or (event_type if terminal else "")
                return EventId(request.epoch, request.seq)
            self._resync = True
            if reply.status not in (Status.STALE, Status.LOST):
                raise self._refused(reply, event_type)
            # STALE: a late append of ours took the number. LOST: the stream does not follow on
            # from this number (an append of ours not landed yet, or Redis lost events): the
            # re-read tells which, and numbers the event again.
        raise AppendError(
            f"task {self.ref}: {event_type!r} was not appended: its number was taken "
            f"{self.MAX_RENUMBERS} times over (last answer {reply.status!s})"
        )

    async def _number(self, event_type: str, data: bytes, terminal: str, final: str) -> Append:
        """The next append of this writer, numbered (after a re-read, when one is due)."""
        if self._resync or self._reading.locked():
            async with self._reading:
                if self._resync:
                    await self._open()
        # No await from here on: the number and the epoch go together.
        request = Append(
            self._events_key, self._state_key, self._epoch, self._next_seq, event_type, data,
            terminal, final, self.token, self.run_token,
        )
        self._next_seq += 1
        self._on_the_way += 1
        self._quiet.clear()
        return request

    def _answered(self) -> None:
        self._on_the_way -= 1
        if not self._on_the_way:
            self._quiet.set()

    async def _deliver(self, request: Append) -> Reply:
        """Send one append until Redis answers it, the same append each time (written once,
        however many times it is sent), for up to ``send_retry_seconds``."""
        backoff, deadline = Backoff(first=0.05, cap=1.0), 0.0
        while True:
            try:
                return await self._publisher.append(request)
            except _UNREACHABLE as exc:
                # (ClusterError: redirections ran out while slots move between nodes.)
                now = asyncio.get_running_loop().time()
                deadline = deadline or now + self._retry_seconds
                delay = backoff.delay()
                if now + delay > deadline:
                    self._resync = True
                    raise
                log.warning("append to %s failed (%s); retrying in %.2fs", self.ref, exc, delay)
                await asyncio.sleep(delay)
            except BaseException:
                self._resync = True  # cancelled or refused: the outcome is unknown
                raise

    async def _open(self) -> None:
        """Read where the stream stands, once none of this writer's appends is on its way (and
        the publisher's queue has gone out), and number on from there."""
        await self._quiet.wait()
        await self._publisher.settled()
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(self._events_key)
        pipe.hmget(self._state_key, [Field.EPOCH, Field.LAST_SEQ])
        exists, (raw_epoch, raw_last) = await pipe.execute()
        epoch, last_seq = (raw_epoch or b"").decode(), int(raw_last or 0)
        if exists and epoch and self._epoch and epoch != self._epoch:
            raise WriterFenced(f"task {self.ref}: epoch {epoch} replaced ours ({self._epoch})")
        if exists and epoch and last_seq >= self._written:
            self._epoch, self._next_seq = epoch, last_seq + 1
        else:
            # No stream yet, or Redis lost it or events it had acknowledged: start anew under a
            # new epoch (the script replaces what is left of the old one).
            if self._written:
                log.warning("task %s: Redis lost events up to %d; the stream starts anew", self.ref, self._written)
            self._epoch, self._next_seq, self._written = new_epoch(), 1, 0
        self._resync = False

    def _refused(self, reply: Reply, event_type: str) -> AppendError:
        if reply.status is Status.ENDED:
            return TaskEnded(f"task {self.ref} already ended; {event_type!r} was not appended")
        if reply.status is Status.INVALID:
            return AppendError(
                f"task {self.ref}: its Redis keys hold something else than a stream and a hash "
                f"(written by hand?); {event_type!r} was not appended"
            )
        return WriterFenced(
            f"task {self.ref}: another writer or run owns the stream (epoch {reply.epoch!r}, last "
            f"event {reply.last_seq}); {event_type!r} was not appended"
        )


#: Failures that mean Redis did not answer (the append may or may not have been written).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ClusterError, OSError)
