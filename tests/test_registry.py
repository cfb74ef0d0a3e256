from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import fakeredis
import pytest

from streamcoord import registry as registry_module
from streamcoord.keys import KeySpace
from streamcoord.registry import ModelRegistry, register_models

KEYS = KeySpace()


@pytest.fixture
async def redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.mark.parametrize(
    ("app", "model"),
    [
        (None, "Report"),
        (None, "report"),
        (None, "REPORT"),
        ("reports", "Report"),
        ("Reports", "rEpOrT"),
        ("REPORTS", "REPORT"),
    ],
)
async def test_resolve_is_case_insensitive(
    redis: fakeredis.FakeAsyncRedis, app: str | None, model: str
) -> None:
    await register_models(redis, KEYS, [("reports", "Report"), ("shop", "Order")])
    assert await ModelRegistry(redis, KEYS).resolve(app, model) == ("reports", "Report")


async def test_resolve_keeps_registered_spelling(redis: fakeredis.FakeAsyncRedis) -> None:
    await register_models(redis, KEYS, [("my_app", "CamelTask")])
    assert await ModelRegistry(redis, KEYS).resolve(None, "cameltask") == ("my_app", "CamelTask")


async def test_shared_name_in_one_call(redis: fakeredis.FakeAsyncRedis) -> None:
    await register_models(redis, KEYS, [("a1", "Thing"), ("a2", "Thing")])
    reg = ModelRegistry(redis, KEYS)
    assert await reg.resolve(None, "Thing") is None
    assert await reg.resolve("a1", "Thing") == ("a1", "Thing")
    assert await reg.resolve("a2", "thing") == ("a2", "Thing")


async def test_shared_name_across_calls(redis: fakeredis.FakeAsyncRedis) -> None:
    await register_models(redis, KEYS, [("a1", "Thing")])
    await register_models(redis, KEYS, [("a2", "Thing")])
    reg = ModelRegistry(redis, KEYS)
    assert await reg.resolve(None, "Thing") is None
    assert await reg.resolve("a1", "Thing") == ("a1", "Thing")
    assert await reg.resolve("a2", "Thing") == ("a2", "Thing")


async def test_reregistering_same_model_stays_resolvable(redis: fakeredis.FakeAsyncRedis) -> None:
    """Every process start registers its models again; that must not mark them ambiguous."""
    await register_models(redis, KEYS, [("a1", "Thing")])
    await register_models(redis, KEYS, [("a1", "Thing")])
    assert await ModelRegistry(redis, KEYS).resolve(None, "thing") == ("a1", "Thing")


async def test_ambiguity_survives_reregistration(redis: fakeredis.FakeAsyncRedis) -> None:
    await register_models(redis, KEYS, [("a1", "Thing"), ("a2", "Thing")])
    await register_models(redis, KEYS, [("a1", "Thing")])
    assert await ModelRegistry(redis, KEYS).resolve(None, "Thing") is None


async def test_ambiguity_detected_within_batch_after_earlier_registration(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await register_models(redis, KEYS, [("a1", "Thing")])
    await register_models(redis, KEYS, [("a2", "Thing"), ("a1", "Thing")])
    assert await ModelRegistry(redis, KEYS).resolve(None, "Thing") is None


@pytest.mark.parametrize(
    ("app", "model"),
    [(None, "Nope"), ("reports", "Nope"), ("nope", "Report"), ("shop", "Report"), (None, "")],
)
async def test_unknown_resolves_to_none(
    redis: fakeredis.FakeAsyncRedis, app: str | None, model: str
) -> None:
    await register_models(redis, KEYS, [("reports", "Report"), ("shop", "Order")])
    assert await ModelRegistry(redis, KEYS).resolve(app, model) is None


async def test_empty_registry_resolves_to_none(redis: fakeredis.FakeAsyncRedis) -> None:
    assert await ModelRegistry(redis, KEYS).resolve(None, "Report") is None


async def test_register_nothing_writes_nothing(redis: fakeredis.FakeAsyncRedis) -> None:
    await register_models(redis, KEYS, [])
    assert await redis.exists(KEYS.models()) == 0


async def test_registry_uses_key_prefix(redis: fakeredis.FakeAsyncRedis) -> None:
    await register_models(redis, KeySpace("other"), [("reports", "Report")])
    assert await ModelRegistry(redis, KEYS).resolve(None, "Report") is None
    assert await ModelRegistry(redis, KeySpace("other")).resolve(None, "Report") == (
        "reports",
        "Report",
    )


async def test_miss_rereads_only_after_refresh_interval(
    redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Misses are throttled so junk URLs cannot hammer Redis, but new models show up later."""
    clock = [1000.0]
    # Replace the module's clock only, not time.monotonic itself, which the event loop uses.
    monkeypatch.setattr(registry_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    reg = ModelRegistry(redis, KEYS)
    assert await reg.resolve(None, "Report") is None
    await register_models(redis, KEYS, [("reports", "Report")])
    clock[0] += registry_module.REFRESH_SECONDS / 2
    assert await reg.resolve(None, "Report") is None
    clock[0] += registry_module.REFRESH_SECONDS
    assert await reg.resolve(None, "Report") == ("reports", "Report")


async def test_clients_arriving_together_read_the_registry_once(
    redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway restarted under load: a thousand first requests, one HGETALL."""
    await register_models(redis, KEYS, [("shop", "Order")])
    registry = ModelRegistry(redis, KEYS)
    reads = 0
    real = redis.hgetall

    async def counted(key: str) -> object:
        nonlocal reads
        reads += 1
        return await real(key)

    monkeypatch.setattr(redis, "hgetall", counted)
    resolved = await asyncio.gather(*(registry.resolve(None, "order") for _ in range(1000)))
    assert reads == 1 and set(resolved) == {("shop", "Order")}
