"""The SSE gateway as a real subprocess on a unix socket, against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.ids import EventId

from .processes import Gateway, gateway_redis_connections

pytestmark = pytest.mark.system

JOB = TaskRef("shop", "Job", "1")


def http(gateway: Gateway, admin: bool = False) -> httpx.AsyncClient:
    """A client of the gateway's public socket, or of its admin listener's (``/stats``)."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket if admin else gateway.socket)),
        base_url="http://gateway",
        timeout=10,
    )


async def stats(gateway: Gateway) -> dict[str, Any]:
    async with http(gateway, admin=True) as client:
        return (await client.get("/stats")).json()  # type: ignore[no-any-return]


async def wait_stats(
    gateway: Gateway, what: str, predicate: Any, within: float = 10
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        current = await stats(gateway)
        if predicate(current):
            return current
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"gateway stats never showed {what} within {within}s: {current}")
        await asyncio.sleep(0.05)


async def publish(
    log: EventLog, ref: TaskRef, count: int, *, complete: bool = True, start: int = 1
) -> list[EventId]:
    writer = log.writer(ref)
    ids = [await writer.append("progress", {"step": n}) for n in range(start, start + count)]
    if complete:
        ids.append(
            await writer.append("complete", {"message": "done"}, final_value={"total": count})
        )
    return ids


# -- plain routes ----------------------------------------------------------------------------


async def test_health_ready_stats_and_unknown_paths(gateway: Gateway) -> None:
    async with http(gateway) as client:
        health = await client.get("/health")
        assert (health.status_code, health.text, health.headers["content-type"]) == (
            200,
            "OK",
            "text/plain; charset=utf-8",
        )
        assert (await client.get("/ready")).text == "READY"
        assert (await stats(gateway))["listeners"] == 0  # on the admin listener only
        for path in ("/", "/nope", "/stream", "/stream/", "/stream/a/b/c/d", "/stats"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.post("/stream/Job/1")).status_code == 405


async def test_unix_socket_is_not_world_writable(gateway: Gateway) -> None:
    mode = stat.S_IMODE(os.stat(gateway.socket).st_mode)
    assert mode & 0o002 == 0, oct(mode)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/stream/Job/404", 404),  # unknown task
        ("/stream/Nope/1", 404),  # unknown model
        ("/stream/other/Job/1", 404),  # known model name, other app
        ("/stream/Report/1", 404),  # a name two apps share needs its app label
        ("/stream/Job/a:b", 400),
        ("/stream/Job/%7Bx%7D", 400),
        ("/stream/Job/" + "9" * 65, 400),
        ("/stream/Jo%20b/1", 400),
        ("/stream/Job/1%0A", 400),
    ],
)
async def test_bad_and_unknown_stream_paths(
    gateway: Gateway, redis: Redis, path: str, status: int
) -> None:
    await redis.hset("sc:{shop.Job:1}:state", "state", "pending")
    async with http(gateway) as client:
        response = await client.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/plain")
    assert "Traceback" not in response.text and "Error" not in response.text


MALFORMED_IDS = [
    "abc",
    "$",
    "+",
    "abc-$",
    "abc-+",
    "abc-0",
    "abc-01",
    "abc--1",
    " 1-1",
    "abc-1 ",
    "abc-9999999999999999",
    "x" * 65,
    "abc-1\t",
    "ABC-1",
    "abc-1-0",
    "é-1",
]


@pytest.mark.parametrize("raw", MALFORMED_IDS)
async def test_malformed_last_event_ids_get_400_and_never_reach_redis(
    gateway: Gateway, event_log: EventLog, redis: Redis, raw: str
) -> None:
    await publish(event_log, JOB, 3)
    before = await redis.info("commandstats")
    async with http(gateway) as client:
        by_query = await client.get("/stream/Job/1", params={"last_event_id": raw})
        # A header value cannot carry surrounding whitespace or non-ASCII (HTTP strips or refuses it).
        sendable = raw.isascii() and raw == raw.strip() and "\t" not in raw
        headers = (
            [await client.get("/stream/Job/1", headers={"Last-Event-ID": raw})] if sendable else []
        )
    for response in [by_query, *headers]:
        assert response.status_code == 400, raw
        assert response.headers["content-type"].startswith("text/plain")
        assert "event id" in response.text
    after = await redis.info("commandstats")
    for command in ("cmdstat_xrange", "cmdstat_hgetall", "cmdstat_xrevrange"):
        assert before.get(command) == after.get(command), command


# -- streaming -------------------------------------------------------------------------------


async def test_stream_headers_and_first_line_arrive_before_any_event(
    sse: Any, gateway: Gateway, event_log: EventLog
) -> None:
    await event_log.declare(JOB)
    client = await sse(gateway.socket, "/stream/Job/1")
    assert client.status == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    assert client.headers["cache-control"] == "no-store"
    assert client.headers["x-accel-buffering"] == "no"
    size = int(await asyncio.wait_for(client.reader.readline(), 5), 16)
    first = await client.reader.readexactly(size)
    assert first == b": stream open\nretry: 2000\n"


async def test_late_joiner_gets_history_then_live_events(
    sse: Any, gateway: Gateway, event_log: EventLog
) -> None:
    await publish(event_log, JOB, 50, complete=False)
    client = await sse(gateway.socket, "/stream/shop/Job/1")
    history = [await asyncio.wait_for(client.next_event(), 5) for _ in range(50)]
    await publish(event_log, JOB, 50, start=51)  # live, then complete
    rest = await asyncio.wait_for(client.events_until_end(), 10)
    events = history + rest
    assert [e.seq for e in events] == list(range(1, 102))  # type: ignore[union-attr]
    assert events[-1].event == "complete"  # type: ignore[union-attr]
    data = events[0].json()  # type: ignore[union-attr]
    assert (data["step"], data["_task_id"], data["_model"], data["_app"]) == (1, 1, "Job", "shop")
    assert "_timestamp" in data
    assert client.ended  # the response finished cleanly after the terminal event


async def test_resume_from_every_id_of_a_finished_stream(
    sse: Any, gateway: Gateway, event_log: EventLog
) -> None:
    ids = await publish(event_log, JOB, 199)  # 199 progress + complete = 200 events
    assert ids[-1].seq == 200
    for position in ids[:-1]:
        header = {"Last-Event-ID": str(position)}
        client = await sse(gateway.socket, "/stream/Job/1", header)
        events = await asyncio.wait_for(client.events_until_end(), 5)
        assert [e.seq for e in events] == list(range(position.seq + 1, 201)), position
    async with http(gateway) as plain:
        done = await plain.get(
            "/stream/Job/1", headers={"Last-Event-ID": str(ids[-1]), "Accept": "text/event-stream"}
        )
        assert done.status_code == 204  # nothing left: EventSource stops reconnecting
        by_query = await plain.get(
            "/stream/Job/1",
            params={"last_event_id": str(ids[150])},
            headers={"Accept": "text/event-stream"},
        )
    first_id = next(line for line in by_query.text.splitlines() if line.startswith("id:"))
    assert first_id == f"id: {ids[151]}"


async def test_resume_from_an_unknown_position_gets_reset_then_everything(
    sse: Any, gateway: Gateway, event_log: EventLog, redis: Redis
) -> None:
    ids = await publish(event_log, JOB, 9)
    cases = {
        "epoch": f"deadbeef-{ids[3].seq}",  # another incarnation of the stream
        "position": f"{ids[0].epoch}-{ids[-1].seq + 5}",  # past the end
    }
    for reason, last_id in cases.items():
        client = await sse(gateway.socket, "/stream/Job/1", {"Last-Event-ID": last_id})
        events = await asyncio.wait_for(client.events_until_end(), 5)
        assert events[0].event == "reset" and events[0].id is None
        assert events[0].json()["reason"] == reason
        assert [e.seq for e in events[1:]] == list(range(1, 11))


async def test_resume_into_trimmed_history_gets_reset(
    sse: Any, gateway_factory: Any, redis: Redis, redis_server: Any
) -> None:
    from streamcoord import Settings

    log = EventLog(redis, Settings(redis_url=redis_server.url, max_stream_length=20))
    ids = await publish(log, JOB, 59)
    gateway = gateway_factory()
    client = await sse(gateway.socket, "/stream/Job/1", {"Last-Event-ID": str(ids[4])})
    events = await asyncio.wait_for(client.events_until_end(), 5)
    assert events[0].event == "reset" and events[0].json()["reason"] == "trimmed"
    assert [e.seq for e in events[1:]] == list(range(41, 61))
    # Resuming inside what is retained needs no reset.
    client = await sse(gateway.socket, "/stream/Job/1", {"Last-Event-ID": str(ids[49])})
    assert [e.seq for e in await client.events_until_end()] == list(range(51, 61))


async def test_replay_latest_gives_the_latest_event_then_live(
    sse: Any, gateway: Gateway, event_log: EventLog
) -> None:
    await publish(event_log, JOB, 5, complete=False)
    client = await sse(gateway.socket, "/stream/Job/1?replay=latest")
    first = await asyncio.wait_for(client.next_event(), 5)
    assert first is not None and first.seq == 5
    await publish(event_log, JOB, 2, start=6)
    assert [e.seq for e in await asyncio.wait_for(client.events_until_end(), 5)] == [6, 7, 8]


async def test_completed_task_without_sse_accept_answers_json(
    gateway: Gateway, event_log: EventLog
) -> None:
    await publish(event_log, JOB, 3)
    async with http(gateway) as client:
        response = await client.get("/stream/Job/1", headers={"Accept": "application/json"})
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "completed" and body["final_value"] == {"total": 3}
    assert body["completed_at"].startswith("20")


async def test_heartbeats_arrive_on_an_idle_stream(
    sse: Any, gateway_factory: Any, event_log: EventLog
) -> None:
    gateway = gateway_factory(heartbeat_seconds=0.2)
    await event_log.declare(JOB)
    client = await sse(gateway.socket, "/stream/Job/1")
    waiter = asyncio.create_task(client.next_event())
    await wait_for_async(lambda: client.comments.count("heartbeat") >= 3, 5)
    waiter.cancel()


async def wait_for_async(predicate: Any, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


# -- many clients ----------------------------------------------------------------------------


async def test_500_clients_share_a_constant_number_of_redis_connections(
    sse: Any, gateway: Gateway, event_log: EventLog, redis: Redis
) -> None:
    await event_log.declare(JOB)
    one = await sse(gateway.socket, "/stream/Job/1")
    await wait_stats(gateway, "1 listener", lambda s: s["listeners"] == 1)
    with_one = gateway_redis_connections(await redis.client_list(), gateway.pid)
    clients = [one] + [await sse(gateway.socket, "/stream/Job/1") for _ in range(499)]
    await wait_stats(gateway, "500 listeners", lambda s: s["listeners"] == 500)
    ids = await publish(event_log, JOB, 20)
    with_500 = gateway_redis_connections(await redis.client_list(), gateway.pid)
    results = await asyncio.wait_for(asyncio.gather(*(c.events_until_end() for c in clients)), 30)
    assert 1 <= with_one == with_500 <= 4, (with_one, with_500)
    expected = [i.seq for i in ids]
    assert all([e.seq for e in events] == expected for events in results)


async def test_a_client_that_never_reads_is_cut_and_the_others_get_everything(
    sse: Any, gateway_factory: Any, event_log: EventLog
) -> None:
    gateway = gateway_factory(client_queue_size=100)
    await event_log.declare(JOB)
    stuck = await sse(
        gateway.socket, "/stream/Job/1", rcvbuf=4096, read_head=False
    )  # and never reads
    readers = [await sse(gateway.socket, "/stream/Job/1") for _ in range(3)]
    await wait_stats(gateway, "4 listeners", lambda s: s["listeners"] == 4)
    received = [asyncio.create_task(r.events_until_end()) for r in readers]
    writer = event_log.writer(JOB)
    for n in range(300):  # in bursts, so the hub reads them in many batches as live traffic
        await writer.append("progress", {"n": n, "pad": "x" * 4000})
        if n % 10 == 9:
            await asyncio.sleep(0.01)
    await writer.append("complete", {})
    results = await asyncio.wait_for(asyncio.gather(*received), 30)
    assert [[e.seq for e in events] for events in results] == [list(range(1, 302))] * 3
    after = await wait_stats(gateway, "the stuck client cut", lambda s: s["listeners"] == 0, within=15)
    assert after["closed_overflow"] == 1
    # The connection is gone, not just the listener: reading now reaches its end (or a reset).
    with contextlib.suppress(ConnectionResetError):
        while await asyncio.wait_for(stuck.reader.read(1 << 20), 10):
            pass


async def test_disconnected_clients_free_their_listeners(
    sse: Any, gateway: Gateway, event_log: EventLog
) -> None:
    await event_log.declare(JOB)
    await event_log.declare(TaskRef("shop", "Job", "2"))
    clients = [await sse(gateway.socket, f"/stream/Job/{1 + n % 2}") for n in range(20)]
    await wait_stats(gateway, "20 listeners", lambda s: s["listeners"] == 20 and s["streams"] == 2)
    for client in clients:
        client.close()
    final = await wait_stats(
        gateway, "no listeners", lambda s: s["listeners"] == 0 and s["streams"] == 0
    )
    assert final["client_left"] == 20


async def test_sigterm_ends_open_streams_cleanly(
    sse: Any, gateway: Gateway, event_log: EventLog
) -> None:
    await event_log.declare(JOB)
    clients = [await sse(gateway.socket, "/stream/Job/1") for _ in range(5)]
    await wait_stats(gateway, "5 listeners", lambda s: s["listeners"] == 5)
    gateway.process.send_signal(signal.SIGTERM)
    ends = await asyncio.wait_for(asyncio.gather(*(c.events_until_end() for c in clients)), 10)
    assert ends == [[]] * 5
    assert all(c.ended for c in clients)
    assert await asyncio.to_thread(gateway.process.wait, 10) == 0


async def test_gateway_log_has_no_tracebacks(gateway: Gateway, event_log: EventLog) -> None:
    await publish(event_log, JOB, 2)
    async with http(gateway) as client:
        await client.get("/stream/Job/1", headers={"Last-Event-ID": "bad"})
        await client.get("/stream/Job/1")
    assert "Traceback" not in gateway.log_text()


def test_socket_paths_are_private_to_the_test(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.socket.parent == tmp_path


async def test_clients_keep_their_place_when_the_gateway_loses_redis(
    sse: Any, gateway: Gateway, event_log: EventLog, redis: Redis
) -> None:
    await publish(event_log, JOB, 5, complete=False)
    client = await sse(gateway.socket, "/stream/Job/1")
    first = [await asyncio.wait_for(client.next_event(), 5) for _ in range(5)]
    killed = 0
    for entry in await redis.client_list():
        if entry["name"].endswith(f":{gateway.pid}"):
            killed += await redis.client_kill_filter(_id=entry["id"])
    assert killed >= 1
    await publish(event_log, JOB, 5, start=6)
    rest = await asyncio.wait_for(client.events_until_end(), 15)
    assert [e.seq for e in first + rest] == list(range(1, 12))  # type: ignore[union-attr]
    assert gateway_redis_connections(await redis.client_list(), gateway.pid) >= 1


async def test_a_stream_lost_in_a_redis_restart_resets_its_clients(
    sse: Any, tmp_path: Path, gateway_factory: Any
) -> None:
    """Redis restarts without persistence mid-task: the writer starts a new epoch, and the
    connected client gets `reset` and the new stream, never a silent gap or a hang."""
    from streamcoord import Settings
    from streamcoord.keys import KeySpace
    from streamcoord.registry import register_models

    from .processes import RedisServer, start_gateway

    server = RedisServer(tmp_path / "volatile").start()
    client_redis = Redis(unix_socket_path=str(server.socket))
    gateway = start_gateway(tmp_path, server.url, "volatile-gw")
    try:
        await register_models(client_redis, KeySpace("sc"), [("shop", "Job")])
        log = EventLog(client_redis, Settings(redis_url=server.url))
        writer = log.writer(JOB)
        before = [await writer.append("progress", {"n": n}) for n in range(5)]
        stream = await sse(gateway.socket, "/stream/Job/1")
        seen = [await asyncio.wait_for(stream.next_event(), 5) for _ in range(5)]
        server.stop()
        server.start()  # empty: nothing was persisted
        await register_models(client_redis, KeySpace("sc"), [("shop", "Job")])
        after = [await writer.append("progress", {"n": 5}), await writer.append("complete", {})]
        rest = await asyncio.wait_for(stream.events_until_end(), 20)
    finally:
        gateway.stop()
        await client_redis.aclose()
        server.stop()
    assert [e.seq for e in seen] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
    assert after[0].epoch != before[0].epoch and [a.seq for a in after] == [1, 2]
    assert rest[0].event == "reset" and rest[0].json()["reason"] == "lost"
    assert [(e.id, e.event) for e in rest[1:]] == [(str(after[0]), "progress"), (str(after[1]), "complete")]


async def test_a_reconnect_storm_is_served_exactly_with_one_read_then_from_memory(
    sse: Any, gateway: Gateway, event_log: EventLog
) -> None:
    """200 clients reconnect at once with ids anywhere in a 300-event history while the task
    goes on: each gets exactly what it missed, and the gateway reads the history from Redis far
    fewer times than it has clients (one read shared). Clients that come once the stream is
    followed are served from the gateway's window of recent events."""
    ids = await publish(event_log, JOB, 300, complete=False)
    storm = [ids[n * 3 % 300] for n in range(200)]
    opening = [sse(gateway.socket, "/stream/Job/1", {"Last-Event-ID": str(i)}) for i in storm]
    clients = await asyncio.wait_for(asyncio.gather(*opening), 30)
    await wait_stats(gateway, "200 listeners", lambda s: s["listeners"] == 200)
    storm_counters = await stats(gateway)
    ids += await publish(event_log, JOB, 10, complete=False, start=301)
    # The later clients resume up to event 301, which the window holds once the hub read it.
    await wait_stats(gateway, "the hub to read events 301-310", lambda s: s.get("events", 0) >= 10)
    later = [ids[n] for n in range(100, 310, 10)]
    clients += [await sse(gateway.socket, "/stream/Job/1", {"Last-Event-ID": str(i)}) for i in later]
    await publish(event_log, JOB, 0, start=311)  # complete: event 311
    results = await asyncio.wait_for(asyncio.gather(*(c.events_until_end() for c in clients)), 30)
    for last, events in zip(storm + later, results, strict=True):
        assert [e.seq for e in events] == list(range(last.seq + 1, 312)), last
    # Each storm client read history itself, shared another's read, or (when it came after the
    # first one had made the hub follow the stream, which a busy machine makes likely) started
    # from the window that read seeded.
    reads, shared = storm_counters.get("history_reads", 0), storm_counters.get("history_shared", 0)
    storm_hits = storm_counters.get("window_hits", 0)
    assert reads + shared + storm_hits == 200 and reads < 100, storm_counters
    counters = await stats(gateway)
    assert counters.get("window_hits", 0) == storm_hits + len(later), counters
    assert counters["history_reads"] == reads, counters


async def test_an_expired_stream_answers_reset_then_the_outcome_not_204(
    sse: Any, gateway: Gateway, event_log: EventLog, redis: Redis
) -> None:
    """The stream's TTL ran out before the state record's: a client still learns the outcome."""
    ids = await publish(event_log, JOB, 3)
    await redis.delete(event_log.keys.events(JOB))
    for headers in ({}, {"Last-Event-ID": str(ids[1])}):
        client = await sse(gateway.socket, "/stream/Job/1", headers)
        events = await asyncio.wait_for(client.events_until_end(), 5)
        assert [e.event for e in events] == ["reset", "complete"], headers
        assert events[0].json()["reason"] in ("expired", "trimmed")
        assert events[1].id == str(ids[-1]) and events[1].json()["message"] == "done"
    async with http(gateway) as plain:
        done = await plain.get(
            "/stream/Job/1", headers={"Last-Event-ID": str(ids[-1]), "Accept": "text/event-stream"}
        )
    assert done.status_code == 204  # it has the outcome already
