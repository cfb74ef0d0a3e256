"""Runs the append script, batching concurrent appends of one process into pipelines.

While one batch is on the wire the next one gathers, so a process with many tasks sending at
once pays one round trip per batch instead of one per event, and a lone awaited append still
goes out at once. Every append carries the sequence number it expects to write, so re-sending a
batch after a lost reply (redis-py's own retry, or ours after NOSCRIPT) never writes twice.
"""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Args = tuple[Sequence[str], Sequence[str | bytes | int]]

APPEND_SCRIPT = importlib.resources.files(__package__).joinpath("append.lua").read_text()
MAX_BATCH = 512


class Publisher:
    """Sends append-script calls for one Redis client, batched while a batch is in flight."""

    def __init__(self, redis: Redis, *, clustered: bool = False) -> None:
        self._redis = redis
        # redis-py refuses EVALSHA in a cluster pipeline: there a batch goes out as concurrent
        # single calls (each node's connections carry them in parallel).
        self._clustered = clustered
        self._sha: str | None = None
        self._pending: list[tuple[Args, asyncio.Future[list[Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Round trips made (a pipeline counts once), for tests and stats.
        self.batches = 0

    def submit(self, keys: Sequence[str], args: Sequence[str | bytes | int]) -> asyncio.Future[list[Any]]:
        """Queue one append; the future resolves to the script's reply."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending.append(((keys, args), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="streamcoord-publisher")
        return future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                replies = await self._run([args for args, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():  # the caller gave up waiting
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _run(self, calls: list[Args]) -> list[Any]:
        if self._sha is None:
            self._sha = await self._redis.script_load(APPEND_SCRIPT)
        try:
            return await self._send(calls)
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH ran; appends are idempotent, so re-send them all.
            self._sha = await self._redis.script_load(APPEND_SCRIPT)
            return await self._send(calls)

    async def _send(self, calls: list[Args]) -> list[Any]:
        assert self._sha is not None
        self.batches += 1
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self._redis.evalsha(self._sha, len(keys), *keys, *args)]
        if self._clustered:
            sha = self._sha
            answers: list[Any] = await asyncio.gather(
                *(self._redis.evalsha(sha, len(keys), *keys, *args) for keys, args in calls),
                return_exceptions=True,
            )
            if any(isinstance(r, NoScriptError) for r in answers):
                raise NoScriptError("NOSCRIPT in batch")
            return answers
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in replies):
            raise NoScriptError("NOSCRIPT in batch")
        return replies
