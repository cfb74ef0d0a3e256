"""Tasks, clients and checks shared by the multi-process suites (faults, distributed, nginx,
cluster, sentinel): follow a task's stream, start many tasks at once, read a task's state and
row, and check what a client received (gap-free, one terminal event, a reset before a jump),
also on a multiplexed connection (``Tally``)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from redis.asyncio import Redis

from streamcoord import EventLog, TaskRef
from streamcoord.ids import parse_composite_id, task_tag
from streamcoord.keys import KeySpace
from streamcoord.taskstate import TERMINAL_EVENTS

from .processes import REPO, Gateway, Project
from .rawsse import RawSSE, SSEEvent

TERMINAL = frozenset(TERMINAL_EVENTS)


KEYS = KeySpace("sc")


async def until(predicate: Callable[[], Any], within: float, what: str, interval: float = 0.05) -> float:
    """Poll ``predicate`` (sync or async) until it is true; the seconds that took."""
    start = time.monotonic()
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def split_id(event_id: str) -> tuple[str, int]:
    epoch, _, seq = event_id.rpartition("-")
    return epoch, int(seq)


def delivery_problems(events: Sequence[SSEEvent], after: int = 0) -> list[str]:
    """What is wrong with what one client received of one task (empty: nothing).

    Ids contiguous and unique from ``after + 1`` on; a jump or another epoch only right after a
    ``reset`` (which replaces what the client had, so ids may repeat after it); exactly one
    terminal event, and it is the last.
    """
    problems: list[str] = []
    epoch: str | None = None
    last, reset, terminals = after, False, 0
    seen: set[tuple[str, int]] = set()
    for n, event in enumerate(events):
        if event.event == "reset":
            # A reset replaces what the client had: the stream follows from what is retained.
            reset = True
            seen.clear()
            terminals = 0
            continue
        if event.id is None:
            problems.append(f"#{n} {event.event} has no id")
            continue
        this_epoch, seq = split_id(event.id)
        if (this_epoch, seq) in seen:
            problems.append(f"#{n} {event.id} ({event.event}) received twice")
        seen.add((this_epoch, seq))
        if not reset and not ((epoch is None or this_epoch == epoch) and seq == last + 1):
            problems.append(f"#{n} {event.id} ({event.event}) follows {epoch or ''}-{last} without a reset")
        epoch, last, reset = this_epoch, seq, False
        if event.event in TERMINAL:
            terminals += 1
            if n != len(events) - 1:
                problems.append(f"terminal {event.id} ({event.event}) is followed by {len(events) - 1 - n} more events")
    if terminals != 1:
        problems.append(f"{terminals} terminal events instead of one")
    return problems


def as_sent(events: Sequence[Event]) -> list[tuple[str, str, str]]:
    return [(e.id.decode(), e.type.decode(), e.data.decode()) for e in events]


def as_received(events: Sequence[SSEEvent]) -> list[tuple[str | None, str, str]]:
    """A client's events after its last reset, comparable with :func:`as_sent`."""
    resets = [n for n, e in enumerate(events) if e.event == "reset"]
    tail = events[resets[-1] + 1:] if resets else events
    return [(e.id, e.event, e.data) for e in tail]


def payload(event: SSEEvent | Event) -> dict[str, Any]:
    data = event.data if isinstance(event, SSEEvent) else event.data.decode()
    decoded: dict[str, Any] = json.loads(data)
    return decoded


@dataclass
class Follower:
    """A client of one task's stream that, like EventSource, reconnects with Last-Event-ID
    whenever a connection ends before the terminal event. Keeps every event and its arrival."""

    socket: Path
    path: str
    events: list[SSEEvent] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    last_id: str | None = None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].event in TERMINAL

    def arrival(self, event_type: str) -> float:
        return next(t for e, t in zip(self.events, self.arrived, strict=True) if e.event == event_type)

    def describe(self) -> str:
        tail = [(e.id, e.event) for e in self.events[-4:]]
        return f"{self.path}: {len(self.events)} events, last {tail}, statuses {self.statuses}"

    async def run(self, within: float) -> Follower:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._follow(), within)
        return self

    async def _follow(self) -> None:
        while True:
            headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
            try:
                client = await RawSSE.open(self.socket, self.path, headers)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            try:
                await client.read_head()
                self.statuses.append(client.status)
                if client.status == 204:
                    return
                if client.status == 200:
                    while (event := await client.next_event()) is not None:
                        self.events.append(event)
                        self.arrived.append(time.monotonic())
                        if event.id is not None:
                            self.last_id = event.id
                        if event.event in TERMINAL:
                            return
            except (OSError, asyncio.IncompleteReadError, ValueError):
                pass  # dropped: reconnect
            finally:
                client.writer.close()
                with contextlib.suppress(OSError):
                    await client.writer.wait_closed()
            await asyncio.sleep(0.2)


def stream_path(ref: TaskRef) -> str:
    return f"/stream/{ref.app_label}/{ref.model}/{ref.pk}"


def create_tasks(project: Project, model: str, count: int, *, start: bool = True, **fields: Any) -> list[TaskRef]:
    """Create ``count`` rows in one ``manage.py shell`` (and queue them); their refs."""
    code = (
        "import json\n"
        "from django_app.coordinator import coordinator, find_model\n"
        f"model = find_model({model!r})\n"
        "ids = []\n"
        f"for _ in range({count}):\n"
        f"    task = model.objects.create(**{fields!r})\n"
        f"    if {start!r}:\n"
        "        coordinator.start_task_sync(task)\n"
        "    ids.append(task.pk)\n"
        "print(json.dumps(ids))\n"
    )
    ids = json.loads(project.manage("shell", "-c", code).strip().splitlines()[-1])
    return [TaskRef("examples", model, str(pk)) for pk in ids]


def row(project: Project, ref: TaskRef) -> tuple[str, str]:
    """(status, error) of a task row (every example task here lives in ProgressTask's table)."""
    with contextlib.closing(sqlite3.connect(project.db, timeout=20)) as db:
        found = db.execute("SELECT status, error FROM examples_progresstask WHERE id = ?", (int(ref.pk),)).fetchone()
    assert found is not None, f"no row for {ref}"
    return found[0], found[1]


async def state(redis: Redis, ref: TaskRef) -> dict[str, str]:
    raw: Any = await redis.hgetall(KEYS.state(ref))
    return {k.decode(): v.decode() for k, v in raw.items()}


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a task's stream, decoded for assertions (gateways never decode entries)."""

    seq: int
    epoch: bytes
    type: bytes
    data: bytes

    @property
    def id(self) -> bytes:
        return self.epoch + b"-%d" % self.seq

    @property
    def terminal(self) -> bool:
        return self.type.decode() in TERMINAL_EVENTS


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    return Event(int(entry_id.partition(b"-")[0]), fields[b"epoch"], fields[b"type"], fields[b"data"])


async def stream(redis: Redis, ref: TaskRef) -> list[Event]:
    entries: Any = await redis.xrange(KEYS.events(ref), "-", "+")
    return [decode_entry(i, f) for i, f in entries]


@contextlib.contextmanager
def project_on(directory: Path, redis_url: str) -> Iterator[Project]:
    """The example project, migrated, on a Redis of the test's own; what it starts is stopped
    by pid on exit (as the ``project`` fixture does for the session's Redis)."""
    directory.mkdir(parents=True, exist_ok=True)
    project = Project(directory, redis_url)
    project.manage("migrate", "--noinput", "-v", "0")
    try:
        yield project
    finally:
        project.stop_all()


async def gateway_stats(gateway: Gateway) -> dict[str, Any]:
    """The gateway's ``/stats``, from its admin listener (the public socket has none)."""
    assert gateway.admin_socket is not None, "the gateway was started without --admin-socket"
    transport = httpx.AsyncHTTPTransport(uds=str(gateway.admin_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10) as client:
        return (await client.get("/stats")).json()


def triples(events: list[SSEEvent]) -> list[tuple[str | None, str, str]]:
    return [(e.id, e.event, e.data) for e in events]


def assert_gap_free(events: list[SSEEvent], what: str) -> None:
    """Ids ``<epoch>-1 .. <epoch>-N`` in order, one epoch, exactly one terminal event, last."""
    assert events, f"{what}: no events"
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), f"{what}: {[e.id for e in events]}"
    assert len({e.id.rsplit("-", 1)[0] for e in events if e.id}) == 1, f"{what}: several epochs"
    terminals = [e.event for e in events if e.event in TERMINAL]
    assert len(terminals) == 1 and events[-1].event in TERMINAL, f"{what}: terminal events {terminals}"


def shell(project: Project, code: str) -> str:
    """``manage.py shell -c`` in a fresh process; the last line of its stdout (Django 5.2's
    shell may print a line about automatic imports first)."""
    out = project.manage("shell", "-c", code).strip()
    return out.splitlines()[-1] if out else ""


def worker_id(handle: Gateway) -> str:
    """A worker's id, from the ``worker <id> started`` line of its log."""
    match = re.search(r"worker (\S+) started", handle.log_text())
    assert match, handle.log_text()
    return match.group(1)


async def create_tasks_streamed(project: Project, count: int, model: str, *fields: str) -> AsyncIterator[dict[str, Any]]:
    """Run ``create_task <model> --set ... --start`` ``count`` times in ONE process (a
    ``manage.py shell`` calling the command: one interpreter start instead of ``count``), and
    yield each task's JSON line as soon as the command printed it, so clients can connect
    while the task runs."""
    args = [model, *(f"--set={f}" for f in fields), "--start"]
    code = (
        "from django.core.management import call_command\n"
        f"for _ in range({count}):\n"
        f"    call_command('create_task', *{args!r})\n"
    )
    env = {**project.env(), "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "manage.py", "shell", "-c", code, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    other: list[bytes] = []  # log lines, and Django's shell's own line about imports
    try:
        for _ in range(count):
            while True:
                line = await asyncio.wait_for(process.stdout.readline(), 30)
                assert line, f"create_task stopped early:\n{b''.join(other).decode(errors='replace')}"
                if line.startswith(b"{"):
                    break
                other.append(line)
            yield json.loads(line)
        other.append(await asyncio.wait_for(process.stdout.read(), 30))
        assert await asyncio.wait_for(process.wait(), 30) == 0, b"".join(other).decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def logs(*handles: Gateway) -> str:
    return "\n".join(f"--- {h.log.name}\n{h.log_text()[-3000:]}" for h in handles)


def set_continue(project: Project, pk: int) -> None:
    """Flip ContinueTask's field from another process, as the predecessor's tests did."""
    updated = shell(project, (
        "from django_app.examples.models import ContinueTask\n"
        f"print(ContinueTask.objects.filter(pk={pk}).update(continue_field=True))"
    ))
    assert updated == "1", updated


def stream_problems(events: Sequence[Event]) -> list[str]:
    """What is wrong with a task's stream in Redis: one epoch, numbered 1..n, one terminal (last)."""
    problems = []
    seqs = [e.seq for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"sequence numbers are not 1..{len(seqs)}: {seqs}")
    if len({e.epoch for e in events}) > 1:
        problems.append(f"several epochs: {sorted({e.epoch for e in events})}")
    terminals = [e for e in events if e.terminal]
    if len(terminals) != 1 or not events[-1].terminal:
        problems.append(f"{len(terminals)} terminal events, last is {events[-1].type!r}" if events else "empty")
    return problems


async def append_progress(
    log: EventLog, ref: TaskRef, first: int, last: int, *, size: int = 0, complete: bool = False
) -> None:
    """Events first..last of ``ref`` (``progress``, padded with ``size`` bytes), then, with
    ``complete``, its terminal event, through one TaskWriter."""
    writer = log.writer(ref)
    for n in range(first, last + 1):
        await writer.append("progress", {"step": n, "pad": "x" * size} if size else {"step": n})
    if complete:
        await writer.append("complete", {"message": "done"})


def check_in_order(received: list[SSEEvent], count: int, first: int = 1) -> None:
    """Every event first..count, each once, in order, nothing (no reset) in between: ``count``
    is the terminal one."""
    assert [(e.event, e.seq) for e in received] == [("progress", n) for n in range(first, count)] + [
        ("complete", count)
    ], [(e.event, e.seq) for e in received]


# -- many tasks on one connection (GET /streams) ------------------------------------------------


async def read_until(
    gateway: Gateway, path: str, headers: dict[str, str], stop_after: int | None
) -> tuple[list[tuple[str, str, dict[str, Any]]], bool]:
    """(id, type, data) of the events a multiplexed stream (GET /streams) sent, and whether the
    response ended by itself. Stops (cutting the connection) after ``stop_after`` events."""
    got: list[tuple[str, str, dict[str, Any]]] = []
    client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(gateway.socket)), base_url="http://gateway", timeout=20
    )
    async with client, aconnect_sse(client, "GET", path, headers=headers) as source:
        assert source.response.status_code == 200, (await source.response.aread())
        # Closed here, not by the garbage collector in another task (anyio's cancel scopes
        # refuse that), when the loop stops early.
        async with contextlib.aclosing(source.aiter_sse()) as events:
            async for sse in events:
                if not sse.data:
                    continue
                got.append((sse.id, sse.event, json.loads(sse.data)))
                if stop_after is not None and len(got) >= stop_after:
                    return got, False
    return got, True


def label(data: dict[str, Any]) -> str:
    """The task an event's data names."""
    return f"{data['_app']}.{data['_model']}:{data['_task_id']}"


class Tally:
    """What one client of a multiplexed stream received, per task: the sequence of each event
    (its task's part of the composite id), checked as it comes."""

    def __init__(self, tasks: list[TaskRef]) -> None:
        self.by_tag = {task_tag(ref.label): ref.label for ref in tasks}
        self.seqs: dict[str, list[int]] = {ref.label: [] for ref in tasks}
        self.ended: set[str] = set()
        self.last_id = ""
        self.resets: list[dict[str, Any]] = []

    def take(self, events: list[tuple[str, str, dict[str, Any]]]) -> None:
        for event_id, event_type, data in events:
            task = label(data)
            if event_type == "reset":
                self.resets.append(data)
                continue
            parts = parse_composite_id(event_id, 100)
            own = [pos for tag, pos in parts.items() if self.by_tag[tag] == task]
            assert len(own) == 1, (event_id, task)
            self.seqs[task].append(own[0].seq)
            if event_type in ("complete", "error", "cancelled"):
                self.ended.add(task)
            self.last_id = event_id

    def problems(self, expected: dict[str, int]) -> list[str]:
        return [
            f"{task}: got {seqs[:5]}...{seqs[-5:]} ({len(seqs)}), expected 1..{expected[task]}"
            for task, seqs in self.seqs.items() if seqs != list(range(1, expected[task] + 1))
        ]
