"""Redis Cluster end to end: a cluster of three masters of the test's own (``redis-server
--cluster-enabled yes``, joined by ``redis-cli --cluster create``), selected with
``STREAMCOORD_REDIS_URL=redis+cluster://...``, serving two ``runserver_stream`` gateways and two
``runworker`` processes.

1. 100 tasks, their keys spread over all three masters, run end to end; one client per task, on
   alternating gateways, gets the exact gap-free sequence ending in one ``complete``; each
   gateway process holds a bounded number of Redis connections (``CLIENT LIST`` on every node,
   by the ``streamcoord:<role>:<pid>`` names) that does not grow with its clients. Then, from
   Django on the cluster URL, ``is_task_running`` answers and ``cleanup_old_tasks`` deletes every
   task's rows and keys.
2. The slots of running tasks move to another master mid-stream (``CLUSTER SETSLOT ...
   MIGRATING/IMPORTING``, ``MIGRATE``, ``SETSLOT ... NODE``: what ``redis-cli --cluster
   reshard`` does, slot by slot), so writers, the gateways' catch-up reads and the workers go
   through ASK and then MOVED redirections, and the gateways' shard-channel subscriptions move
   (Redis unsubscribes them from the old owner); every client still gets everything exactly once.
3. Listeners of twelve slots leaving at once: their channels are unsubscribed slot by slot,
   and the hub's subscriber connections stay up.
4. The live path's faults on the cluster: every master kills its pub/sub clients mid-stream,
   and messages are lost with the connections up; each listener still gets 1..N exactly once.

Figures (connections, timings) are printed (``pytest -s``) and kept in ``cluster-report.jsonl``
in the test's temporary directory; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from streamcoord.keys import KeySpace, TaskRef

from .processes import Gateway, gateway_redis_connections
from .rawsse import RawSSE, SSEEvent
from .topologies import HOST, Cluster
from .workloads import (
    Follower,
    Tally,
    assert_gap_free,
    create_tasks_streamed,
    delivery_problems,
    gateway_stats,
    logs,
    project_on,
    read_until,
    row,
    stream,
    stream_path,
    until,
    worker_id,
)

pytestmark = [pytest.mark.system, pytest.mark.cluster, pytest.mark.slow]

KEYS = KeySpace("sc")
#: Each gateway process: one subscriber and three shared connections, per node at most.
PER_NODE = 4


def report(directory: Path, scenario: str, **figures: Any) -> None:
    print(f"\n[cluster] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    with open(directory / "cluster-report.jsonl", "a") as out:
        out.write(json.dumps({"scenario": scenario, **figures}, default=str) + "\n")


class Nodes:
    """A plain client of each cluster node (no redirections followed): for CLIENT LIST, and
    for asking a node directly what it holds."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.clients = {node.port: Redis(host=HOST, port=node.port, socket_timeout=5) for node in cluster.nodes}

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


def cluster_client(cluster: Cluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(HOST, n.port) for n in cluster.nodes], socket_timeout=5)


#: Per gateway (by name), per node (by port), per role (``streamcoord:<role>:<pid>``): connections.
Footprint = dict[str, dict[int, dict[str, int]]]


async def footprint(nodes: Nodes, gateways: Sequence[Gateway]) -> Footprint:
    """The connections each gateway process holds on each node, by role."""
    lists = {port: await client.client_list() for port, client in nodes.clients.items()}
    out: Footprint = {}
    for gw in gateways:
        out[gw.log.stem] = {}
        for port, entries in lists.items():
            mine = [c["name"] for c in entries if c.get("name", "").endswith(f":{gw.pid}")]
            assert len(mine) == gateway_redis_connections(entries, gw.pid)
            out[gw.log.stem][port] = dict(collections.Counter(name.split(":")[1] for name in mine))
    return out


def per_node(fp: Footprint, roles: Sequence[str] = ()) -> dict[str, dict[int, int]]:
    """Connections per gateway per node (only ``roles``, when given)."""
    return {
        name: {port: sum(n for role, n in by_role.items() if not roles or role in roles) for port, by_role in nodes.items()}
        for name, nodes in fp.items()
    }


def totals(counts: dict[str, dict[int, int]]) -> dict[str, int]:
    return {name: sum(by_node.values()) for name, by_node in counts.items()}


def peak(samples: Sequence[dict[str, dict[int, int]]]) -> dict[str, dict[int, int]]:
    """The largest count seen on each node, per gateway, over several samples."""
    out: dict[str, dict[int, int]] = {}
    for sample in samples:
        for name, by_node in sample.items():
            mine = out.setdefault(name, {})
            for port, count in by_node.items():
                mine[port] = max(mine.get(port, 0), count)
    return out


def steady(samples: Sequence[dict[str, dict[int, int]]]) -> list[dict[str, dict[int, int]]]:
    """What each pair of consecutive samples both saw (the smaller count): connections a
    gateway holds, without one that came and went between two looks (redis-py's cluster
    client opens one to a node while it learns the slot map again, and closes it)."""
    return [
        {name: {port: min(count, later[name].get(port, 0)) for port, count in by_node.items()}
         for name, by_node in earlier.items()}
        for earlier, later in itertools.pairwise(samples)
    ] or list(samples)


def peak_roles(samples: Sequence[Footprint]) -> Footprint:
    """The largest count seen of each role on each node, per gateway."""
    out: Footprint = {}
    for sample in samples:
        for name, nodes in sample.items():
            for port, by_role in nodes.items():
                mine = out.setdefault(name, {}).setdefault(port, {})
                for role, count in by_role.items():
                    mine[role] = max(mine.get(role, 0), count)
    return out


def state_key(pk: Any) -> str:
    return KEYS.state(TaskRef("examples", "ProgressTask", str(pk)))


def over_bound(counts: dict[str, dict[int, int]], when: str) -> list[str]:
    problems = []
    for name, by_node in counts.items():
        problems += [f"{when}: {name} holds {n} connections on node {port}" for port, n in by_node.items() if n > PER_NODE]
        if sum(by_node.values()) > PER_NODE * len(by_node):
            problems.append(f"{when}: {name} holds {sum(by_node.values())} connections in all")
    return problems


async def sampling(nodes: Nodes, gateways: Sequence[Gateway], into: list[Footprint], listeners: list[int]) -> None:
    """Sample the gateways' connections and listeners until cancelled."""
    while True:
        into.append(await footprint(nodes, gateways))
        stats = [await gateway_stats(gw) for gw in gateways]
        listeners.append(sum(s["listeners"] for s in stats))
        await asyncio.sleep(0.1)


async def read_all(clients: Sequence[RawSSE], within: float) -> list[list[SSEEvent]]:
    try:
        return await asyncio.wait_for(asyncio.gather(*(c.events_until_end() for c in clients)), within)
    except TimeoutError:
        raise AssertionError(f"not every stream ended within {within}s") from None


@pytest.mark.timeout(150)
async def test_a_hundred_tasks_on_a_three_master_cluster_two_gateways_two_workers(tmp_path: Path, sse: Any) -> None:
    cluster = Cluster(tmp_path / "cluster").start()
    nodes = Nodes(cluster)
    redis = cluster_client(cluster)
    steps = 5
    try:
        with project_on(tmp_path / "project", cluster.url) as project:
            gateways = [project.gateway("gw1"), project.gateway("gw2")]
            w1, w2 = project.worker("w1", concurrency=50), project.worker("w2", concurrency=50)
            at_start = await footprint(nodes, gateways)

            watched: list[tuple[dict[str, Any], RawSSE]] = []

            async def create_and_watch(count: int, delay: float) -> None:
                """Create and start ``count`` tasks in one process; a client for each as soon as
                it is created, on alternating gateways."""
                fields = (f"steps={steps}", f"delay={delay}")
                async for created in create_tasks_streamed(project, count, "ProgressTask", *fields):
                    assert created["started"] is True, created
                    gateway = gateways[len(watched) % 2]
                    watched.append((created, await sse(gateway.socket, created["stream"])))

            # A few clients first: the connections the gateways hold for them.
            await create_and_watch(4, 0.1)
            few_results = await read_all([c for _, c in watched], 30)
            with_few = await footprint(nodes, gateways)

            # Then 96 more, created and watched as fast as one process creates them (tasks of
            # about 10 s, so most clients are connected at once), while the gateways'
            # connections and listeners are sampled.
            samples: list[Footprint] = []
            listeners: list[int] = []
            sampler = asyncio.create_task(sampling(nodes, gateways, samples, listeners))
            began = time.monotonic()
            try:
                await create_and_watch(96, 2.0)
                created_s = time.monotonic() - began
                results = few_results + await read_all([c for _, c in watched[4:]], 60)
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            ran_s = time.monotonic() - began
            samples.append(await footprint(nodes, gateways))
            with_all = peak(steady([per_node(sample) for sample in samples]))
            core_roles = ("gateway", "gateway-reader")

            ids = [created["id"] for created, _ in watched]
            assert len(set(ids)) == 100
            assert all(client.status == 200 for _, client in watched), [c.status for _, c in watched]

            # Every client: the exact sequence, start .. complete, once.
            expected = ["start"] + ["progress"] * steps + ["complete"]
            problems: list[str] = []
            for (created, _), events in zip(watched, results, strict=True):
                what = f"task {created['id']}"
                try:
                    assert_gap_free(events, what)
                except AssertionError as exc:
                    problems.append(str(exc))
                    continue
                if [e.event for e in events] != expected:
                    problems.append(f"{what}: {[e.event for e in events]}")
                elif events[-1].json()["final_value"] != {"steps": steps}:
                    problems.append(f"{what}: {events[-1].data}")
            assert not problems, "\n".join(problems[:20]) + "\n" + logs(*gateways, w1, w2)
            # Live events came by sharded Pub/Sub on one subscriber connection per master, and
            # none dropped: clients leaving unsubscribe slot by slot (a SUNSUBSCRIBE naming
            # channels of several slots is a CROSSSLOT error, which cost the connection).
            for gw in gateways:
                stats = await gateway_stats(gw)
                assert stats.get("link_drops", 0) == 0 and stats["subscribes"] >= 50, stats

            # The keys spread over every master; each task's keys share one slot, on the node
            # that CLUSTER KEYSLOT and the slot map name.
            owners = cluster.slot_owners()
            held: collections.Counter[int] = collections.Counter()
            slots = set()
            any_node = next(iter(nodes.clients.values()))
            for pk in ids:
                key = state_key(pk)
                events_key = KEYS.events(TaskRef("examples", "ProgressTask", str(pk)))
                slot = int(await any_node.execute_command("CLUSTER", "KEYSLOT", key))
                assert slot == key_slot(key.encode()) == key_slot(events_key.encode()), (key, slot)
                owner = nodes.clients[owners[slot]]
                assert await owner.exists(key, events_key) == 2, f"{key} and its stream are not both on node {owners[slot]}"
                held[owners[slot]] += 1
                slots.add(slot)
            assert set(held) == {n.port for n in cluster.nodes}, f"state keys by node: {dict(held)}"

            # Redis and the database agree: each ran once, completed; both workers took part.
            states = {}
            for pk in ids:
                raw: Any = await redis.hgetall(state_key(pk))
                states[pk] = {k.decode(): v.decode() for k, v in raw.items()}
            wrong = {pk: s for pk, s in states.items() if s.get("state") != "completed" or s.get("attempt") != "1"}
            assert not wrong, wrong
            assert {s["worker"] for s in states.values()} == {worker_id(w1), worker_id(w2)}
            refs = [TaskRef("examples", "ProgressTask", str(pk)) for pk in ids]
            await until(lambda: all(row(project, ref)[0] == "completed" for ref in refs), 15, "every row to be completed")
            for handle in (*gateways, w1, w2):
                assert "Traceback" not in handle.log_text(), logs(handle)

            # From Django, on the cluster URL: is_task_running, then cleanup_old_tasks deletes
            # every ended task's rows and keys (redis.Redis.from_url knew no redis+cluster://).
            shell = "from django_app.coordinator import coordinator; print(coordinator.is_task_running('ProgressTask', %d))"
            answer = await asyncio.to_thread(project.manage, "shell", "-c", shell % ids[0])
            assert answer.splitlines()[-1] == "False", answer
            cleaned = await asyncio.to_thread(project.manage, "cleanup_old_tasks", "--hours", "0")
            assert "deleted 100 tasks in all" in cleaned, cleaned
            for pk in ids[:10]:
                events_key = KEYS.events(TaskRef("examples", "ProgressTask", str(pk)))
                assert not await redis.exists(state_key(pk), events_key), f"task {pk}'s keys remain"

            figures = {
                "state_keys_by_node": dict(held), "distinct_slots": len(slots),
                "created_s": round(created_s, 2), "ran_s": round(ran_s, 2),
                "peak_listeners": max(listeners, default=0),
                "at_start": per_node(at_start), "with_4_clients": per_node(with_few),
                "with_100_clients_peak": with_all,
                "totals_at_start": totals(per_node(at_start)), "totals_with_4": totals(per_node(with_few)),
                "totals_with_100_peak": totals(with_all),
                "reader_and_shared_only_peak": peak([per_node(s, core_roles) for s in samples]),
                "by_role_peak": peak_roles(samples),
            }
            report(tmp_path, "100 tasks", masters=len(cluster.nodes), **figures)
            # Bounded, and not growing with the clients: 50 clients per gateway need no more
            # than the bound, whatever the pools had opened for 2.
            problems = over_bound(per_node(with_few), "with 4 clients") + over_bound(with_all, "with 100 clients")
            assert not problems, "\n".join(problems) + "\n" + json.dumps(figures, indent=1, default=str)
    finally:
        await redis.aclose()
        await nodes.aclose()
        cluster.stop()


# -- 2. resharding while tasks stream ------------------------------------------------------------


async def move_slot(nodes: Nodes, cluster: Cluster, slot: int, source: int, target: int, pause: float) -> int:
    """Move one slot from node ``source`` to node ``target`` (ports), the way ``redis-cli
    --cluster reshard`` does, with ``pause`` seconds in each phase: first the slot is migrating
    with its keys still on the source (they are served there; new keys are ASKed to the target),
    then its keys are on the target while the slot is still migrating (ASK), then the slot is
    the target's (MOVED). Returns how many keys moved."""
    ids = cluster.node_ids()
    src, dst = nodes.clients[source], nodes.clients[target]
    await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    await asyncio.sleep(pause)
    moved = 0
    while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        await src.execute_command("MIGRATE", HOST, target, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
    await asyncio.sleep(pause)
    for port in (target, source, *(n.port for n in cluster.nodes if n.port not in (source, target))):
        await nodes.clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    return moved


def said_about_redis(handle: Gateway) -> dict[str, int]:
    """What a process's log says about Redis trouble, by kind."""
    text = handle.log_text()
    needles = {
        "read failed": "hub read failed", "subscriber lost": "subscriber connection to", "append retried": "append to", "ClusterError": "ClusterError",
        "TTL exhausted": "TTL exhausted", "redis failed under task": "Redis failed under it",
        "fenced": "another worker owns it now", "traceback": "Traceback",
    }
    return {kind: text.count(needle) for kind, needle in needles.items() if needle in text}


@pytest.mark.timeout(120)
async def test_slots_of_running_tasks_move_to_another_master_mid_stream(tmp_path: Path) -> None:
    """Eight tasks of about 6 s; once every one has published, the slots of those on one master
    move to another (ASK, then MOVED). Every task completes; every client (one per task per
    gateway, reconnecting with Last-Event-ID should its stream drop) gets each event exactly
    once and one ``complete``; Redis holds each stream whole on its new node."""
    cluster = Cluster(tmp_path / "cluster").start()
    nodes = Nodes(cluster)
    redis = cluster_client(cluster)
    steps, delay, count = 60, 0.1, 8
    try:
        with project_on(tmp_path / "project", cluster.url) as project:
            gateways = [project.gateway("gw1"), project.gateway("gw2")]
            w1, w2 = project.worker("w1"), project.worker("w2")
            refs = []
            async for created in create_tasks_streamed(project, count, "ProgressTask", f"steps={steps}", f"delay={delay}"):
                refs.append(TaskRef("examples", "ProgressTask", str(created["id"])))
            followers = [Follower(gw.socket, stream_path(ref)) for ref in refs for gw in gateways]
            reading = [asyncio.create_task(f.run(30)) for f in followers]
            await until(lambda: all(len(f.events) >= 5 for f in followers), 20, "every task to publish")

            owners = cluster.slot_owners()
            by_node: dict[int, list[TaskRef]] = collections.defaultdict(list)
            for ref in refs:
                by_node[owners[key_slot(KEYS.state(ref).encode())]].append(ref)
            source = max(by_node, key=lambda port: len(by_node[port]))
            target = next(n.port for n in cluster.nodes if n.port != source)
            moving = by_node[source]
            slots = sorted({key_slot(KEYS.state(ref).encode()) for ref in moving})
            began = time.monotonic()
            moved_keys = 0
            for slot in slots:
                moved_keys += await move_slot(nodes, cluster, slot, source, target, pause=0.5)
            moved_s = time.monotonic() - began
            stats_after_move = [await gateway_stats(gw) for gw in gateways]
            await asyncio.gather(*reading)

            problems: list[str] = []
            unfinished = [f.describe() for f in followers if not f.done]
            problems += [f"no terminal event: {u}" for u in unfinished]
            for f in followers:
                problems += [f"{f.path}: {p}" for p in delivery_problems(f.events) if f.done]
                if any(e.event == "reset" for e in f.events):
                    problems.append(f"{f.path}: a reset, though no history was lost")
            owners_after = cluster.slot_owners()
            for ref in refs:
                slot = key_slot(KEYS.state(ref).encode())
                events = await stream(redis, ref)
                if [e.seq for e in events] != list(range(1, steps + 3)) or events[-1].type != b"complete":
                    problems.append(f"{ref}: stream in Redis {[(e.seq, e.type) for e in events][-3:]} ({len(events)} events)")
                if ref in moving:
                    if owners_after[slot] != target:
                        problems.append(f"{ref}: slot {slot} is on {owners_after[slot]}, not {target}")
                    if await nodes.clients[target].exists(KEYS.state(ref), KEYS.events(ref)) != 2:
                        problems.append(f"{ref}: its keys are not on the target node")
            rows = {ref: row(project, ref)[0] for ref in refs}
            problems += [f"{ref}: row {status}" for ref, status in rows.items() if status != "completed"]
            stats = [await gateway_stats(gw) for gw in gateways]
            report(
                tmp_path, "slots moved mid-stream", tasks=count, moved_tasks=len(moving),
                slots=slots, keys_moved=moved_keys, move_s=round(moved_s, 2), source=source, target=target,
                reconnects=sum(len(f.statuses) - 1 for f in followers),
                # The hub's catch-up rounds and failed ones: right after the move, and at the end;
                # the subscriptions Redis dropped when a slot moved.
                hub_reads_after_move=[s.get("reads", 0) for s in stats_after_move],
                hub_reads_at_end=[s.get("reads", 0) for s in stats],
                hub_read_errors_at_end=[s.get("read_errors", 0) for s in stats],
                server_unsubscribes=[s.get("server_unsubscribes", 0) for s in stats],
                listeners_at_end=[s.get("listeners") for s in stats],
                log_lines={h.log.stem: said_about_redis(h) for h in (*gateways, w1, w2)},
            )
            assert not problems, "\n".join(problems[:30]) + "\n" + logs(*gateways, w1, w2)
            # The first slot moved while its task ran: Redis dropped the gateways' subscriptions.
            assert sum(s.get("server_unsubscribes", 0) for s in stats) >= 1, stats
    finally:
        await redis.aclose()
        await nodes.aclose()
        cluster.stop()


@pytest.mark.timeout(60)
async def test_listeners_of_many_slots_leaving_at_once_keep_the_subscriber_connected(tmp_path: Path) -> None:
    """Twelve streams of different slots, followed by a hub on the cluster, whose clients all
    leave at once: their channels are unsubscribed together, slot by slot (one SUNSUBSCRIBE
    naming several slots is a CROSSSLOT error that cost the subscriber its connection), and
    the streams followed next go live at once."""
    from streamcoord.eventlog import EventLog
    from streamcoord.hub import Hub
    from streamcoord.settings import Settings
    from streamcoord.subscriber import ClusterConnector

    cluster = Cluster(tmp_path / "cluster").start()
    startup = [ClusterNode(HOST, node.port) for node in cluster.nodes]
    subscriber = RedisCluster(startup_nodes=startup, protocol=2)
    redis = cluster_client(cluster)
    hub = Hub(ClusterConnector(subscriber), redis, Settings(redis_url=cluster.url))
    try:
        await subscriber.initialize()
        await hub.start()
        refs = [TaskRef("shop", "Job", str(n)) for n in range(1, 13)]
        assert len({key_slot(KEYS.live(ref).encode()) for ref in refs}) == 12
        listeners = [hub.subscribe(KEYS.events(ref), 0)[0] for ref in refs]

        def live() -> bool:
            return all(s.buffer is None for s in hub._streams.values())

        await until(live, 20, "every stream to go live")
        for listener in listeners:  # in one step: their SUNSUBSCRIBEs go out together
            hub.unsubscribe(listener)
        again = hub.subscribe(KEYS.events(refs[0]), 0)[0]
        await until(live, 20, "the stream followed again to go live")
        log = EventLog(redis, Settings(redis_url=cluster.url))
        await log.writer(refs[0]).append("progress", {"n": 1})
        batches = await asyncio.wait_for(again.take(), 10)
        assert [f.seq for b in batches for f in b.frames] == [1]
        await asyncio.sleep(0.3)
        assert hub.stats["link_drops"] == 0, dict(hub.stats)
        assert hub.reading
    finally:
        await hub.stop()
        await subscriber.aclose()
        await redis.aclose()
        cluster.stop()


@pytest.mark.timeout(90)
async def test_pubsub_faults_on_a_cluster_lose_and_repeat_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The live-path faults of tests/test_live_path.py, on the cluster: six streams spread over
    the three masters, written while every master kills its pub/sub clients (``CLIENT KILL
    TYPE pubsub``) three times and some messages are lost on their way with the connection up.
    Each listener gets 1..N exactly once, in order; the hub's subscriber reconnects to each
    master and reads what it missed."""
    from streamcoord.codec import live_frame
    from streamcoord.eventlog import EventLog
    from streamcoord.hub import Hub
    from streamcoord.listener import BatchKind
    from streamcoord.settings import Settings
    from streamcoord.subscriber import ClusterConnector

    cluster = Cluster(tmp_path / "cluster").start()
    nodes = Nodes(cluster)
    startup = [ClusterNode(HOST, node.port) for node in cluster.nodes]
    subscriber = RedisCluster(startup_nodes=startup, protocol=2)
    redis = cluster_client(cluster)
    settings = Settings(redis_url=cluster.url)
    hub = Hub(ClusterConnector(subscriber), redis, settings)
    try:
        await subscriber.initialize()
        await hub.start()
        owners = cluster.slot_owners()
        refs = [TaskRef("shop", "Job", str(n)) for n in range(1, 7)]
        assert len({owners[key_slot(KEYS.live(ref).encode())] for ref in refs}) == 3
        listeners = {ref: hub.subscribe(KEYS.events(ref), 0)[0] for ref in refs}
        await until(lambda: all(s.buffer is None for s in hub._streams.values()), 20, "every stream live")
        real = hub.on_message
        lost = 0

        def lossy(channel: bytes, message: bytes) -> None:
            nonlocal lost
            if live_frame(message).seq % 17 == 0:
                lost += 1  # lost on its way: the connection stays up
                return
            real(channel, message)

        monkeypatch.setattr(hub, "on_message", lossy)
        log = EventLog(redis, settings)
        count = 120

        async def write(ref: TaskRef) -> None:
            writer = log.writer(ref)
            for n in range(1, count):
                await writer.append("progress", {"n": n})
                await asyncio.sleep(0.005)
            await writer.append("complete", {"n": count})

        async def kill() -> int:
            killed = 0
            for _ in range(3):
                await asyncio.sleep(0.25)
                for client in nodes.clients.values():
                    killed += int(await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
            return killed

        *_, killed = await asyncio.gather(*(write(ref) for ref in refs), kill())

        async def received(listener: Any) -> list[int]:
            seqs: list[int] = []
            while not seqs or seqs[-1] < count:
                batches = await listener.take()
                assert batches, "the listener closed"
                assert all(b.kind is not BatchKind.REWIND for b in batches)
                seqs += [f.seq for b in batches for f in b.frames]
            return seqs

        got = await asyncio.wait_for(asyncio.gather(*(received(each) for each in listeners.values())), 40)
        assert all(seqs == list(range(1, count + 1)) for seqs in got), [s[-5:] for s in got]
        assert killed >= 3 and lost >= 6 and hub.stats["link_drops"] >= 3, (killed, lost, dict(hub.stats))
        assert hub.stats["gaps"] >= 1
    finally:
        await hub.stop()
        await subscriber.aclose()
        await redis.aclose()
        await nodes.aclose()
        cluster.stop()


async def test_many_tasks_on_one_connection_over_the_cluster_cut_and_resumed(tmp_path: Path) -> None:
    """GET /streams on the cluster: 30 running tasks, their keys on every master, followed on
    one connection through two gateways, cut 8 times; every task's events exactly once."""
    cluster = Cluster(tmp_path / "cluster").start()
    try:
        with project_on(tmp_path / "project", cluster.url) as project:
            gateways = [project.gateway("gw1"), project.gateway("gw2")]
            project.worker("w1", concurrency=50)
            steps = 15
            created = [c async for c in create_tasks_streamed(project, 30, "ProgressTask", f"steps={steps}", "delay=0.2")]
            tasks = [TaskRef(c["app_label"], c["model"], str(c["id"])) for c in created]
            owners = cluster.slot_owners()
            assert len({owners[key_slot(KEYS.events(ref).encode())] for ref in tasks}) == 3
            path = "/streams?" + "&".join(f"task={ref.label}" for ref in tasks)
            tally = Tally(tasks)
            for cut in range(8):
                headers = {"Last-Event-ID": tally.last_id} if tally.last_id else {}
                got, ended = await asyncio.wait_for(read_until(gateways[cut % 2], path, headers, 40), 60)
                tally.take(got)
                assert not ended
            headers = {"Last-Event-ID": tally.last_id}
            got, ended = await asyncio.wait_for(read_until(gateways[0], path, headers, None), 120)
            tally.take(got)
            assert ended and tally.resets == []
            assert tally.problems({ref.label: steps + 2 for ref in tasks}) == [], logs(*gateways)
    finally:
        cluster.stop()
