"""Live batches written straight to a waiting client's connection (streamcoord/direct.py): only
when that keeps every event once and in order, and the connection takes it without waiting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from streamcoord.codec import Frame
from streamcoord.direct import DirectWriter
from streamcoord.listener import HEARTBEAT, REWIND, Batch, Listener, make_batch


@dataclass
class FakeTransport:
    closing: bool = False
    chunks: list[bytes] = field(default_factory=list)

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


@dataclass
class FakeFlow:
    write_paused: bool = False


@dataclass
class FakeCycle:
    """The attributes of uvicorn's response cycle the writer reads."""

    transport: FakeTransport = field(default_factory=FakeTransport)
    flow: FakeFlow = field(default_factory=FakeFlow)
    chunked_encoding: bool | None = True
    disconnected: bool = False
    response_complete: bool = False

    async def send(self, message: Any) -> None:  # what the writer is found from
        pass


@dataclass
class Place:
    last: int = 3
    epoch: bytes = b"e1"

    def follows(self, batch: Batch) -> bool:
        return batch.epoch == self.epoch and batch.first == self.last + 1 and not batch.terminal

    def sent(self, batch: Batch) -> None:
        self.last = batch.last


@dataclass
class Stall:
    written: int = 0


def events(first: int, last: int, epoch: bytes = b"e1", terminal_last: bool = False) -> Batch:
    return make_batch([
        Frame(n, epoch, terminal_last and n == last, b"id: %s-%d\ndata: {}\n\n" % (epoch, n))
        for n in range(first, last + 1)
    ])


def writer(cycle: FakeCycle | None = None) -> tuple[DirectWriter, FakeCycle, Place, Stall]:
    cycle = cycle or FakeCycle()
    place, stall = Place(), Stall()
    direct = DirectWriter.of(cycle.send, place, stall)
    assert direct is not None
    return direct, cycle, place, stall


def test_events_in_step_go_out_as_one_chunk_and_move_the_client_on() -> None:
    direct, cycle, place, stall = writer()
    batch = events(4, 5)
    assert direct(batch)
    assert cycle.transport.chunks == [b"%x\r\n%s\r\n" % (len(batch.data), batch.data)]
    assert (place.last, stall.written) == (5, len(batch.data))
    assert direct(HEARTBEAT)  # heartbeats too, and they move nothing
    assert place.last == 5 and stall.written == len(batch.data) + len(HEARTBEAT.data)


@pytest.mark.parametrize("batch", [
    events(5, 6),  # a gap: the feed reads it from Redis first
    events(4, 5, epoch=b"e2"),  # another epoch: the client is reset first
    events(4, 5, terminal_last=True),  # the end: the task ends the response
    REWIND,
], ids=["gap", "epoch", "terminal", "rewind"])
def test_what_the_feed_must_look_at_goes_the_usual_way(batch: Batch) -> None:
    direct, cycle, place, stall = writer()
    assert not direct(batch)
    assert (cycle.transport.chunks, place.last, stall.written) == ([], 3, 0)


@pytest.mark.parametrize("state", [
    {"flow": FakeFlow(write_paused=True)}, {"disconnected": True}, {"response_complete": True},
    {"chunked_encoding": False}, {"transport": FakeTransport(closing=True)},
], ids=["paused", "disconnected", "complete", "not chunked", "closing"])
def test_a_connection_that_cannot_take_it_now_gets_nothing_directly(state: dict[str, Any]) -> None:
    direct, cycle, place, _ = writer(FakeCycle(**state))
    assert not direct(events(4, 4)) and not direct(HEARTBEAT)
    assert cycle.transport.chunks == [] and place.last == 3


def test_another_server_has_no_direct_writer() -> None:
    async def send(message: Any) -> None:
        pass

    assert DirectWriter.of(send, Place(), Stall()) is None


async def test_a_listener_writes_directly_only_while_its_task_waits_with_nothing_queued() -> None:
    direct, cycle, place, _ = writer()
    listener = Listener(b"k", limit=10)
    listener.direct = direct
    listener.push(events(4, 4))  # nobody waits in take(): queued
    assert len(listener.batches) == 1 and not cycle.transport.chunks
    taken = await listener.take()
    place.sent(taken[0])
    waiting = asyncio.ensure_future(listener.take())
    await asyncio.sleep(0)  # parked in take()
    listener.push(events(5, 5))
    assert not waiting.done() and len(cycle.transport.chunks) == 1 and place.last == 5
    listener.push(events(7, 7))  # out of step: queued, and the task woken
    listener.push(events(6, 6))  # in step, but behind a queued batch: queued too (order)
    assert [b.first for b in await asyncio.wait_for(waiting, 1)] == [7, 6]
    assert len(cycle.transport.chunks) == 1


async def test_batches_queued_for_a_woken_task_that_has_not_run_go_out_directly_in_order() -> None:
    """A busy loop: the task was woken for a batch it could not be written directly (the
    connection paused) and has not run yet; once the connection takes bytes again, the next
    push writes the queued batch, then its own, and the task finds nothing and waits on."""
    direct, cycle, place, _ = writer()
    listener = Listener(b"k", limit=10)
    listener.direct = direct
    waiting = asyncio.ensure_future(listener.take())
    await asyncio.sleep(0)
    cycle.flow.write_paused = True
    listener.push(events(4, 4))  # queued, the task woken (not run yet)
    assert len(listener.batches) == 1 and not cycle.transport.chunks
    cycle.flow.write_paused = False
    listener.push(events(5, 5))
    assert not listener.batches and listener.pending == 0 and listener.pending_bytes == 0
    assert [c.split(b"\r\n")[1].split(b"\n")[0] for c in cycle.transport.chunks] == [b"id: e1-4", b"id: e1-5"]
    assert place.last == 5
    await asyncio.sleep(0)
    assert not waiting.done()  # it found nothing and waits again
    listener.close("test")
    assert await asyncio.wait_for(waiting, 1) == []
