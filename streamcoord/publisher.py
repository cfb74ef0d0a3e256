"""Runs the append script: a lone append at once, concurrent ones batched into one call.

An append that finds nothing on the wire goes out straight from the caller's task. Appends made
while a call is on the wire gather, and go out together as ONE script call (one round trip, one
command for Redis to parse) as soon as the wire is free. Every append carries the sequence
number it expects to write, so re-sending a call after a lost reply (the writer's retry, or
ours after NOSCRIPT) never writes twice.

Since one call at a time is on the wire, the publisher holds one connection of its own and
talks to it directly (the command packed in C, one timeout for the round trip): redis-py's
pool and per-command timers cost more than the script itself at thousands of appends a second.

In a Redis Cluster one script call cannot touch several tasks' keys (other hash slots), so
there a batch goes out as concurrent single-event calls, through the cluster client.
"""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .settings import Settings

#: One event's part of a call: its two keys, and (epoch, seq, type, data, terminal state,
#: final value, writer token, run token).
Append = tuple[tuple[str, str], Sequence[str | bytes | int]]

APPEND_SCRIPT = importlib.resources.files(__package__).joinpath("append.lua").read_text()
MAX_BATCH = 256


class Publisher:
    """Sends append-script calls for one Redis client."""

    def __init__(self, redis: Redis, settings: Settings, *, clustered: bool = False) -> None:
        self._redis = redis
        self._settings = settings
        self._clustered = clustered
        self._sha: str | None = None
        self._busy = False  # a call is on the wire
        self._pending: list[tuple[Append, asyncio.Future[list[Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None  # ours while the client lives
        #: Round trips made, for tests and stats.
        self.batches = 0

    async def append(self, append: Append, inflight: set[asyncio.Future[list[Any]]]) -> list[Any]:
        """Run one append; its reply ``[status, epoch, last_seq]``. An append that waits for the
        next batch is in ``inflight`` until it has been sent (its caller may be cancelled
        meanwhile: the batch goes out all the same)."""
        if not self._busy and not self._pending:  # else wait in line: never overtake the queue
            self._busy = True
            try:
                replies = await self._run([append])
                reply: list[Any] = replies[0]
                return reply
            finally:
                self._busy = False
                self._start_flusher()
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((append, future))
        inflight.add(future)
        future.add_done_callback(inflight.discard)
        # Shielded: a cancelled caller must not cancel the batch the others wait for.
        return await asyncio.shield(future)

    def _start_flusher(self) -> None:
        if self._pending and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush(), name="streamcoord-publisher")

    async def _flush(self) -> None:
        while self._pending and not self._busy:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._busy = True
            try:
                replies = await self._run([append for append, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self._busy = False
            for (_, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)

    async def _run(self, appends: list[Append]) -> list[Any]:
        if self._sha is None:
            self._sha = await self._redis.script_load(APPEND_SCRIPT)
        try:
            return await self._send(appends)
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH ran; appends are idempotent, so re-send them all.
            self._sha = await self._redis.script_load(APPEND_SCRIPT)
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
        for (events_key, state_key), event_args in appends:
            keys += (events_key, state_key)
            args += event_args
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
