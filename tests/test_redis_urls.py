"""STREAMCOORD_REDIS_URL forms, read without any Redis (each role logs in as its ACL user)."""

from __future__ import annotations

import pytest

from streamcoord.connection import Topology, parse_redis_url
from streamcoord.errors import ConfigurationError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://gateway:pw@redis:6379/0", Topology("single", url="redis://gateway:pw@redis:6379/0")),
        (
            "redis+sentinel://worker:p%40ss@s1:26379,s2:26380/mymaster/2",
            Topology("sentinel", nodes=(("s1", 26379), ("s2", 26380)), service="mymaster", db=2,
                     password="p@ss", username="worker"),
        ),
        (
            "redis+cluster://django:pw@n1:7000,n2:7001",
            Topology("cluster", nodes=(("n1", 7000), ("n2", 7001)), password="pw", username="django"),
        ),
        ("redis+cluster://:pw@n1:7000", Topology("cluster", nodes=(("n1", 7000),), password="pw")),
    ],
)
def test_the_user_and_password_of_every_topology_are_kept(url: str, expected: Topology) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize("url", ["http://x", "redis+sentinel://s1:26379", "redis+cluster://n1:port"])
def test_a_url_that_names_no_topology_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="STREAMCOORD_REDIS_URL"):
        parse_redis_url(url)


def test_a_refused_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigurationError) as refused:
        parse_redis_url("redis+sentinel://gateway:Hunter2-pw@s1:26379")
    assert "Hunter2-pw" not in str(refused.value) and "gateway:***@s1" in str(refused.value)
