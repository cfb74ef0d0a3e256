"""Runs the append script: a lone append at once, concurrent ones batched into one call.

An append that finds nothing on the wire goes out straight from the caller's task (no task
switch: the common case of a task awaiting its sends one by one). Appends made while a call is
on the wire queue up (:meth:`Publisher.submit` returns each one's handle, a future of its
reply), and go out together as ONE script call (one round trip, one command for Redis to parse)
as soon as the wire is free. Every append carries the sequence number it expects to write and
its content, so re-sending it (a lost reply, NOSCRIPT) never writes it twice, and an append
whose outcome its caller never learned (cancelled, timed out) is recognised if it lands late
(``append.lua`` answers ``stale`` to the next append that wanted its number).

Since one call at a time is on the wire, the publisher holds one connection of its own and
talks to it directly (the command packed in C, one timeout for the round trip): redis-py's
pool and per-command timers cost more than the script itself at thousands of appends a second.

In a Redis Cluster one script call cannot touch several tasks' keys (other hash slots), so
there a batch goes out as concurrent single-event calls, through the cluster client.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from datetime import UTC, datetime
from typing import Any, NamedTuple

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import scripts
from .settings import Settings

MAX_BATCH = 256


class Append(NamedTuple):
    """One event's part of an ``append.lua`` call: its two keys, then its arguments in the
    script's ARGV order (the script's header names them the same way)."""

    events_key: str
    state_key: str
    epoch: str
    seq: int
    type: str
    data: bytes
    terminal: str  #: the state the event ends the run in, or ''
    final: str  #: the run's final value as JSON, or ''
    writer: str  #: the writer's token
    run: str  #: the run token, '' outside a worker run


class Status(enum.StrEnum):
    """What ``append.lua`` did with one append (its header says when each comes back)."""

    OK = "ok"
    DUP = "dup"
    STALE = "stale"
    INVALID = "invalid"
    ENDED = "ended"
    FENCED = "fenced"
    LOST = "lost"


class Reply(NamedTuple):
    """The script's answer for one append: the stream's epoch and last sequence after it."""

    status: Status
    epoch: str
    last_seq: int

    @classmethod
    def decode(cls, raw: list[Any]) -> Reply:
        status, epoch, last_seq = raw
        return cls(Status(_text(status)), _text(epoch), int(last_seq))


class Publisher:
    """Sends append-script calls for one Redis client."""

    def __init__(self, redis: Redis, settings: Settings, *, clustered: bool = False) -> None:
        self._redis = redis
        self._settings = settings
        self._clustered = clustered
        self._sha: str | None = None
        self._queue: list[tuple[Append, asyncio.Future[Reply]]] = []
        self._busy = False  # a call is on the wire
        self._batch: list[asyncio.Future[Reply]] = []  # the handles of the batch on the wire
        self._flusher: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None  # ours while the client lives
        #: Round trips made, for tests and stats.
        self.batches = 0

    async def append(self, append: Append) -> Reply:
        """Run one append and return the script's reply: from the caller's task when the wire
        is free, else with the next batch."""
        if self._busy or self._queue:  # wait in line: never overtake the queue
            return await asyncio.shield(self.submit(append))  # the batch goes out regardless
        self._busy = True
        try:
            [reply] = await self._run([append])
            return Reply.decode(reply)
        finally:
            self._busy = False
            self._start_flusher()

    def submit(self, append: Append) -> asyncio.Future[Reply]:
        """Queue one append for the next batch; its handle resolves to the script's reply, or
        to the error that kept the call from being answered."""
        handle: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        handle.add_done_callback(_observe)
        self._queue.append((append, handle))
        self._start_flusher()
        return handle

    async def settled(self) -> None:
        """Return once every append queued so far has gone out and been answered (a writer
        waits for this before it re-reads where its stream stands; a call going out from its
        caller's task is the caller's to wait for)."""
        waiting = [handle for _, handle in self._queue]
        if self._batch:
            waiting += self._batch
        if waiting:
            await asyncio.wait(waiting)

    def _start_flusher(self) -> None:
        if self._queue and not self._busy and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush(), name="streamcoord-publisher")

    async def _flush(self) -> None:
        while self._queue and not self._busy:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._busy, self._batch = True, [handle for _, handle in batch]
            try:
                replies = await self._run([append for append, _ in batch])
            except Exception as exc:
                for _, handle in batch:
                    if not handle.done():
                        handle.set_exception(exc)
                continue
            except BaseException:
                for _, handle in batch:  # the loop is closing: nobody hears back
                    handle.cancel()
                raise
            finally:
                self._busy, self._batch = False, []
            for (_, handle), reply in zip(batch, replies, strict=True):
                if not handle.done():
                    handle.set_result(Reply.decode(reply))

    async def _run(self, appends: list[Append]) -> list[Any]:
        if self._sha is None:
            self._sha = await self._redis.script_load(scripts.source("append"))
        try:
            return await self._send(appends)
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH ran; appends are idempotent, so re-send them all.
            self._sha = await self._redis.script_load(scripts.source("append"))
            return await self._send(appends)

    async def _send(self, appends: list[Append]) -> list[Any]:
        self.batches += 1
        common = self._common_args()
        if self._clustered and len(appends) > 1:
            replies = await asyncio.gather(*(self._call(common, [a]) for a in appends))
            return [reply[0] for reply in replies]
        return await self._call(common, appends)

    async def _call(self, common: list[str | int], appends: list[Append]) -> list[Any]:
        assert self._sha is not None
        keys: list[str] = []
        args: list[Any] = list(common)
        for append in appends:
            keys += append[:2]
            args += append[2:]
        if self._clustered:
            replies: list[Any] = await self._redis.evalsha(self._sha, len(keys), *keys, *args)
            return replies
        return await self._execute(("EVALSHA", self._sha, len(keys), *keys, *args))  # type: ignore[no-any-return]

    async def _execute(self, command: tuple[Any, ...]) -> Any:
        """One command on the publisher's own connection. Any failure but a Redis error reply
        drops the connection (its reply may still be on the way); the next call reconnects."""
        if self._connection is None:
            # Held for good: the pool counts it, and closes it with the client.
            self._connection = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            self._connection.socket_timeout = None  # one timeout per round trip, below
        connection = self._connection
        try:
            async with asyncio.timeout(self._settings.redis_socket_timeout):
                if not connection.is_connected:
                    # connect(), not the reconnect inside send_packed_command: a Sentinel
                    # connection asks for the current master only in connect().
                    await connection.connect()
                await connection.send_packed_command(hiredis.pack_command(command), check_health=False)
                return await connection.read_response()
        except ResponseError:
            raise  # Redis answered (NOSCRIPT, a script error): the connection is in step
        except TimeoutError:
            await connection.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout talking to Redis") from None
        except BaseException:
            await connection.disconnect(nowait=True)
            raise

    def _common_args(self) -> list[str | int]:
        settings = self._settings
        return [
            settings.max_stream_length,
            settings.stream_ttl_seconds,
            settings.state_ttl_seconds,
            datetime.now(UTC).isoformat(),
        ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _observe(handle: asyncio.Future[Reply]) -> None:
    """A handle whose caller was cancelled is never awaited: fetch its error here, so asyncio
    does not log it as never retrieved."""
    if not handle.cancelled():
        with contextlib.suppress(Exception):
            handle.exception()
