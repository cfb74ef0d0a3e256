"""The multiplexed connection's own logic, without Redis: its composite position and the merged,
bounded queue of its tasks' batches (streamcoord.mux)."""

from __future__ import annotations

import asyncio

import pytest

from streamcoord.codec import Frame
from streamcoord.errors import InvalidTaskRef
from streamcoord.ids import EventId, parse_composite_id, task_tag
from streamcoord.keys import TaskRef
from streamcoord.listener import HEARTBEAT, Batch, make_batch
from streamcoord.mux import Composite, Confluence, Tributary, requested_tasks

TAGS = [task_tag("shop.Job:1"), task_tag("shop.Job:2"), task_tag("shop.Job:3")]


def frame(seq: int, epoch: bytes = b"e1", terminal: bool = False) -> Frame:
    kind = b"complete" if terminal else b"progress"
    return Frame(seq, epoch, terminal, b"id: %s-%d\nevent: %s\ndata: {}\n\n" % (epoch, seq, kind))


def ids_of(data: bytes) -> list[str]:
    return [line[4:].decode() for line in data.split(b"\n") if line.startswith(b"id: ")]


def test_the_composite_starts_from_the_clients_id_and_moves_task_by_task() -> None:
    composite = Composite(TAGS, {TAGS[1]: EventId("ab", 4)})
    assert str(composite) == f"{TAGS[1]}-ab-4"
    first = composite.rewriter(0)(frame(1).data)
    assert first.endswith(b"\nevent: progress\ndata: {}\n\n")
    assert ids_of(first) == [f"{TAGS[0]}-e1-1.{TAGS[1]}-ab-4"]  # in the request's order
    composite.rewriter(1)(frame(5, b"ab").data)
    composite.rewriter(2)(frame(1, b"zz").data)
    assert parse_composite_id(str(composite), 3) == {
        TAGS[0]: EventId("e1", 1), TAGS[1]: EventId("ab", 5), TAGS[2]: EventId("zz", 1),
    }


def test_frames_written_directly_give_each_its_own_position_and_can_be_undone() -> None:
    composite = Composite(TAGS, {})
    data, before = composite.frames(2, [frame(1), frame(2)])
    assert ids_of(data) == [f"{TAGS[2]}-e1-1", f"{TAGS[2]}-e1-2"]
    composite.undo(2, before)  # not written after all: the position is the client's again
    assert str(composite) == ""


async def test_batches_of_all_tasks_come_out_in_the_order_they_went_in() -> None:
    confluence = Confluence(limit=100, limit_bytes=10**6)
    listeners = [Tributary(b"k%d" % n, confluence, n) for n in range(3)]
    listeners[2].push(make_batch([frame(1)]))
    listeners[0].push(make_batch([frame(1), frame(2)]))
    listeners[2].push(make_batch([frame(2)]))
    taken = await asyncio.wait_for(confluence.take(), 1)
    assert [(index, batch.first) for index, batch in taken] == [(2, 1), (0, 1), (2, 2)]
    assert (confluence.pending, confluence.pending_bytes) == (0, 0)


async def test_one_heartbeat_for_the_connection_not_one_per_task() -> None:
    confluence = Confluence(limit=100, limit_bytes=10**6)
    for n in range(20):
        Tributary(b"k%d" % n, confluence, n).push(HEARTBEAT)
    assert [batch for _, batch in await asyncio.wait_for(confluence.take(), 1)] == [HEARTBEAT]


async def test_a_connection_that_falls_behind_is_cut_as_a_whole() -> None:
    confluence = Confluence(limit=3, limit_bytes=10**6)
    writer = asyncio.create_task(asyncio.sleep(60))
    confluence.task = writer
    tasks = [Tributary(b"k%d" % n, confluence, n) for n in range(2)]
    for seq in range(1, 5):
        tasks[seq % 2].push(make_batch([frame(seq)]))
    await asyncio.sleep(0)
    assert confluence.closed == "overflow" and not confluence.over_bytes
    assert writer.cancelled()
    assert await confluence.take() == []


async def test_held_history_counts_against_the_connections_bytes() -> None:
    confluence = Confluence(limit=100, limit_bytes=100)
    task = Tributary(b"k", confluence, 0)
    task.hold(90)
    task.push(make_batch([frame(1)]))  # 90 + this batch: still under, at the check
    task.push(make_batch([frame(2)]))  # past the bound in bytes: cut
    assert confluence.closed == "overflow" and confluence.over_bytes


async def test_the_hub_letting_go_of_one_task_leaves_the_connection_open() -> None:
    confluence = Confluence(limit=100, limit_bytes=10**6)
    one, other = Tributary(b"a", confluence, 0), Tributary(b"b", confluence, 1)
    one.close("unsubscribed")  # its task ended: the others go on
    assert confluence.closed is None
    other.close("shutdown")  # the gateway stops: the whole connection ends, and resumes elsewhere
    assert confluence.closed == "shutdown"
    assert await asyncio.wait_for(confluence.take(), 1) == []


async def test_a_waiting_writer_is_handed_batches_directly_in_order() -> None:
    confluence = Confluence(limit=100, limit_bytes=10**6)
    written: list[tuple[int, int]] = []
    refuse = {"next": True}

    def direct(item: tuple[int, Batch]) -> bool:
        index, batch = item
        if refuse["next"]:
            refuse["next"] = False
            return False  # e.g. the transport paused: queued instead
        written.append((index, batch.first))
        return True

    confluence.direct = direct
    waiting = asyncio.create_task(confluence.take())
    await asyncio.sleep(0)  # parked in take()
    listener = Tributary(b"k", confluence, 1)
    listener.push(make_batch([frame(1)]))  # refused: queued, the writer woken
    listener.push(make_batch([frame(2)]))  # the queued one first, then this one, directly
    assert written == [(1, 1), (1, 2)]
    assert confluence.batches == []
    confluence.close("shutdown")
    assert await asyncio.wait_for(waiting, 1) == []


@pytest.mark.parametrize("count", [1, 20, 100])
def test_the_id_length_the_readme_gives(count: int) -> None:
    """README: 22 characters per task sent events (a 7-character tag, an 8-digit epoch, a
    sequence of 4 digits, 3 separators), so 2.2 KB at 100 tasks."""
    tags = [task_tag(f"shop.Job:{n}") for n in range(count)]
    composite = Composite(tags, {tag: EventId("3f9a02bc", 9999) for tag in tags})
    assert len(str(composite)) == count * 22 - 1


def test_requested_tasks_are_named_once_each_in_order() -> None:
    assert requested_tasks(["shop.Job:2", "shop.Job:1", "shop.Job:2"], 2) == [
        TaskRef("shop", "Job", "2"), TaskRef("shop", "Job", "1"),
    ]


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        ([], "name the tasks to follow"),
        ([f"shop.Job:{n}" for n in range(4)], "at most 3 tasks, not 4"),
        (["shop.Job"], "expected app.Model:pk"),
        (["shop.Job:a b"], "invalid task id"),
        (["x" * 5000], "too long for a task name"),
    ],
)
def test_requested_tasks_refused_with_a_plain_reason(names: list[str], reason: str) -> None:
    with pytest.raises(InvalidTaskRef, match=reason) as refused:
        requested_tasks(names, 3)
    assert len(str(refused.value)) < 300
