"""A gateway's Pub/Sub side: the shard channels of the streams it follows, one connection per node.

``append.lua`` publishes every event on its task's shard channel as it appends it. The hub asks
a :class:`Subscriber` to follow the channels of its streams; the subscriber keeps them subscribed
(``SSUBSCRIBE``) on one connection per Redis node: one in all for a single Redis or Sentinel's
master, one per primary that owns a followed channel in a cluster. Nothing polls.

Pub/Sub delivers at most once, so the subscriber tells its :class:`Sink` (the hub) exactly when
a channel is subscribed (the server confirmed it: from then on nothing published is missed) and
when it is not any more (the connection dropped, Redis cut it over its output-buffer limit, a
cluster slot moved away). The hub reads what it may have missed from the streams then.

A connection that goes silent (a network that drops packets, no reset) is noticed by a PING every
:data:`PING_SECONDS`: one not heard from for :data:`SILENT_SECONDS` is closed and opened again.

Subscriber connections speak RESP2 (see :class:`streamcoord.connection.RedisFactory`), so every
reply on them is an array ``[kind, channel, ...]`` and a message costs one parse.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Iterable
from typing import Any, Protocol

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .backoff import Backoff

log = logging.getLogger(__name__)

PING_SECONDS = 5.0
#: A connection silent this long (no message, no answer to a PING) is taken for dead.
SILENT_SECONDS = 3 * PING_SECONDS
#: Channels per SSUBSCRIBE / SUNSUBSCRIBE command.
COMMAND_CHANNELS = 1000
#: Messages read in a row before the reader lets the loop run (the hub's flush, client writes).
READ_BURST = 1000


class Sink(Protocol):
    """What a subscriber reports to (the hub). Called on the event loop, never concurrently."""

    def on_message(self, channel: bytes, message: bytes) -> None: ...

    def on_subscribed(self, channel: bytes) -> None:
        """The server confirmed the subscription: every message published from now on arrives."""

    def on_lost(self, channels: Iterable[bytes]) -> None:
        """These channels are not subscribed any more (for now): messages may have been missed."""


class Connector(Protocol):
    """Where a channel is served, and connections to there."""

    #: Channels of several slots may share one SSUBSCRIBE (False in a cluster).
    mixes_slots: bool

    def route(self, channel: bytes) -> str:
        """The name of the node that serves ``channel``."""

    async def connect(self, node: str) -> AbstractConnection: ...

    async def release(self, connection: AbstractConnection) -> None: ...

    async def refresh(self) -> None:
        """Learn again which node serves what (after a node answered MOVED, or went away)."""


class PoolConnector:
    """One Redis (or the master Sentinel names): every channel on one connection of ``pool``."""

    mixes_slots = True

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def route(self, channel: bytes) -> str:
        return "redis"

    async def connect(self, node: str) -> AbstractConnection:
        connection: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        with contextlib.suppress(Exception):  # best effort: it is being thrown away
            await connection.disconnect()
        await self._pool.release(connection)

    async def refresh(self) -> None:
        pass  # Sentinel's pool finds the current master when it connects


class ClusterConnector:
    """A Redis Cluster: each channel on a connection to the primary that owns its slot."""

    mixes_slots = False

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._owners: dict[int, ClusterNode] = {}  # id of a connection -> the node it is of

    def route(self, channel: bytes) -> str:
        node = self._cluster.get_node_from_key(channel)  # type: ignore[arg-type]
        if node is None:
            raise RedisConnectionError(f"no cluster node serves slot {key_slot(channel)}")
        return str(node.name)

    async def connect(self, node: str) -> AbstractConnection:
        found = self._cluster.get_node(node_name=node)
        if found is None:
            raise RedisConnectionError(f"cluster node {node} is gone")
        # The node's own pool: its idle connection (the client's first PING) is reused, so a
        # gateway holds no more connections per node than before it subscribed.
        connection = found.acquire_connection()
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:  # give it back, or the node's one connection is gone for good
            with contextlib.suppress(Exception):
                await connection.disconnect()
            found.release(connection)
            raise
        self._owners[id(connection)] = found
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        with contextlib.suppress(Exception):
            await connection.disconnect()
        node = self._owners.pop(id(connection), None)
        if node is not None:
            node.release(connection)  # type: ignore[arg-type]

    async def refresh(self) -> None:
        await self._cluster.nodes_manager.initialize()


class _Silent(RedisConnectionError):
    """The connection answered nothing, not even a PING, for :data:`SILENT_SECONDS`."""


class Subscriber:
    """Keeps channels subscribed, one connection per node, and reports to a :class:`Sink`."""

    def __init__(self, connector: Connector, sink: Sink) -> None:
        self.connector = connector
        self.sink = sink
        self.stats: collections.Counter[str] = collections.Counter()
        self._links: dict[str, _Link] = {}
        self._route: dict[bytes, _Link] = {}  # channel -> the link it is (to be) subscribed on
        self._rerouting: set[bytes] = set()
        self._reroute_task: asyncio.Task[None] | None = None
        #: One backoff for every reroute: reset only once a link connects, so a node that stays
        #: down is retried less and less often, not ten times a second.
        self._reroute_backoff = Backoff(first=0.1, cap=5.0)

    def start(self) -> None:
        """Start. A single Redis's connection opens at once, so that :attr:`connected` says
        whether Redis is reachable before any channel is followed (a cluster's, per node, open
        with their first channel)."""
        if self.connector.mixes_slots:
            self._link(self.connector.route(b""))

    async def stop(self) -> None:
        tasks = [link.task for link in self._links.values()]
        if self._reroute_task is not None:
            tasks.append(self._reroute_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._links.clear()
        self._route.clear()

    @property
    def connected(self) -> bool:
        """Every link is connected, and no channel waits for its node to be found."""
        return all(link.connected for link in self._links.values()) and not self._rerouting

    def add(self, channel: bytes) -> None:
        """Follow ``channel``; :meth:`Sink.on_subscribed` tells when it is subscribed."""
        try:
            link = self._link(self.connector.route(channel))
        except Exception as exc:  # a cluster with a slot no node serves: find it later
            log.warning("cannot subscribe to %s yet: %s", channel.decode(errors="replace"), exc)
            self._reroute([channel])
            return
        self._route[channel] = link
        link.add(channel)

    def remove(self, channel: bytes) -> None:
        self._rerouting.discard(channel)
        link = self._route.pop(channel, None)
        if link is not None:
            link.remove(channel)

    def _link(self, node: str) -> _Link:
        link = self._links.get(node)
        if link is None:
            link = self._links[node] = _Link(node, self)
        return link

    def _reroute(self, channels: Iterable[bytes]) -> None:
        """Find the nodes of ``channels`` again (a cluster's slots moved), then subscribe there."""
        for channel in channels:
            self._route.pop(channel, None)
            self._rerouting.add(channel)
        if self._rerouting and self._reroute_task is None:
            self._reroute_task = asyncio.create_task(self._reroute_soon(), name="streamcoord-subscriber-reroute")

    async def _reroute_soon(self) -> None:
        try:
            while self._rerouting:
                await asyncio.sleep(self._reroute_backoff.delay())
                try:
                    await self.connector.refresh()
                except Exception as exc:  # RedisClusterException is no RedisError: retry all
                    log.warning("could not learn the cluster's slots again: %s", exc)
                    continue
                channels, self._rerouting = self._rerouting, set()
                for channel in channels:
                    self.add(channel)  # back into _rerouting if still unserved
        finally:
            self._reroute_task = None


class _Link:
    """One connection to one node, and the channels subscribed (or to subscribe) on it."""

    def __init__(self, node: str, owner: Subscriber) -> None:
        self.node = node
        self._owner = owner
        #: Channels wanted on this link: subscribed, or to be once connected.
        self.channels: set[bytes] = set()
        self._to_add: set[bytes] = set()  # not sent yet
        self._to_remove: set[bytes] = set()
        #: SUNSUBSCRIBEs sent and not confirmed yet, per channel: a confirmation beyond these is
        #: the server's own (a slot moved away).
        self._unsubscribing: collections.Counter[bytes] = collections.Counter()
        self._changed = asyncio.Event()
        self.connected = False
        self._heard = 0.0
        self.task = asyncio.create_task(self._run(), name=f"streamcoord-subscriber-{node}")

    def add(self, channel: bytes) -> None:
        self.channels.add(channel)
        if channel in self._to_remove:
            # Its SUNSUBSCRIBE was never sent: it stayed subscribed. The sink drops messages of
            # channels it does not follow, so say it is subscribed now (the hub reads what it
            # dropped meanwhile).
            self._to_remove.discard(channel)
            if self.connected:
                asyncio.get_running_loop().call_soon(self._owner.sink.on_subscribed, channel)
            return
        self._to_add.add(channel)
        self._changed.set()

    def remove(self, channel: bytes) -> None:
        self.channels.discard(channel)
        if channel in self._to_add:
            self._to_add.discard(channel)  # never sent
            return
        self._to_remove.add(channel)
        self._changed.set()

    async def _run(self) -> None:
        owner = self._owner
        backoff = Backoff(first=0.1, cap=5.0)
        while True:
            connection: AbstractConnection | None = None
            try:
                connection = await owner.connector.connect(self.node)
                self._to_add, self._to_remove = set(self.channels), set()
                self._unsubscribing.clear()
                self._changed.set()  # subscribe to them all at once
                self._heard = asyncio.get_running_loop().time()
                self.connected = True
                backoff.reset()
                owner._reroute_backoff.reset()
                if self.channels:
                    log.info("subscriber connected to %s: subscribing to %d channels", self.node, len(self.channels))
                await self._serve(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything: a subscriber that stays down freezes its streams
                owner.stats["link_drops"] += 1
                if isinstance(exc, (RedisError, OSError)):
                    log.warning("subscriber connection to %s lost: %s", self.node, exc or type(exc).__name__)
                else:
                    log.exception("subscriber connection to %s failed", self.node)
            finally:
                was_connected, self.connected = self.connected, False
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await owner.connector.release(connection)
                if was_connected and self.channels:
                    owner.sink.on_lost(list(self.channels))
            if not owner.connector.mixes_slots:
                # A cluster: the node may have failed over, or its slots moved. This link ends;
                # its channels go where the cluster's slots say once they are learnt again.
                if owner._links.get(self.node) is self:
                    del owner._links[self.node]
                owner._reroute(self.channels)
                self.channels = set()
                return
            await asyncio.sleep(backoff.delay())

    async def _serve(self, connection: AbstractConnection) -> None:
        """Read and write on ``connection`` until either fails; raise why."""
        tasks = [
            asyncio.ensure_future(self._read(connection)),
            asyncio.ensure_future(self._write(connection)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the failure
            raise RedisConnectionError("subscriber connection closed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _write(self, connection: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PING_SECONDS):
                    await self._changed.wait()
            self._changed.clear()
            if loop.time() - self._heard > SILENT_SECONDS:
                raise _Silent(f"{self.node} answered nothing for {SILENT_SECONDS:.0f}s")
            by_slot = not self._owner.connector.mixes_slots
            removing, self._to_remove = sorted(self._to_remove), set()
            for chunk in _chunks(removing, by_slot=by_slot):
                self._unsubscribing.update(chunk)
                await connection.send_command("SUNSUBSCRIBE", *chunk, check_health=False)
            adding, self._to_add = sorted(self._to_add), set()
            for chunk in _chunks(adding, by_slot=by_slot):
                await connection.send_command("SSUBSCRIBE", *chunk, check_health=False)
            if not removing and not adding:
                await connection.send_command("PING", check_health=False)

    async def _read(self, connection: AbstractConnection) -> None:
        owner = self._owner
        sink, stats = owner.sink, owner.stats
        loop = asyncio.get_running_loop()
        burst = 0
        while True:
            reply: Any = await connection.read_response(timeout=math.inf, disconnect_on_error=False)
            self._heard = loop.time()
            if not isinstance(reply, list) or len(reply) < 2:
                continue  # the answer to a PING (RESP3 would send a plain PONG)
            kind = reply[0]
            if kind == b"smessage":
                sink.on_message(reply[1], reply[2])
                burst += 1
                if burst >= READ_BURST:  # a backlog: let the hub flush and clients write
                    burst = 0
                    await asyncio.sleep(0)
            elif kind == b"ssubscribe":
                stats["subscribes"] += 1
                if reply[1] in self.channels:
                    sink.on_subscribed(reply[1])
            elif kind == b"sunsubscribe":
                channel = reply[1]
                if self._unsubscribing[channel] > 0:  # ours
                    self._unsubscribing[channel] -= 1
                    if not self._unsubscribing[channel]:
                        del self._unsubscribing[channel]
                elif channel in self.channels:  # the server's: the slot moved to another node
                    stats["server_unsubscribes"] += 1
                    self.channels.discard(channel)
                    sink.on_lost([channel])
                    owner._reroute([channel])


def _chunks(channels: list[bytes], *, by_slot: bool = False) -> Iterable[list[bytes]]:
    """``channels`` in commands of at most :data:`COMMAND_CHANNELS`; in a cluster one command
    (SSUBSCRIBE and SUNSUBSCRIBE alike) holds channels of one slot only (else the node answers
    CROSSSLOT, and the connection is dropped)."""
    if by_slot:
        groups: dict[int, list[bytes]] = {}
        for channel in channels:
            groups.setdefault(key_slot(channel), []).append(channel)
        for group in groups.values():
            yield from _chunks(group)
        return
    for start in range(0, len(channels), COMMAND_CHANNELS):
        yield channels[start:start + COMMAND_CHANNELS]
