"""A worker's presence: its entry in the registry of workers (``sc:workers``), its set of running
tasks, and forgetting the workers that fell silent.

The registry's mechanics (entries stamped with the Redis clock, silence measured on it,
malformed entries dropped and logged once) are the core's, shared with gateways
(:mod:`streamcoord.presence`). A worker's entry adds ``concurrency`` and ``running`` (tasks
now); its running tasks are listed in ``sc:worker:<id>:running``.

Forgetting a silent worker removes its entry, running set and control stream. A malformed entry
goes alone, not the keys named after it: a worker we cannot read might be alive, and its control
stream may hold a cancel request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamcoord.keys import KeySpace
from streamcoord.presence import REPORTED_LIMIT, Registry, heartbeat_ms, iso_of_ms, redis_now_ms
from streamcoord.settings import Settings

# Re-exported: they were first defined here, and tests and operators' scripts import them here.
__all__ = ["REPORTED_LIMIT", "Presence", "heartbeat_ms", "iso_of_ms", "redis_now_ms"]

log = logging.getLogger(__name__)


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
        # A worker silent this long is gone: past a lease (its tasks are taken over by then)
        # and past three heartbeats (one late beat is no death).
        silent_after_ms = int(1000 * max(settings.lease_seconds, 3 * settings.worker_heartbeat_seconds))
        self.registry = Registry(redis, keys.workers(), worker_id, "worker", silent_after_ms, log)

    @property
    def silent_after_ms(self) -> int:
        return self.registry.silent_after_ms

    @property
    def started_at(self) -> str:
        """When this worker first beat (Redis clock, ISO 8601): the entry's ``started_at``."""
        return self.registry.started_at

    async def heartbeat(self) -> None:
        """Write this worker's entry, stamped with the Redis server's clock."""
        await self.registry.beat({"concurrency": self.concurrency, "running": self.running_count()})

    async def forget_silent_workers(self) -> None:
        """Drop the entries (and running sets and control streams) of workers silent for longer
        than :attr:`silent_after_ms` on the Redis clock; drop unreadable entries alone."""
        await self.registry.forget_silent(self._drop)

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
