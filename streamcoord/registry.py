"""Which task models exist, known to gateways without a database.

Whoever owns the models (the Django side, the demo) registers them in one Redis hash; a gateway
resolves the model names of URLs against it, case-insensitively, as Django does. ``/stream/
Model/id`` needs the app label from here; a name two apps share must use ``/stream/app/Model/id``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from .flight import SingleFlight
from .keys import KeySpace

#: Marks a bare model name that two apps share.
AMBIGUOUS = b""
#: A miss re-reads the hash at most this often, so junk URLs cannot hammer Redis.
REFRESH_SECONDS = 1.0
#: A hit is trusted this long; then the hash is read again (a name may have become ambiguous).
MAX_AGE_SECONDS = 30.0


async def register_models(redis: Redis, keys: KeySpace, models: Iterable[tuple[str, str]]) -> None:
    """Record ``(app_label, ModelName)`` pairs as servable."""
    current: Any = await redis.hgetall(keys.models())
    mapping: dict[str | bytes, bytes] = {}
    for app_label, model in models:
        canonical = f"{app_label}.{model}".encode()
        mapping[f"{app_label}.{model}".lower()] = canonical
        short = model.lower()
        # This call's own earlier pairs come before what Redis held before the call.
        seen = mapping.get(short, current.get(short.encode()))
        mapping[short] = canonical if seen in (None, canonical) else AMBIGUOUS
    if mapping:
        await redis.hset(keys.models(), mapping=mapping)  # type: ignore[arg-type]


class ModelRegistry:
    """A gateway's cached view of the registered models."""

    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self._redis = redis
        self._keys = keys
        self._known: dict[bytes, bytes] = {}
        self._refreshed = float("-inf")
        self._refresh = SingleFlight[str, None]()  # clients arriving together read it once

    async def resolve(self, app_label: str | None, model: str) -> tuple[str, str] | None:
        """``(app_label, ModelName)`` as registered, or None for an unknown or ambiguous name."""
        name = (f"{app_label}.{model}" if app_label else model).lower().encode()
        age = time.monotonic() - self._refreshed
        canonical = self._known.get(name) if age < MAX_AGE_SECONDS else None
        if canonical is None and (age > REFRESH_SECONDS or self._refresh.in_flight("models")):
            await self._refresh.run("models", self._read)
            canonical = self._known.get(name)
        if not canonical:
            return None
        app, _, resolved = canonical.decode().partition(".")
        return app, resolved

    async def _read(self) -> None:
        known: Any = await self._redis.hgetall(self._keys.models())
        self._known = known
        self._refreshed = time.monotonic()
