"""The hub's live path, driven by hand on fakeredis (its subscriber never started): messages,
gaps and checks interleaved with reads in flight, as a busy gateway interleaves them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import pytest

from streamcoord.codec import Frame, live_frame, live_message
from streamcoord.hub import Hub
from streamcoord.keys import KeySpace
from streamcoord.settings import Settings
from streamcoord.subscriber import PoolConnector

KEY = "sc:{shop.Job:1}:events"
CHANNEL = KeySpace.live_of(KEY.encode())


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    redis = fakeredis.FakeAsyncRedis()
    yield Hub(PoolConnector(redis.connection_pool), redis, Settings())
    await redis.aclose()


def frame(seq: int, epoch: bytes = b"e1") -> Frame:
    return live_frame(live_message(seq, epoch, b"progress", b"{}"))


async def live_at(hub: Hub, cursor: int) -> None:
    """The stream followed, subscribed and live at ``cursor``; Redis holds 1..cursor."""
    for seq in range(1, cursor + 1):
        await hub._redis.xadd(KEY, {"epoch": "e1", "type": "progress", "data": "{}"}, id=f"{seq}-0")
    await hub._redis.hset(KeySpace.state_of(KEY.encode()), mapping={"epoch": "e1", "last_seq": cursor})
    hub.subscribe(KEY, cursor, b"e1")
    stream = hub._streams[KEY.encode()]
    stream.subscribed, stream.buffer = True, None


async def test_a_check_that_crosses_a_live_event_does_not_rewind_the_stream(hub: Hub) -> None:
    """The periodic check read last_seq 5; event 6 went live while its reply was on the way.
    The stream is alive, not cut back: no reset, no replay from the start."""
    await live_at(hub, 5)
    stream = hub._streams[KEY.encode()]
    asyncio.get_running_loop().call_soon(hub.on_message, CHANNEL, live_message(6, b"e1", b"progress", b"{}"))
    await hub._revalidate()
    assert stream.cursor == 6 and hub.stats["rewinds"] == 0 and not stream.queued


async def test_a_read_in_flight_when_the_subscription_is_made_again_is_not_enough(hub: Hub) -> None:
    """The subscriber dropped and subscribed again while a catch-up read was on its way: what
    that read saw predates the new subscription, so the stream is read once more before it
    goes live (else events published in between would wait for the next message or check)."""
    await live_at(hub, 3)
    stream = hub._streams[KEY.encode()]
    hub._queue(stream)

    def dropped_and_back() -> None:
        hub.on_lost([CHANNEL])
        hub.on_subscribed(CHANNEL)

    asyncio.get_running_loop().call_soon(dropped_and_back)
    await hub._catch_up([KEY.encode()])
    assert stream.queued and stream.buffer is not None  # read again, not live yet
    await hub._catch_up([KEY.encode()])
    assert not stream.queued and stream.buffer is None  # now live


async def test_a_stream_without_its_subscription_is_served_by_reads_at_each_check(hub: Hub) -> None:
    await live_at(hub, 2)
    stream = hub._streams[KEY.encode()]
    hub.on_lost([CHANNEL])
    await hub._revalidate()
    assert stream.queued


async def test_a_cluster_node_that_refuses_a_connection_keeps_its_pool() -> None:
    """The subscriber takes its connection from the node's own pool (one connection): a refused
    connect gives it back, so the node is tried again once it is back, not found exhausted."""
    import socket

    from redis.asyncio.cluster import ClusterNode
    from redis.exceptions import ConnectionError as RedisConnectionError

    from streamcoord.subscriber import ClusterConnector

    with socket.socket() as probe:  # a port the kernel picked, closed again: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = ClusterNode("127.0.0.1", port, max_connections=1, socket_connect_timeout=1)

    class OneNode:
        def get_node(self, node_name: str) -> ClusterNode:
            return node

    connector = ClusterConnector(OneNode())  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(RedisConnectionError):  # refused each time; never MaxConnectionsError
            await connector.connect(node.name)
    assert len(node._free) == 1
