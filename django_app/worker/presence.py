"""Presence: the registry of workers (``sc:workers``), each worker's set of running tasks, and
forgetting the workers that fell silent.

Every worker rewrites its own entry in the registry at each heartbeat: a JSON object with its
``host``, ``pid``, ``concurrency``, ``running`` (tasks now), ``started_at`` and the heartbeat's
time, ``heartbeat_ms`` (milliseconds of the Redis server's clock) and ``heartbeat_at`` (the same
instant in ISO 8601, for people reading ``HGETALL sc:workers``). Its running tasks are listed in
``sc:worker:<id>:running``.

The registry is for operators; recovery never depends on it (a dead worker's tasks come back
through the job queue's pending list). So forgetting is housekeeping with two rules:

* Silence is measured on the Redis server's clock, as leases are: a worker whose host clock is
  off by minutes is neither forgotten while alive nor kept when dead.
* An entry that cannot be read (not JSON, no heartbeat, a heartbeat that is no finite number,
  a bad date: a hand edit, a bug) is logged once and dropped, and never stops the round.
  Dropping is safe: a live worker writes its entry again at its next heartbeat. Only the entry
  goes, not the keys named after it: a worker we cannot read might be alive, and its control
  stream may hold a cancel request.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamcoord.keys import KeySpace
from streamcoord.settings import Settings

log = logging.getLogger(__name__)

#: Malformed entries remembered as already reported; past this many the memory starts over
#: (a flood of bad entries is then reported again, once each, rather than kept forever).
REPORTED_LIMIT = 1024


async def redis_now_ms(redis: Redis) -> int:
    """The Redis server's clock (``TIME``) in milliseconds: the clock leases are measured on."""
    seconds, microseconds = await redis.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def heartbeat_ms(raw: bytes) -> int:
    """When the worker of a registry entry last beat, in ms of the Redis clock.

    An entry written by a worker from before ``heartbeat_ms`` existed (a rolling upgrade) has
    only ``heartbeat_at`` (its host's clock, ISO 8601): that is read instead. Raises ValueError
    saying what is wrong with an entry that has neither."""
    try:
        entry = json.loads(raw)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    if "heartbeat_ms" in entry:
        value = entry["heartbeat_ms"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"heartbeat_ms is not a number: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # JSON's 1e400, Infinity, NaN
            raise ValueError(f"heartbeat_ms is not a finite number: {value!r}")
        return int(value)
    if "heartbeat_at" in entry:
        value = entry["heartbeat_at"]
        try:
            at = datetime.fromisoformat(value)
        except (TypeError, ValueError):
            raise ValueError(f"heartbeat_at is not an ISO 8601 time: {value!r}") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return int(at.timestamp() * 1000)
    raise ValueError("no heartbeat_ms or heartbeat_at")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class Presence:
    """One worker's presence in Redis: its registry entry and running set, kept current, and
    the housekeeping of other workers' entries."""

    def __init__(
        self, redis: Redis, keys: KeySpace, worker_id: str, concurrency: int, settings: Settings,
        running_count: Callable[[], int],
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.concurrency = concurrency
        #: How many tasks this worker runs now (for the entry's ``running``).
        self.running_count = running_count
        #: A worker silent this long is gone: past a lease (its tasks are taken over by then)
        #: and past three heartbeats (one late beat is no death).
        self.silent_after_ms = int(1000 * max(settings.lease_seconds, 3 * settings.worker_heartbeat_seconds))
        #: When this worker first beat (Redis clock, ISO 8601): the entry's ``started_at``.
        self.started_at = ""
        self._reported: set[bytes] = set()

    async def heartbeat(self) -> None:
        """Write this worker's entry, stamped with the Redis server's clock."""
        now = await redis_now_ms(self.redis)
        self.started_at = self.started_at or _iso(now)
        entry = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "running": self.running_count(),
            "started_at": self.started_at,
            "heartbeat_at": _iso(now),
            "heartbeat_ms": now,
        }
        await self.redis.hset(self.keys.workers(), self.worker_id, json.dumps(entry))

    async def forget_silent_workers(self) -> None:
        """Drop the entries (and running sets and control streams) of workers silent for longer
        than :attr:`silent_after_ms` on the Redis clock; drop unreadable entries alone."""
        now = await redis_now_ms(self.redis)
        entries: Any = await self.redis.hgetall(self.keys.workers())
        for worker_id, raw in entries.items():
            try:
                seen = heartbeat_ms(raw)
            except ValueError as problem:
                self._report_malformed(worker_id, raw, str(problem))
                await self.redis.hdel(self.keys.workers(), worker_id)
                continue
            if now - seen > self.silent_after_ms:
                await self._forget(worker_id.decode(errors="replace"))

    async def _forget(self, worker_id: str) -> None:
        await self._drop(worker_id)
        log.info("forgot worker %s (silent for over %ss)", worker_id, self.silent_after_ms / 1000)

    def _report_malformed(self, worker_id: bytes, raw: bytes, problem: str) -> None:
        """Log a malformed entry the first time it is seen, not at every round it comes back
        (a process that keeps writing a bad entry must not flood the log)."""
        if worker_id in self._reported:
            return
        if len(self._reported) >= REPORTED_LIMIT:
            self._reported.clear()
        self._reported.add(worker_id)
        log.warning(
            "dropped the malformed entry %r of %s (%s): %r; a live worker writes its entry again at its next heartbeat",
            worker_id.decode(errors="replace"), self.keys.workers(), problem, raw[:200],
        )

    async def add_running(self, label: str) -> None:
        """List a task among this worker's running ones (for operators; a failure is no reason
        to stop the task)."""
        try:
            await self.redis.sadd(self.keys.worker_running(self.worker_id), label)
        except RedisError as exc:
            log.warning("could not list %s among the running tasks: %s", label, exc)

    async def remove_running(self, label: str) -> None:
        try:
            await self.redis.srem(self.keys.worker_running(self.worker_id), label)
        except RedisError as exc:
            log.warning("could not drop %s from the running tasks: %s", label, exc)

    async def leave(self) -> None:
        """Remove this worker's entry, running set and control stream (on a clean stop)."""
        try:
            await self._drop(self.worker_id)
        except RedisError as exc:
            log.warning("could not remove this worker's entry from %s: %s", self.keys.workers(), exc)

    async def _drop(self, worker_id: str) -> None:
        """A worker's entry, running set and control stream, gone."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.keys.workers(), worker_id)
        pipe.delete(self.keys.worker_running(worker_id), self.keys.worker_control(worker_id))
        await pipe.execute()
