"""The blocking client the Django side uses for ``is_task_running`` and ``cleanup_old_tasks``
(``streamcoord.connection.sync_client``) on every topology a ``STREAMCOORD_REDIS_URL`` can name:
``redis.Redis.from_url`` raised ValueError for ``redis+sentinel://`` and ``redis+cluster://``
(issue 13). Real servers: one redis-server, a Sentinel group, a 3-master cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamcoord.connection import sync_client
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.settings import Settings

from .processes import RedisServer
from .topologies import Cluster, SentinelGroup

pytestmark = pytest.mark.system

KEYS = KeySpace("sc")
REFS = [TaskRef("shop", "Job", str(n)) for n in range(1, 13)]


def exercise(client: object) -> None:
    """What the two callers do: HGET a state record; delete tasks' keys in a pipeline, one key
    per DEL (a cluster's pipeline refuses a DEL of several keys, even of one slot)."""
    for ref in REFS:
        client.hset(KEYS.state(ref), "state", "running")  # type: ignore[attr-defined]
        client.xadd(KEYS.events(ref), {"epoch": "e1", "type": "progress", "data": "{}"}, id="1-0")  # type: ignore[attr-defined]
    assert all(client.hget(KEYS.state(ref), "state") == b"running" for ref in REFS)  # type: ignore[attr-defined]
    pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
    for ref in REFS:
        pipe.delete(KEYS.events(ref))
        pipe.delete(KEYS.state(ref))
    assert pipe.execute() == [1] * 2 * len(REFS)


def test_one_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = sync_client(Settings(redis_url=server.url), "test")
        exercise(client)
        client.close()
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_a_cluster(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster").start()
    try:
        client = sync_client(Settings(redis_url=cluster.url), "test")
        owners = cluster.slot_owners()
        from redis.crc import key_slot

        assert len({owners[key_slot(KEYS.state(ref).encode())] for ref in REFS}) == 3  # every master
        exercise(client)
        client.close()
    finally:
        cluster.stop()


@pytest.mark.timeout(90)
def test_a_sentinel_group_reaches_its_master(tmp_path: Path) -> None:
    group = SentinelGroup(tmp_path / "sentinel").start()
    try:
        assert group.master is not None
        client = sync_client(Settings(redis_url=group.url), "test")
        client.hset("sc:probe", "on", "master")
        assert group.master.cli("HGET", "sc:probe", "on").strip() == "master"
        exercise(client)
        client.close()
    finally:
        group.stop()
