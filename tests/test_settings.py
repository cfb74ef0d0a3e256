from __future__ import annotations

import dataclasses

import pytest

from streamcoord.errors import ConfigurationError
from streamcoord.settings import Settings


def test_defaults() -> None:
    s = Settings()
    assert s.redis_url == ""
    assert s.key_prefix == "sc"
    assert s.heartbeat_seconds == 15.0
    assert s.max_stream_length == 10_000
    assert s.stream_ttl_seconds == 86_400
    assert s.state_ttl_seconds == 604_800
    assert s.max_payload_bytes == 65_536
    assert s.client_queue_size == 1000
    assert s.retry_ms == 2000
    assert s.block_ms == 1000
    assert s.redis_socket_timeout == 5.0
    assert s.shutdown_grace_seconds == 5.0


def test_from_env_empty_environ_gives_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_from_env_parses_types() -> None:
    s = Settings.from_env(
        {
            "STREAMCOORD_REDIS_URL": "redis://r:6379/0",
            "STREAMCOORD_KEY_PREFIX": "prod",
            "STREAMCOORD_MAX_PAYLOAD_BYTES": "1024",
            "STREAMCOORD_HEARTBEAT_SECONDS": "2.5",
            "STREAMCOORD_BLOCK_MS": "500",
            "STREAMCOORD_REDIS_SOCKET_TIMEOUT": "3",
            "OTHER_BLOCK_MS": "junk",
            "block_ms": "junk",
        }
    )
    assert s.redis_url == "redis://r:6379/0"
    assert s.key_prefix == "prod"
    assert s.max_payload_bytes == 1024
    assert type(s.max_payload_bytes) is int
    assert s.heartbeat_seconds == 2.5
    assert s.block_ms == 500
    assert s.redis_socket_timeout == 3.0
    assert type(s.redis_socket_timeout) is float


def test_from_env_ignores_empty_values() -> None:
    assert (
        Settings.from_env({"STREAMCOORD_BLOCK_MS": "", "STREAMCOORD_KEY_PREFIX": ""}) == Settings()
    )


def test_from_env_overrides_win() -> None:
    s = Settings.from_env({"STREAMCOORD_RETRY_MS": "100"}, retry_ms=300)
    assert s.retry_ms == 300


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("STREAMCOORD_MAX_PAYLOAD_BYTES", "64k"),
        ("STREAMCOORD_BLOCK_MS", "1.5"),
        ("STREAMCOORD_RETRY_MS", "abc"),
        ("STREAMCOORD_HEARTBEAT_SECONDS", "fast"),
    ],
)
def test_from_env_bad_number(var: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: raw})
    assert var in str(info.value)
    assert raw in str(info.value)


@pytest.mark.parametrize(
    ("block_ms", "timeout"), [(5000, 5.0), (6000, 5.0), (1000, 1.0), (1000, 0.5)]
)
def test_block_ms_must_be_below_socket_timeout(block_ms: int, timeout: float) -> None:
    with pytest.raises(ConfigurationError, match="block_ms"):
        Settings(block_ms=block_ms, redis_socket_timeout=timeout)


def test_block_ms_just_below_socket_timeout_is_accepted() -> None:
    assert Settings(block_ms=4999, redis_socket_timeout=5.0).block_ms == 4999


@pytest.mark.parametrize("prefix", ["a:b", "{x}", "x}", "", "a b", "a\nb", "a\tb"])
def test_bad_key_prefix(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        Settings(key_prefix=prefix)


def test_bad_key_prefix_from_env() -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        Settings.from_env({"STREAMCOORD_KEY_PREFIX": "a:b"})


@pytest.mark.parametrize(
    "name", ["max_stream_length", "max_payload_bytes", "client_queue_size", "block_ms"]
)
@pytest.mark.parametrize("value", [0, -1])
def test_counts_must_be_positive(name: str, value: int) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings(**{name: value})


@pytest.mark.parametrize("key", ["block_ms", "BLOCK_MS", "Block_Ms"])
def test_from_mapping_any_case(key: str) -> None:
    assert Settings.from_mapping({key: 250}, environ={}).block_ms == 250


def test_from_mapping_environ_fills_gaps_and_mapping_wins() -> None:
    s = Settings.from_mapping(
        {"RETRY_MS": 300},
        environ={"STREAMCOORD_RETRY_MS": "100", "STREAMCOORD_KEY_PREFIX": "env"},
    )
    assert s.retry_ms == 300
    assert s.key_prefix == "env"


def test_from_mapping_unknown_key() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_mapping({"BLOCKMS": 250}, environ={})
    assert "'BLOCKMS'" in str(info.value)


def test_from_mapping_validates() -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        Settings.from_mapping({"KEY_PREFIX": "a:b"}, environ={})


@pytest.mark.parametrize(
    ("url", "embedded"),
    [("", True), ("redis://redis-host:6379/0", False), ("unix:///tmp/r.sock", False)],
)
def test_embedded(url: str, embedded: bool) -> None:
    assert Settings(redis_url=url).embedded is embedded


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().block_ms = 5  # type: ignore[misc]
