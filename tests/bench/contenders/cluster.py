"""streamcoord on a Redis Cluster of three masters (``tests/topologies.Cluster``, on ports the
kernel picks): the same gateway and publishing as :mod:`.streamcoord`, with
``STREAMCOORD_REDIS_URL=redis+cluster://...``. Its live events come by sharded Pub/Sub, one
subscriber connection per master. Redis CPU is the first master's (a third of the slots).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from ...topologies import HOST, Cluster
from . import Endpoint
from .streamcoord import Streamcoord


class StreamcoordCluster(Streamcoord):
    name = "streamcoord (3-master cluster)"

    def __init__(self) -> None:
        super().__init__()
        self.cluster: Cluster | None = None

    async def start(self, workdir: Path, streams: int) -> Endpoint:
        self.cluster = await asyncio.to_thread(Cluster(workdir / "cluster").start)
        nodes = [ClusterNode(HOST, node.port) for node in self.cluster.nodes]
        self.redis = cast(Redis, RedisCluster(startup_nodes=nodes))
        return await self.serve(workdir, streams, self.cluster.url, self.cluster.nodes[0].pid)

    async def append(self, keys: list[str], args: list[Any]) -> list[Any]:
        """A cluster's script call touches one slot: one call per event, sent together."""
        assert self.redis is not None and self._sha is not None
        common, per_event = args[:4], 8
        calls = [
            self.redis.evalsha(self._sha, 2, *keys[2 * i:2 * i + 2], *common,
                               *args[4 + per_event * i:4 + per_event * (i + 1)])
            for i in range(len(keys) // 2)
        ]
        return [reply[0] for reply in await asyncio.gather(*calls)]

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            if self.cluster is not None:
                await asyncio.to_thread(self.cluster.stop)
