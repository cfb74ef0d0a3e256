"""streamcoord.client against real gateway subprocesses and a real redis-server.

Connections are cut with a small unix-socket proxy in front of the gateway: it records every
request head (to see the Last-Event-ID a reconnect carries), can abort every connection at once,
can answer 503 before forwarding, and can switch to another gateway (a load balancer's view).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamcoord import EventLog, TaskRef
from streamcoord.client import (
    StreamClientError,
    StreamEvent,
    iter_task_events,
    stream_task,
    task_path,
)
from streamcoord.errors import StreamcoordError
from streamcoord.ids import EventId
from streamcoord.resets import ResetReason

from .processes import Gateway

pytestmark = pytest.mark.system

JOB = TaskRef("shop", "Job", "1")
BASE = "http://gateway"
FAST = 0.05  # reconnect delay in these tests (seconds)


class Proxy:
    """Forwards unix-socket connections to ``upstream``; records what clients send."""

    def __init__(self, path: Path, upstream: Path, *, fail_first: int = 0) -> None:
        self.path = path
        self.upstream = upstream
        self.fail_first = fail_first  # connections answered 503 before forwarding starts
        self.accepted = 0
        self.sent: list[bytearray] = []  # client bytes, one buffer per connection
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_unix_server(self._handle, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def requests(self) -> list[dict[str, str]]:
        """Every request head clients sent, in order, as lower-cased headers (plus ``:line``)."""
        heads = []
        for buffer in self.sent:
            for raw in bytes(buffer).split(b"\r\n\r\n")[:-1]:
                line, *fields = raw.decode("latin-1").split("\r\n")
                head = {":line": line}
                head.update(
                    (k.strip().lower(), v.strip()) for k, _, v in (f.partition(":") for f in fields)
                )
                heads.append(head)
        return heads

    def cut(self) -> None:
        """Abort every open connection, both sides, as a network failure would."""
        for writer in self._writers:
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.accepted += 1
        sent = bytearray()
        self.sent.append(sent)
        try:
            if self.accepted <= self.fail_first:
                sent += await reader.readuntil(b"\r\n\r\n")
                body = b"Redis is unavailable; retry shortly\n"
                writer.write(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
                return
            try:
                up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
            except OSError:
                return  # the gateway is gone: the client sees the connection close
            self._writers.append(up_writer)
            await asyncio.gather(_pipe(reader, up_writer, sent), _pipe(up_reader, writer, None))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray | None
) -> None:
    try:
        while data := await reader.read(65536):
            if record is not None:
                record += data
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy(gateway: Gateway, tmp_path: Path) -> AsyncIterator[Proxy]:
    async with Proxy(tmp_path / "proxy.sock", gateway.socket) as running:
        yield running


async def publish(
    log: EventLog, count: int, *, complete: bool = True, start: int = 1, ref: TaskRef = JOB
) -> list[EventId]:
    writer = log.writer(ref)
    ids = [await writer.append("progress", {"step": n}) for n in range(start, start + count)]
    if complete:
        ids.append(await writer.append("complete", {"message": "done"}, final_value={"n": count}))
    return ids


async def take(
    stream: AsyncIterator[StreamEvent], count: int, within: float = 10
) -> list[StreamEvent]:
    return [await asyncio.wait_for(anext(stream), within) for _ in range(count)]


async def rest(stream: AsyncIterator[StreamEvent], within: float = 15) -> list[StreamEvent]:
    async def collect() -> list[StreamEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(collect(), within)


# -- the pieces ------------------------------------------------------------------------------


def test_event_properties_and_paths() -> None:
    assert StreamEvent("3f9a02bc-17", "progress", {}).seq == 17
    assert StreamEvent(None, "reset", {}).seq is None
    assert [StreamEvent("a-1", t, {}).terminal for t in ("complete", "error", "cancelled")] == [
        True
    ] * 3
    assert not StreamEvent("a-1", "progress", {}).terminal
    assert StreamEvent(None, "reset", {"reason": "trimmed"}).reset_reason is ResetReason.TRIMMED
    assert StreamEvent(None, "reset", {"reason": "news"}).reset_reason is None  # a newer server's
    assert StreamEvent("a-1", "progress", {"reason": "lost"}).reset_reason is None
    assert task_path("Job", 1) == "/stream/Job/1"
    assert task_path("Job", "a b/c", app_label="shop") == "/stream/shop/Job/a%20b%2Fc"
    assert issubclass(StreamClientError, StreamcoordError)


# -- streaming -------------------------------------------------------------------------------


async def test_history_then_live_events_to_the_terminal_event(
    gateway: Gateway, event_log: EventLog
) -> None:
    ids = await publish(event_log, 3, complete=False)
    async with contextlib.aclosing(
        stream_task(BASE, "Job", 1, app_label="shop", uds=str(gateway.socket))
    ) as stream:
        history = await take(stream, 3)
        ids += await publish(event_log, 2, start=4)  # live, then complete
        events = history + await rest(stream)
    assert [e.id for e in events] == [str(i) for i in ids]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.event for e in events] == ["progress"] * 5 + ["complete"]
    assert events[-1].terminal and not any(e.terminal for e in events[:-1])
    first = events[0].data
    assert (first["step"], first["_task_id"], first["_model"], first["_app"]) == (
        1,
        1,
        "Job",
        "shop",
    )
    assert first["_timestamp"].startswith("20")
    assert events[-1].data["message"] == "done"


async def test_resumes_after_dropped_connections_without_loss_or_duplicates(
    proxy: Proxy, event_log: EventLog
) -> None:
    ids = await publish(event_log, 5, complete=False)
    async with contextlib.aclosing(
        stream_task(BASE, "Job", "1", uds=str(proxy.path), reconnect_delay=FAST)
    ) as stream:
        events = await take(stream, 5)
        proxy.cut()  # nothing in flight: the reconnect must ask for what follows event 5
        ids += await publish(event_log, 20, complete=False, start=6)
        events += await take(stream, 3)
        assert [e.seq for e in events] == list(range(1, 9))
        proxy.cut()  # events 9.. may be in flight, buffered, or not sent yet
        ids += await publish(event_log, 5, start=26)
        events += await rest(stream)
    assert [e.seq for e in events] == list(range(1, 32))
    assert [e.id for e in events] == [str(i) for i in ids]
    heads = proxy.requests()
    assert len(heads) == 3, heads
    assert "last-event-id" not in heads[0]
    assert heads[1]["last-event-id"] == str(ids[4])
    assert int(heads[2]["last-event-id"].rsplit("-", 1)[1]) >= 8
    assert all(h["accept"] == "text/event-stream" for h in heads)
    assert heads[0][":line"] == "GET /stream/Job/1 HTTP/1.1"


async def test_gateway_shutdown_moves_the_client_to_another_gateway(
    gateway_factory: Any, event_log: EventLog, tmp_path: Path
) -> None:
    first, second = gateway_factory(), gateway_factory()
    ids = await publish(event_log, 3, complete=False)
    async with (
        Proxy(tmp_path / "lb.sock", first.socket) as balancer,
        contextlib.aclosing(
            stream_task(BASE, "Job", 1, uds=str(balancer.path), reconnect_delay=FAST)
        ) as stream,
    ):
        events = await take(stream, 3)
        balancer.upstream = second.socket  # new connections go to the second gateway
        assert await asyncio.wait_for(asyncio.to_thread(first.stop), 20) == 0  # SIGTERM
        ids += await publish(event_log, 3, start=4)
        events += await rest(stream)
        heads = balancer.requests()
    assert [e.id for e in events] == [str(i) for i in ids]
    assert len(heads) >= 2 and heads[-1]["last-event-id"] == str(ids[2])


async def test_503_answers_are_retried(
    gateway: Gateway, event_log: EventLog, tmp_path: Path
) -> None:
    ids = await publish(event_log, 2)
    async with (
        Proxy(tmp_path / "p.sock", gateway.socket, fail_first=2) as proxy,
        contextlib.aclosing(
            stream_task(BASE, "Job", 1, uds=str(proxy.path), reconnect_delay=0.01, max_reconnects=2)
        ) as stream,
    ):
        events = await rest(stream)
    assert [e.id for e in events] == [str(i) for i in ids]
    assert proxy.accepted == 3


async def test_reconnects_give_up_after_max_reconnects(
    gateway: Gateway, event_log: EventLog, tmp_path: Path
) -> None:
    await publish(event_log, 2)
    async with Proxy(tmp_path / "p.sock", gateway.socket, fail_first=10) as proxy:
        with pytest.raises(StreamClientError) as failed:
            await rest(
                stream_task(
                    BASE, "Job", 1, uds=str(proxy.path), reconnect_delay=0.01, max_reconnects=2
                )
            )
    assert failed.value.status == 503 and "gave up after 2 reconnects" in str(failed.value)
    assert proxy.accepted == 3
    with pytest.raises(StreamClientError) as refused:
        await rest(
            stream_task(
                BASE,
                "Job",
                1,
                uds=str(tmp_path / "nothing.sock"),
                reconnect_delay=0.01,
                max_reconnects=1,
            )
        )
    assert refused.value.status is None and "ConnectError" in str(refused.value)


async def test_resuming_after_the_terminal_event_gets_204_and_no_events(
    gateway: Gateway, event_log: EventLog
) -> None:
    ids = await publish(event_log, 3)
    transport = httpx.AsyncHTTPTransport(uds=str(gateway.socket))
    async with httpx.AsyncClient(transport=transport, base_url=BASE, timeout=10) as client:
        stream = stream_task(BASE, "Job", 1, last_event_id=str(ids[-1]), client=client)
        assert await rest(stream) == []
        assert (await client.get("/health")).status_code == 200  # ours, still open
        stream = stream_task(BASE, "Job", 1, last_event_id=str(ids[1]), client=client)
        assert [e.id for e in await rest(stream)] == [str(ids[2]), str(ids[3])]


@pytest.mark.parametrize(
    ("model", "task_id", "last_id", "status", "message"),
    [
        ("Job", 404, None, 404, "unknown task shop.Job:404"),
        ("Nope", 1, None, 404, "unknown model 'Nope'"),
        ("Job", 1, "abc", 400, "event id must look like <epoch>-<sequence>"),
        ("Job", "a:b", None, 400, "invalid task id 'a:b'"),
    ],
)
async def test_error_answers_raise_with_status_and_message(
    gateway: Gateway,
    event_log: EventLog,
    model: str,
    task_id: str | int,
    last_id: str | None,
    status: int,
    message: str,
) -> None:
    await publish(event_log, 1)
    stream = stream_task(
        BASE, model, task_id, last_event_id=last_id, uds=str(gateway.socket), reconnect_delay=FAST
    )
    with pytest.raises(StreamClientError) as raised:
        await rest(stream)
    assert raised.value.status == status
    assert message in raised.value.message and message in str(raised.value)
    assert raised.value.url.endswith(task_path(model, task_id))


async def test_reset_comes_first_from_a_foreign_epoch_then_everything(
    gateway: Gateway, event_log: EventLog
) -> None:
    ids = await publish(event_log, 9)
    stream = stream_task(BASE, "Job", 1, last_event_id="deadbeef-4", uds=str(gateway.socket))
    events = await rest(stream)
    reset = events[0]
    assert (reset.event, reset.id, reset.seq, reset.terminal) == ("reset", None, None, False)
    assert reset.reset_reason is ResetReason.EPOCH and reset.data["epoch"] == ids[0].epoch
    assert [e.id for e in events[1:]] == [str(i) for i in ids]


async def test_after_a_reset_the_position_is_the_new_stream(
    proxy: Proxy, event_log: EventLog
) -> None:
    ids = await publish(event_log, 3, complete=False)
    async with contextlib.aclosing(
        stream_task(
            BASE, "Job", 1, last_event_id="deadbeef-2", uds=str(proxy.path), reconnect_delay=FAST
        )
    ) as stream:
        events = await take(stream, 4)
        proxy.cut()
        ids += await publish(event_log, 3, start=4)
        events += await rest(stream)
    assert [e.event for e in events].count("reset") == 1
    assert [e.id for e in events[1:]] == [str(i) for i in ids]
    heads = proxy.requests()
    assert [h.get("last-event-id") for h in heads] == ["deadbeef-2", str(ids[2])]


async def test_sync_iterator(gateway: Gateway, event_log: EventLog) -> None:
    ids = await publish(event_log, 4)

    def read_all() -> list[StreamEvent]:
        return list(iter_task_events(BASE, "Job", 1, uds=str(gateway.socket), max_reconnects=3))

    def read_one() -> StreamEvent:
        events = iter_task_events(BASE, "Job", 1, app_label="shop", uds=str(gateway.socket))
        try:
            return next(events)
        finally:
            events.close()  # closes the stream and its loop

    events = await asyncio.wait_for(asyncio.to_thread(read_all), 15)
    assert [e.id for e in events] == [str(i) for i in ids]
    assert (await asyncio.wait_for(asyncio.to_thread(read_one), 15)).id == str(ids[0])
