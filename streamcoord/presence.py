"""Presence: the registries of live processes (``sc:workers``, ``sc:gateways``), each process
keeping its own entry, and forgetting the processes that fell silent.

A registry is a HASH: field = a process's id, value = a JSON object with its ``host``, ``pid``,
what its kind adds (a worker's ``running``, a gateway's ``listeners``, ...), ``started_at``, and
the time of its last heartbeat, ``heartbeat_ms`` (milliseconds of the Redis server's clock) and
``heartbeat_at`` (the same instant in ISO 8601, for people reading ``HGETALL``). A process
rewrites its entry at each heartbeat and removes it when it stops cleanly.

Registries are for operators; nothing correct depends on them (a dead worker's tasks come back
through the job queue's pending list; clients of a dead gateway reconnect elsewhere). So
forgetting is housekeeping, done by every live process of the kind, with two rules:

* Silence is measured on the Redis server's clock, as leases are: a process whose host clock is
  off by minutes is neither forgotten while alive nor kept when dead.
* An entry that cannot be read (not JSON, no heartbeat, a heartbeat that is no finite number,
  a bad date: a hand edit, a bug) is logged once and dropped, and never stops the round.
  Dropping is safe: a live process writes its entry again at its next heartbeat.

:class:`Registry` is that mechanism for any kind; :class:`GatewayPresence` is a gateway's use
of it (a worker's is ``django_app.worker.presence``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .keys import KeySpace
from .settings import Settings

log = logging.getLogger(__name__)

#: Malformed entries remembered as already reported; past this many the memory starts over
#: (a flood of bad entries is then reported again, once each, rather than kept forever).
REPORTED_LIMIT = 1024
#: Heartbeats a process may miss before it is taken for gone (one late beat is no death).
SILENT_BEATS = 3


async def redis_now_ms(redis: Redis) -> int:
    """The Redis server's clock (``TIME``) in milliseconds: the clock leases are measured on."""
    seconds, microseconds = await redis.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def heartbeat_ms(raw: bytes) -> int:
    """When the process of a registry entry last beat, in ms of the Redis clock.

    An entry written by a process from before ``heartbeat_ms`` existed (a rolling upgrade) has
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


def iso_of_ms(ms: int) -> str:
    """``ms`` (since the epoch, UTC) in ISO 8601, to the millisecond."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class Registry:
    """One registry (a HASH at ``key``) as one process of ``kind`` sees it: its own entry,
    ``member``, and the housekeeping of the others'.

    ``logger``: where forgetting and malformed entries are reported (a worker keeps its own
    module's, the name operators configured)."""

    def __init__(
        self, redis: Redis, key: str, member: str, kind: str, silent_after_ms: int,
        logger: logging.Logger = log,
    ) -> None:
        self.redis = redis
        self.key = key
        self.member = member
        self.kind = kind
        #: An entry whose heartbeat is older than this (Redis clock) is gone.
        self.silent_after_ms = silent_after_ms
        #: When this process first beat (Redis clock, ISO 8601): the entry's ``started_at``.
        self.started_at = ""
        self._log = logger
        self._reported: set[bytes] = set()

    async def beat(self, fields: Mapping[str, Any]) -> None:
        """Write this process's entry (its ``host``, ``pid``, ``fields``, ``started_at`` and
        the heartbeat), stamped with the Redis server's clock."""
        now = await redis_now_ms(self.redis)
        self.started_at = self.started_at or iso_of_ms(now)
        entry = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **fields,
            "started_at": self.started_at,
            "heartbeat_at": iso_of_ms(now),
            "heartbeat_ms": now,
        }
        await self.redis.hset(self.key, self.member, json.dumps(entry))

    async def forget_silent(self, drop: Callable[[str], Awaitable[None]] | None = None) -> list[str]:
        """Forget the processes silent for longer than :attr:`silent_after_ms` on the Redis
        clock (``drop(id)`` removes an entry with whatever else a process of this kind keeps;
        by default the entry alone), and drop unreadable entries alone. Returns who was
        forgotten."""
        now = await redis_now_ms(self.redis)
        entries: Any = await self.redis.hgetall(self.key)
        forgotten = []
        for member, raw in entries.items():
            try:
                seen = heartbeat_ms(raw)
            except ValueError as problem:
                self._report_malformed(member, raw, str(problem))
                await self.redis.hdel(self.key, member)
                continue
            if now - seen > self.silent_after_ms:
                name = member.decode(errors="replace")
                await (drop or self.remove)(name)
                self._log.info("forgot %s %s (silent for over %ss)", self.kind, name, self.silent_after_ms / 1000)
                forgotten.append(name)
        return forgotten

    async def remove(self, member: str) -> None:
        """One process's entry, gone."""
        await self.redis.hdel(self.key, member)

    def _report_malformed(self, member: bytes, raw: bytes, problem: str) -> None:
        """Log a malformed entry the first time it is seen, not at every round it comes back
        (a process that keeps writing a bad entry must not flood the log)."""
        if member in self._reported:
            return
        if len(self._reported) >= REPORTED_LIMIT:
            self._reported.clear()
        self._reported.add(member)
        self._log.warning(
            "dropped the malformed entry %r of %s (%s): %r; a live %s writes its entry again at its next heartbeat",
            member.decode(errors="replace"), self.key, problem, raw[:200], self.kind,
        )


class GatewayPresence:
    """One gateway process's entry in ``sc:gateways``, kept current every
    ``worker_heartbeat_seconds``, and the forgetting of gateways silent for
    :data:`SILENT_BEATS` heartbeats.

    The entry's id is the hub's ``gateway_id``; besides the registry's fields it holds
    ``address`` (the public listener, ``http://host:port`` or ``unix:/path``), ``admin`` (the
    admin listener's, or ""), and what ``counts()`` says at each beat (``listeners``,
    ``streams``, ``deliveries``). A failed beat is logged (the first of a run of failures, and
    the recovery) and counted in ``stats["presence_errors"]``; it never stops the gateway."""

    def __init__(
        self, redis: Redis, keys: KeySpace, gateway_id: str, settings: Settings, *,
        address: str, admin: str, counts: Callable[[], Mapping[str, int]],
        stats: collections.Counter[str] | None = None,
    ) -> None:
        self.seconds = settings.worker_heartbeat_seconds
        self.registry = Registry(
            redis, keys.gateways(), gateway_id, "gateway", int(1000 * SILENT_BEATS * self.seconds)
        )
        self.address = address
        self.admin = admin
        self._counts = counts
        self._stats = stats if stats is not None else collections.Counter()
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Beat once now (the entry is there when the gateway announces itself), then keep
        beating in the background."""
        await self._round()
        self._task = asyncio.create_task(self._beat_forever(), name="streamcoord-gateway-presence")

    async def stop(self) -> None:
        """Stop beating and remove this gateway's entry (a clean shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(max(self.seconds, 1.0)):
                await self.registry.remove(self.registry.member)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not remove this gateway's entry from %s: %s", self.registry.key, exc or "timed out")

    async def beat(self) -> None:
        await self.registry.beat({"address": self.address, "admin": self.admin, **self._counts()})

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.seconds)
            await self._round()

    async def _round(self) -> None:
        """A beat, then forgetting the silent; a failure is reported, and tried again at the
        next heartbeat (an entry is only for operators: no hurry)."""
        try:
            async with asyncio.timeout(max(self.seconds, 1.0) * SILENT_BEATS):
                await self.beat()
                await self.registry.forget_silent()
        except (RedisError, OSError, TimeoutError) as exc:  # Redis away, or refusing (ACL)
            self._stats["presence_errors"] += 1
            if not self._failing:
                log.warning(
                    "keeping this gateway's entry in %s failed (%s); retrying every %ss",
                    self.registry.key, exc or "timed out", self.seconds,
                )
            self._failing = True
        except Exception:  # a bug: logged, and the loop goes on (the gateway serves regardless)
            log.exception("keeping this gateway's entry in %s failed", self.registry.key)
            self._failing = True
        else:
            if self._failing:
                log.info("this gateway's entry in %s is kept again", self.registry.key)
            self._failing = False
