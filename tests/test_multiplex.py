"""Many tasks on one connection (``GET /streams``), against real gateway subprocesses and a
real redis-server: history then live events of every task, composite ids, exact resume of every
task through two gateways with the connection cut again and again, and the clear 4xx answers."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.client import StreamClientError, TaskEvent, stream_tasks, streams_path
from streamcoord.ids import parse_composite_id, task_tag
from streamcoord.tokens import mint

from .processes import Gateway
from .workloads import Tally, read_until

pytestmark = pytest.mark.system

SECRET = "s" * 40


def refs(count: int, model: str = "Job") -> list[TaskRef]:
    return [TaskRef("shop", model, str(n)) for n in range(1, count + 1)]


def http(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(gateway.socket)), base_url="http://gateway", timeout=20
    )


async def publish_all(
    log: EventLog, tasks: list[TaskRef], events: int, *, pause: float = 0.0, start: int = 1, end: bool = True
) -> None:
    """Progress events ``start``..``events`` to every task, interleaved, then (``end``) a
    ``complete`` each."""
    writers = [log.writer(ref) for ref in tasks]
    for step in range(start, events + 1):
        for writer in writers:
            await writer.append("progress", {"step": step})
        if pause:
            await asyncio.sleep(pause)
    for writer in writers if end else ():
        await writer.append("complete", {"done": True}, final_value=events)


async def test_history_then_live_with_composite_ids_and_the_end(event_log: EventLog, gateway: Gateway) -> None:
    tasks = refs(3)
    for ref in tasks:
        await event_log.writer(ref).append("progress", {"step": 1})
    got: list[Any] = []

    async def follow() -> None:
        got.extend((await read_until(gateway, streams_path(tasks), {}, None))[0])

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    for ref in tasks:
        await event_log.writer(ref).append("complete", {"done": True}, final_value=1)
    await asyncio.wait_for(reader, 20)  # the response ends once every task has ended
    tally = Tally(tasks)
    tally.take(got)
    assert tally.problems({ref.label: 2 for ref in tasks}) == []
    assert [event_type for _, event_type, _ in got].count("complete") == 3
    final = parse_composite_id(got[-1][0], 100)
    assert {tag: pos.seq for tag, pos in final.items()} == {task_tag(ref.label): 2 for ref in tasks}
    # Reconnecting with the last id: every task has its terminal event, nothing is left (204).
    async with http(gateway) as client:
        again = await client.get(streams_path(tasks), headers={"Last-Event-ID": got[-1][0]})
        assert again.status_code == 204


async def test_a_task_that_ends_early_stops_and_the_others_go_on(event_log: EventLog, gateway: Gateway) -> None:
    tasks = refs(2)
    await publish_all(event_log, tasks[:1], 2)
    await event_log.writer(tasks[1]).append("progress", {"step": 1})
    got: list[Any] = []

    async def follow() -> None:
        got.extend((await read_until(gateway, streams_path(tasks), {}, None))[0])

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    assert not reader.done()  # task 1 ended; task 2 has not
    await event_log.writer(tasks[1]).append("complete", {"done": True}, final_value=1)
    await asyncio.wait_for(reader, 20)
    tally = Tally(tasks)
    tally.take(got)
    assert tally.problems({tasks[0].label: 3, tasks[1].label: 2}) == []


async def test_100_tasks_cut_20_times_through_two_gateways_each_task_exact(
    event_log: EventLog, gateway_factory: Any
) -> None:
    """The issue's test: 100 tasks on one connection, alternately through two gateways, cut at a
    random point 20 times while the tasks go on; every task gets 1..N exactly once."""
    gateways = [gateway_factory(), gateway_factory()]
    tasks = refs(100)
    events = 30
    for ref in tasks:  # some history before the first connection
        await event_log.writer(ref).append("progress", {"step": 0})
    writing = asyncio.create_task(publish_all(event_log, tasks, events - 1, pause=0.02))
    tally = Tally(tasks)
    rng = random.Random(15)
    path = streams_path(tasks)
    for cut in range(20):
        headers = {"Last-Event-ID": tally.last_id} if tally.last_id else {}
        got, ended = await asyncio.wait_for(
            read_until(gateways[cut % 2], path, headers, rng.randint(1, 250)), 30
        )
        assert not ended, f"the stream ended at cut {cut}: make the tasks longer"
        tally.take(got)
    await asyncio.wait_for(writing, 60)
    headers = {"Last-Event-ID": tally.last_id}
    got, ended = await asyncio.wait_for(read_until(gateways[0], path, headers, None), 60)
    tally.take(got)
    assert ended and tally.ended == {ref.label for ref in tasks}
    assert tally.resets == []
    assert tally.problems({ref.label: events + 1 for ref in tasks}) == []
    assert len(tally.last_id) < 100 * 24  # what the README says of its length at 100 tasks


async def test_the_python_client_follows_many_tasks_and_resumes_by_itself(
    event_log: EventLog, gateway: Gateway
) -> None:
    tasks = refs(5)
    await publish_all(event_log, tasks, 1, end=False)  # every task exists before any client
    writing = asyncio.create_task(publish_all(event_log, tasks, 20, pause=0.01, start=2))
    got: list[TaskEvent] = []
    # A first connection taken over by a second one, from the first's composite id.
    async with contextlib.aclosing(stream_tasks("http://gateway", tasks[:3], uds=str(gateway.socket))) as events:
        async for event in events:  # (closed in this task when the loop breaks)
            got.append(event)
            if len(got) == 10:
                break
    first = got[-1].id
    async for event in stream_tasks(
        "http://gateway", tasks, uds=str(gateway.socket), last_event_id=first, reconnect_delay=0.05
    ):
        got.append(event)
    await writing
    seqs: dict[str, list[int | None]] = {}
    for event in got:
        seqs.setdefault(event.task, []).append(event.seq)
    assert seqs == {ref.label: list(range(1, 22)) for ref in tasks}


async def test_a_gateway_restart_mid_stream_loses_nothing(
    event_log: EventLog, gateway_factory: Any, tmp_path: Path
) -> None:
    tasks = refs(10)
    first, second = gateway_factory(), gateway_factory()
    await publish_all(event_log, tasks, 1, end=False)  # every task exists before any client
    writing = asyncio.create_task(publish_all(event_log, tasks, 40, pause=0.02, start=2))
    tally = Tally(tasks)
    got, _ = await asyncio.wait_for(read_until(first, streams_path(tasks), {}, 50), 30)
    tally.take(got)
    first.stop()  # the client moves to the other gateway, as behind a load balancer
    await writing
    got, ended = await asyncio.wait_for(
        read_until(second, streams_path(tasks), {"Last-Event-ID": tally.last_id}, None), 30
    )
    tally.take(got)
    assert ended and tally.problems({ref.label: 41 for ref in tasks}) == []


# -- refusals --------------------------------------------------------------------------------


@pytest.fixture
def token_gateway(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory(stream_auth="token", secret=SECRET)
    return gateway


def token(*tasks: TaskRef) -> str:
    return mint(SECRET, tasks, expires_in=600)


async def status_of(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with http(gateway) as client:
        response = await client.get(path, headers=headers or {})
        return response.status_code, response.text


async def test_a_token_must_cover_every_task(event_log: EventLog, token_gateway: Gateway) -> None:
    tasks = refs(3)
    await publish_all(event_log, tasks, 1)
    path = streams_path(tasks)
    assert (await status_of(token_gateway, path))[0] == 401
    status, message = await status_of(token_gateway, f"{path}&token={token(*tasks[:2])}")
    assert (status, message) == (403, "this stream token does not grant this stream (shop.Job:3)")
    got, ended = await read_until(token_gateway, f"{path}&token={token(*tasks)}", {}, None)
    assert ended and len(got) == 6
    bearer = {"Authorization": f"Bearer {token(*tasks)}"}
    assert (await read_until(token_gateway, path, bearer, None))[1]


async def test_bad_requests_get_a_clear_4xx_before_any_stream(event_log: EventLog, gateway: Gateway) -> None:
    tasks = refs(3)
    await publish_all(event_log, tasks, 1)
    path = streams_path(tasks)
    other = TaskRef("shop", "Job", "99")
    outsider = f"{task_tag(other.label)}-3f9a02bc-1"
    cases = {
        "/streams": "name the tasks to follow",
        streams_path(refs(101)): "at most 100 tasks, not 101",
        "/streams?task=shop.Job": "invalid task label",
        "/streams?task=shop.Job:1%7B": "invalid task id",
        f"{path}&last_event_id=nonsense": "<tag>-<epoch>-<sequence> per task",
        f"{path}&last_event_id={outsider}": "names a task this request does not follow",
        f"{path}&last_event_id={task_tag(tasks[0].label)}-ab-1.{task_tag(tasks[0].label)}-ab-2": "twice",
        "/streams?task=shop.Nope:1": "unknown model",
        streams_path([*tasks, other]): "unknown task shop.Job:99",
    }
    for request, message in cases.items():
        status, text = await status_of(gateway, request)
        assert status in (400, 404) and message in text, (request, status, text)
        assert "Traceback" not in text
    status, text = await status_of(gateway, path, {"Last-Event-ID": "x" * 5000})
    assert status == 400 and "longer than" in text
    async with http(gateway) as client:
        assert (await client.post(path)).status_code == 405


async def test_the_limit_is_a_setting(event_log: EventLog, gateway_factory: Any) -> None:
    gateway = gateway_factory(max_tasks_per_stream=2)
    status, text = await status_of(gateway, streams_path(refs(3)))
    assert status == 400 and "at most 2 tasks, not 3" in text and "STREAMCOORD_MAX_TASKS_PER_STREAM" in text


async def test_the_python_client_raises_on_a_refusal(event_log: EventLog, token_gateway: Gateway) -> None:
    tasks = refs(2)
    await publish_all(event_log, tasks, 1)
    with pytest.raises(StreamClientError) as refused:
        async for _ in stream_tasks("http://gateway", tasks, uds=str(token_gateway.socket), token=token(tasks[0])):
            pass
    assert refused.value.status == 403


async def test_a_slow_multiplexed_client_is_cut_and_resumes(
    event_log: EventLog, gateway_factory: Any, redis: Redis
) -> None:
    """One queue per connection, bounded like a single client's: a client that stops reading
    while its tasks go on is cut; it resumes every task from its composite id."""
    gateway = gateway_factory(client_queue_size=50, write_stall_seconds=2)
    tasks = refs(4)
    for ref in tasks:
        await event_log.writer(ref).append("progress", {"step": 0, "pad": "x" * 2000})
    tally = Tally(tasks)
    reader, writer = await asyncio.open_unix_connection(str(gateway.socket))
    writer.write(f"GET {streams_path(tasks)} HTTP/1.1\r\nHost: g\r\n\r\n".encode())
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    for step in range(1, 400):  # never read again: the gateway's bounds cut it
        for ref in tasks:
            await event_log.writer(ref).append("progress", {"step": step, "pad": "x" * 2000})
    for ref in tasks:
        await event_log.writer(ref).append("complete", {"done": True}, final_value=1)

    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket)), base_url="http://gateway", timeout=10
    ) as admin:
        for _ in range(300):  # the queue's bound, or the stall timer, cuts it
            stats = (await admin.get("/stats")).json()
            if stats.get("closed_overflow", 0) + stats.get("closed_stall", 0) >= 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the slow client was never cut: {stats}")
    writer.close()
    got, ended = await asyncio.wait_for(read_until(gateway, streams_path(tasks), {}, None), 60)
    tally.take(got)
    assert ended and tally.problems({ref.label: 401 for ref in tasks}) == []


async def test_a_start_granting_token_starts_every_pending_task_it_follows(project: Any, redis: Redis) -> None:
    """The predecessor's lazy start, on a multiplexed connection: the first client of created
    tasks starts them (a token without ``start`` only watches)."""
    settings = {"stream_auth": "token", "secret": SECRET}
    gateway = project.gateway(**settings)
    project.worker(**settings)
    created = [project.create_task("ProgressTask", "steps=3", "delay=0.01", secret=SECRET) for _ in range(3)]
    tasks = [TaskRef(c["app_label"], c["model"], str(c["id"])) for c in created]
    path = streams_path(tasks)
    async with http(gateway) as client:  # a watcher's token starts nothing
        head = await client.head(f"{path}&token={mint(SECRET, tasks, expires_in=60)}")
    assert head.status_code == 200
    assert await redis.xlen("sc:jobs") == 0
    starter = mint(SECRET, tasks, expires_in=60, start=True)
    got, ended = await asyncio.wait_for(read_until(gateway, f"{path}&token={starter}", {}, None), 60)
    tally = Tally(tasks)
    tally.take(got)
    assert ended and tally.ended == {ref.label for ref in tasks}
    assert all(seqs and seqs == list(range(1, len(seqs) + 1)) for seqs in tally.seqs.values())


async def test_tasks_are_named_in_any_case_once_and_tagged_by_their_own_names(
    event_log: EventLog, gateway: Gateway
) -> None:
    tasks = refs(2)
    await publish_all(event_log, tasks, 1)
    path = "/streams?task=SHOP.job:1&task=shop.Job:1&task=shop.JOB:2"
    got, ended = await asyncio.wait_for(read_until(gateway, path, {}, None), 20)
    tally = Tally(tasks)  # tags of shop.Job:1 and shop.Job:2, as the events name them
    tally.take(got)
    assert ended and tally.problems({ref.label: 2 for ref in tasks}) == []


async def test_tasks_whose_tags_collide_get_a_400_naming_them(event_log: EventLog, gateway: Gateway) -> None:
    """Two pairs of tasks whose FNV-1a tags collide (found by brute force: 32 bits are few)."""
    colliding = [TaskRef("shop", "Job", pk) for pk in ("449599", "612382", "449598", "612383")]
    assert task_tag(colliding[0].label) == task_tag(colliding[1].label)
    status, text = await status_of(gateway, streams_path(colliding))
    assert (status, text) == (
        400, "tasks shop.Job:449599 and shop.Job:612382 cannot share one connection (their tags in"
        " event ids are the same): follow them on two",
    )


async def test_the_python_client_ends_when_tasks_ended_before_it_came(event_log: EventLog, gateway: Gateway) -> None:
    """Resuming from an id that holds one task's terminal event already: the other ends, the
    response ends, and the client asks once more (204), without counting it a failure."""
    tasks = refs(2)
    await publish_all(event_log, tasks[:1], 1)  # task 1 ends: complete is its event 2
    await event_log.writer(tasks[1]).append("progress", {"step": 1})
    first = [e async for e in stream_tasks("http://gateway", tasks[:1], uds=str(gateway.socket))]
    assert [e.seq for e in first] == [1, 2] and first[-1].terminal
    follow = asyncio.create_task(_collect(stream_tasks(
        "http://gateway", ["shop.job:2", "shop.Job:1"], uds=str(gateway.socket), last_event_id=first[-1].id,
        max_reconnects=0,
    )))
    await asyncio.sleep(0.3)
    await event_log.writer(tasks[1]).append("complete", {"done": True}, final_value=1)
    got = await asyncio.wait_for(follow, 20)
    # Another spelling of a task's name: its events still say their sequence.
    assert [(e.task, e.seq) for e in got] == [("shop.Job:2", 1), ("shop.Job:2", 2)]


async def _collect(events: Any) -> list[TaskEvent]:
    return [event async for event in events]
