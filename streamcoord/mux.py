"""Many tasks on one connection: ``GET /streams?task=app.Model:pk&task=...``.

A page that follows twenty tasks with twenty EventSources holds twenty of the six connections
HTTP/1.1 gives it per origin. A :class:`Multiplex` serves them all on one: a :class:`Feed` per
task, exactly as the single-task route's (history, then live events, resets), merged in the order
their events reach the gateway. Each event keeps its type and data (``_task_id``, ``_model``,
``_app`` say whose it is); its ``id:`` is the position of the whole connection, a composite id
(:mod:`streamcoord.ids`): every task's last event sent. The browser sends the last one back as
Last-Event-ID when it reconnects, and each task goes on after its own last event. A ``reset`` has
no id, as on the single-task route, and names its task.

One connection, one set of bounds: the feeds' listeners (:class:`Tributary`) hand their batches
to the connection's :class:`Confluence`, one queue bounded like a single client's
(``client_queue_size`` frames, ``client_queue_bytes`` bytes), written by one task, or straight
to the connection while that task waits (:mod:`streamcoord.direct`). Feeds open one after the
other, each sending its history before the next opens, so the history held at once is one
feed's. The response ends once every task has ended; a task that ends early just stops sending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .codec import Frame
from .direct import ChunkWriter
from .errors import InvalidTaskRef, UnknownTask
from .eventlog import EventLog
from .feed import CHUNK_BYTES, Feed
from .hub import Hub
from .ids import PART_SEPARATOR, EventId, composite_part
from .keys import TaskRef
from .listener import Batch, BatchKind, BoundedQueue, Listener
from .stall import WriteStall
from .taskstate import TaskState

log = logging.getLogger(__name__)

_EVENTS, _HEARTBEAT = BatchKind.EVENTS, BatchKind.HEARTBEAT
_SEPARATOR = PART_SEPARATOR.encode()
#: Every listener of a connection gets the hub's heartbeat; one per this many seconds goes out.
HEARTBEAT_GAP = 1.0


#: Longest task name (``app_label.Model:pk``) read from a request.
MAX_NAME_CHARS = 200


def requested_tasks(names: Sequence[str], limit: int) -> list[TaskRef]:
    """The tasks a request's ``task=app_label.Model:pk`` parameters name, each once, in order;
    raises :class:`InvalidTaskRef` with a plain reason (no names, too many, a malformed one)."""
    unique = list(dict.fromkeys(names))
    if not unique:
        raise InvalidTaskRef("name the tasks to follow: /streams?task=app_label.Model:pk&task=...")
    if len(unique) > limit:
        raise InvalidTaskRef(
            f"one connection follows at most {limit} tasks, not {len(unique)}"
            " (STREAMCOORD_MAX_TASKS_PER_STREAM): split them over several connections"
        )
    refs = []
    for name in unique:
        if len(name) > MAX_NAME_CHARS:
            raise InvalidTaskRef(f"{name[:MAX_NAME_CHARS // 2]!r}... is too long for a task name")
        try:
            refs.append(TaskRef.parse(name))
        except InvalidTaskRef as exc:
            raise InvalidTaskRef(f"{exc} (use task=app_label.Model:pk)") from None
    return refs


class Composite:
    """A multiplexed connection's position: each task's last event sent, as the ``id:`` of the
    connection's events says it (:func:`streamcoord.ids.parse_composite_id` reads it back)."""

    __slots__ = ("_parts", "_tags")

    def __init__(self, tags: Sequence[str], given: dict[str, EventId]) -> None:
        self._tags = [tag.encode() for tag in tags]
        #: Each task's part, in the request's order; b"" until it was sent an event.
        self._parts = [
            composite_part(tag.encode(), given[tag].epoch.encode(), given[tag].seq) if tag in given else b""
            for tag in tags
        ]

    def __str__(self) -> str:
        return self._joined().decode()

    def _joined(self) -> bytes:
        return _SEPARATOR.join([part for part in self._parts if part])

    def _frame(self, index: int, frame: bytes) -> bytes:
        """``frame`` (``id: <epoch>-<seq>`` first) with the connection's id, task ``index``
        moved to it."""
        end = frame.index(b"\n")
        epoch, _, seq = frame[4:end].rpartition(b"-")
        self._parts[index] = composite_part(self._tags[index], epoch, seq)
        return b"id: " + self._joined() + frame[end:]

    def rewriter(self, index: int) -> Callable[[bytes], bytes]:
        """What task ``index``'s feed gives each frame it sends (:attr:`Feed.rewrite`)."""
        return lambda frame: self._frame(index, frame)

    def frames(self, index: int, frames: Sequence[Frame]) -> tuple[bytes, bytes]:
        """The bytes of task ``index``'s ``frames`` with the connection's ids, and its part
        before them: give it to :meth:`undo` if they are not written after all."""
        before = self._parts[index]
        return b"".join([self._frame(index, frame.data) for frame in frames]), before

    def undo(self, index: int, part: bytes) -> None:
        self._parts[index] = part


class Confluence(BoundedQueue[tuple[int, Batch]]):
    """The listeners of one multiplexed connection, merged: one queue of ``(task index,
    batch)``, bounded like a single client's, and the task that writes it.

    Batches arrive from every task's stream in the order the hub hands them out, and go out in
    that order. A connection that lets the queue fill up is cut (``closed`` is "overflow", the
    writing task cancelled) and resumes from Redis with its composite Last-Event-ID, as a single
    client does."""

    __slots__ = ("_beat", "direct")

    def __init__(self, limit: int, limit_bytes: int) -> None:
        super().__init__(limit, limit_bytes)
        #: Writes a task's batch straight to the client while the task waits in :meth:`take`.
        self.direct: Callable[[tuple[int, Batch]], bool] | None = None
        self._beat = 0.0  # when the last heartbeat was let through

    @staticmethod
    def _batch(item: tuple[int, Batch]) -> Batch:
        return item[1]

    def maker(self, index: int) -> Callable[[bytes], Listener]:
        """Builds task ``index``'s listener (:data:`streamcoord.hub.ListenerFactory`)."""
        return lambda key: Tributary(key, self, index)

    def push(self, index: int, batch: Batch) -> None:
        if self.closed:
            return
        if batch.kind is _HEARTBEAT:  # each listener gets one: the connection needs one
            now = time.monotonic()
            if now - self._beat < HEARTBEAT_GAP:
                return
            self._beat = now
        item = (index, batch)
        if self.direct is not None and self._waiter is not None:
            # As Listener.push: the writer waits with everything before written, so what is
            # queued, then this batch, may go out now, in order.
            if self.batches:
                self._write_queued(self.direct)
            if not self.batches and self.direct(item):
                return
        self._admit(item, batch)

    async def take(self) -> list[tuple[int, Batch]]:
        """Wait for batches and take all of them (none once closed: shut down, or cut, its
        writer cancelled; the client resumes)."""
        taken = await super().take()
        return [] if self.closed else taken


class Tributary(Listener):
    """One task's listener on a multiplexed connection: what the hub hands it goes to the
    connection's :class:`Confluence`."""

    __slots__ = ("confluence", "index")

    def __init__(self, key: bytes, confluence: Confluence, index: int) -> None:
        super().__init__(key, confluence.limit, confluence.limit_bytes)
        self.confluence = confluence
        self.index = index

    def push(self, batch: Batch) -> None:
        if not self.closed:
            self.confluence.push(self.index, batch)

    def hold(self, size: int) -> None:
        self.confluence.hold(size)

    def close(self, reason: str) -> None:
        super().close(reason)
        if reason != "unsubscribed":  # the hub shuts down: the whole connection ends
            self.confluence.close(reason)


class Multiplex:
    """One connection's tasks: a feed each, written to the client in one response.

    :meth:`open` reads every task's state record (one round trip) and nothing more: enough to
    answer 404 for an unknown task, 204 when the client has every terminal event already, and
    to start pending tasks. Each task's feed is opened when its turn comes (:meth:`pump`), its
    history sent, and it goes on listening while the next one opens: what the connection
    holds of history at once is one feed's, bounded as a single client's is."""

    def __init__(
        self, log: EventLog, hub: Hub, refs: Sequence[TaskRef], tags: Sequence[str],
        given: dict[str, EventId], states: Sequence[TaskState | None],
    ) -> None:
        self._log, self._hub = log, hub
        self.refs = list(refs)
        self._tags = list(tags)
        self._given = given
        self.states = list(states)
        self.confluence = Confluence(log.settings.client_queue_size, log.settings.client_queue_bytes)
        self.composite = Composite(tags, given)
        #: Each task's feed, once opened (None before, and for a task with nothing to send).
        self.feeds: list[Feed | None] = [None] * len(self.refs)
        #: Each task has nothing (more) to send: the client has its terminal event.
        self._done = [self._has_all(index) for index in range(len(self.refs))]
        self._opened = False  # every feed was opened (and its history sent)

    @classmethod
    async def open(
        cls, log: EventLog, hub: Hub, refs: Sequence[TaskRef], tags: Sequence[str],
        given: dict[str, EventId],
    ) -> Multiplex:
        """Read where each task stands (``given``: the client's last event of each, by tag).
        Raises :class:`streamcoord.errors.UnknownTask` for a task with neither a state record
        nor events that the client has not seen either (one it saw, forgotten since, has
        nothing more to send)."""
        states = await log.states(refs)
        unknown = [index for index, state in enumerate(states) if state is None]
        if unknown:  # a stream without a state record is rare (written by hand): look
            pipe = log.redis.pipeline(transaction=False)
            for index in unknown:
                pipe.exists(log.keys.events(refs[index]))
            found = await pipe.execute()
            for index, exists in zip(unknown, found, strict=True):
                if not exists and tags[index] not in given:
                    raise UnknownTask(f"no task {refs[index]}")
        return cls(log, hub, refs, tags, given, states)

    def _has_all(self, index: int) -> bool:
        """The client has task ``index``'s terminal event (or saw a task forgotten since)."""
        state, given = self.states[index], self._given.get(self._tags[index])
        if state is None:
            return given is not None
        return (
            state.ended and given is not None and given.epoch == state.epoch and given.seq == state.last_seq
        )

    def awaiting_start(self) -> list[TaskRef]:
        """The tasks created and not started yet (a lazy start's)."""
        return [ref for ref, state in zip(self.refs, self.states, strict=True) if state and state.awaits_start]

    @property
    def listener(self) -> Confluence:
        """What the gateway asks why the connection was closed (as a feed's listener)."""
        return self.confluence

    @property
    def ref(self) -> str:
        return f"{len(self.refs)} tasks ({self.refs[0]}, ...)" if len(self.refs) > 1 else str(self.refs[0])

    @property
    def empty(self) -> bool:
        """Nothing to send at all: the client has every task's terminal event."""
        return all(self._done)

    @property
    def ended(self) -> bool:
        """Every task's terminal event is out."""
        return self._opened and all(feed is None or feed.ended for feed in self.feeds)

    def close(self) -> None:
        for feed in self.feeds:
            if feed is not None:
                feed.close()

    async def pump(self, request: Any, stall: WriteStall) -> None:
        """Write every task's history, task by task, then their live events as they come, until
        every task has ended (or the connection is cut: overflow, shutdown)."""
        confluence = self.confluence
        confluence.task = asyncio.current_task()
        for index, ref in enumerate(self.refs):
            if confluence.closed:
                return  # shut down meanwhile: the client resumes elsewhere
            if self._done[index]:
                continue
            try:
                feed = await Feed.open(
                    self._log, self._hub, ref, last_id=self._given.get(self._tags[index]),
                    make=confluence.maker(index),
                )
            except UnknownTask:  # forgotten since the connection opened: nothing to send
                log.info("task %s was forgotten while a multiplexed stream opened", ref)
                continue
            feed.rewrite = self.composite.rewriter(index)
            self.feeds[index] = feed
            async for chunk in feed.history():
                await request.send(chunk)
                stall.written += len(chunk)
            if feed.ended:
                feed.close()  # it stops listening; the others go on
        self._opened = True
        writer = ChunkWriter.of(request._send, stall)
        if writer is not None:
            confluence.direct = self._direct(writer)
        try:
            await self._live(request, stall)
        finally:
            confluence.direct = None

    async def _live(self, request: Any, stall: WriteStall) -> None:
        """Write what the confluence is handed, in order, in chunks of about
        :data:`streamcoord.feed.CHUNK_BYTES` (each frame carries the whole connection's id)."""
        # Counted down as tasks end, not asked of every feed per batch (up to 100 of them).
        live = sum(1 for feed in self.feeds if feed is not None and not feed.ended)
        while live:
            items = await self.confluence.take()
            if not items:
                return  # shut down
            out: list[bytes] = []
            size = 0
            for index, batch in items:
                feed = self.feeds[index]
                if batch.kind is _HEARTBEAT:
                    out.append(batch.data)
                elif feed is not None and not feed.ended:
                    before = len(out)
                    await feed.absorb(batch, out)
                    size += sum(len(chunk) for chunk in out[before:])
                    if feed.ended:
                        feed.close()
                        live -= 1
                if size >= CHUNK_BYTES:
                    await self._send(request, stall, out)
                    out, size = [], 0
            if out:
                await self._send(request, stall, out)
        await request.send(b"", more=False)  # every task's terminal event is out

    @staticmethod
    async def _send(request: Any, stall: WriteStall, out: list[bytes]) -> None:
        chunk = b"".join(out)
        await request.send(chunk)
        stall.written += len(chunk)

    def _direct(self, writer: ChunkWriter) -> Callable[[tuple[int, Batch]], bool]:
        feeds, composite = self.feeds, self.composite

        def write(item: tuple[int, Batch]) -> bool:
            index, batch = item
            kind = batch.kind
            if kind is _HEARTBEAT:
                return writer.write(batch.data)
            feed = feeds[index]
            if kind is not _EVENTS or feed is None or not feed.follows(batch):
                return False
            data, before = composite.frames(index, batch.frames)
            if not writer.write(data):
                composite.undo(index, before)
                return False
            feed.sent(batch)
            return True

        return write
