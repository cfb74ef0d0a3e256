"""A Python client for a gateway's task streams: yields a task's events, resuming by itself.

::

    async for event in stream_task("http://gateway:8001", "Report", 42):
        print(event.event, event.seq, event.data)

    for event in iter_task_events("http://gateway", "Report", 42, uds="/run/sc/gw.sock"):
        ...  # the same, for scripts and the shell

    async for event in stream_tasks("http://gateway:8001", ["shop.Report:42", "shop.Export:7"]):
        print(event.task, event.event, event.seq)  # many tasks on one connection (GET /streams)

The client remembers the last event id; after a dropped connection (a transport error, the
response ending before a terminal event, a gateway shutting down, a 408/429/502/503/504 answer)
it waits and reconnects with ``Last-Event-ID``, so no event is lost or yielded twice. It stops
after a terminal event (``complete``, ``error``, ``cancelled``) or a ``204`` answer, and raises
:class:`StreamClientError` on any other error answer.

``reset`` events (without an id) are yielded too: history the client has, or lacks, is gone.
:attr:`StreamEvent.reset_reason` says why, and so what the events after it are
(:class:`~streamcoord.resets.ResetReason`): the stream from its start when the client's events
no longer exist (``epoch``, ``position``, ``lost``), the events still held after its position
when what it lacked was trimmed away (``trimmed``, also in the middle of a stream), the outcome
alone when the stream expired (``expired``). After a reset the client forgets its last event id
until the next event brings one; a reconnect in between asks for the stream from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from .errors import StreamcoordError
from .ids import parse_composite_id, task_tag
from .keys import TaskRef
from .resets import RESET_EVENT, ResetReason
from .taskstate import TERMINAL_EVENTS

#: Used when neither the caller nor the server names a reconnect delay (seconds).
DEFAULT_RECONNECT_DELAY = 2.0
#: Longest wait between attempts while reconnects keep failing.
MAX_BACKOFF = 30.0
#: Answers worth retrying: the gateway (or a proxy in front of it) is busy or restarting.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
#: Read timeout well above the gateway's heartbeat interval (15 s by default).
DEFAULT_TIMEOUT = httpx.Timeout(10.0, read=60.0)


class StreamClientError(StreamcoordError):
    """A stream that cannot be read: an error answer (``status`` and the server's plain-text
    ``message``), or reconnects exhausted (``status`` of the last answer, or None)."""

    def __init__(self, message: str, *, status: int | None = None, url: str = "") -> None:
        self.status = status
        self.message = message
        self.url = url
        where = f" from {url}" if url else ""
        super().__init__(f"{status}{where}: {message}" if status is not None else message)


@dataclass(frozen=True)
class StreamEvent:
    """One event of a task's stream; ``id`` is None for events without one (``reset``)."""

    id: str | None
    event: str
    data: dict[str, Any]

    @property
    def seq(self) -> int | None:
        """The event's sequence number in its stream (1, 2, 3, ...), None without an id."""
        _, sep, seq = (self.id or "").rpartition("-")
        return int(seq) if sep and seq.isdigit() else None

    @property
    def terminal(self) -> bool:
        """True for ``complete``, ``error`` and ``cancelled``: the task's last event."""
        return self.event in TERMINAL_EVENTS

    @property
    def reset_reason(self) -> ResetReason | None:
        """Why history was reset, for a ``reset`` event; None for any other event (and for a
        reason this client does not know)."""
        reason = self.data.get("reason")
        if self.event != RESET_EVENT or not isinstance(reason, str):
            return None
        try:
            return ResetReason(reason)
        except ValueError:
            return None


def task_path(model: str, task_id: str | int, app_label: str | None = None) -> str:
    """``/stream/{Model}/{id}`` or ``/stream/{app}/{Model}/{id}``, each part URL-quoted."""
    parts = [app_label] if app_label else []
    return "/stream/" + "/".join(quote(str(p), safe="") for p in [*parts, model, task_id])


def _event(sse: ServerSentEvent, event_id: str | None, url: str) -> StreamEvent:
    try:
        data = json.loads(sse.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise StreamClientError(
            f"event {sse.event!r} carries no JSON object: {sse.data[:200]!r}", url=url
        )
    return StreamEvent(event_id, sse.event, data)


def stream_task(
    base_url: str,
    model: str,
    task_id: str | int,
    *,
    app_label: str | None = None,
    last_event_id: str | None = None,
    token: str | None = None,
    uds: str | None = None,
    reconnect_delay: float | None = None,
    max_reconnects: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> AsyncGenerator[StreamEvent, None]:
    """Yield a task's events from ``base_url`` (e.g. ``http://gateway:8001``) to its end.

    ``last_event_id`` resumes after that event. ``token`` is the stream token the application
    issued (sent as ``Authorization: Bearer``; not needed when the gateways serve ``public``
    streams). ``uds`` connects to a gateway's unix socket
    (``base_url`` then only names the host, e.g. ``http://gateway``); ``client`` is an httpx
    client to use instead of one of our own (its transport and timeouts apply; not with ``uds``).
    Between attempts the client waits ``reconnect_delay`` seconds if given, else the server's
    ``retry:``, doubling the wait (up to 30 s) while attempts fail without an event.
    ``max_reconnects`` bounds consecutive attempts that bring no event (None: retry forever);
    past it :class:`StreamClientError` is raised. Other error answers raise it at once.
    """
    url = base_url.rstrip("/") + task_path(model, task_id, app_label)

    def follow(sse: ServerSentEvent, event_id: str | None) -> tuple[StreamEvent, bool]:
        event = _event(sse, event_id, url)
        return event, event.terminal

    # After a reset the position may name history that is gone: the next event's id replaces
    # it; until then a reconnect asks for everything.
    return _follow(
        url, follow, last_event_id, forget_on_reset=True, eager=False, token=token, uds=uds,
        reconnect_delay=reconnect_delay, max_reconnects=max_reconnects, client=client,
    )


@dataclass(frozen=True)
class TaskEvent(StreamEvent):
    """One event of a multiplexed stream (:func:`stream_tasks`): ``id`` is the connection's
    composite position, ``task`` the label (``app.Model:pk``) of the task it belongs to (a
    ``reset`` names its task too), and :attr:`seq` the event's sequence in that task's stream."""

    task: str = ""
    task_seq: int | None = None

    @property
    def seq(self) -> int | None:
        return self.task_seq


def streams_path(refs: Iterable[TaskRef | str]) -> str:
    """``/streams?task=app.Model:pk&task=...`` for the tasks ``refs``."""
    return "/streams?" + urlencode([("task", str(ref)) for ref in refs])


def stream_tasks(
    base_url: str,
    refs: Iterable[TaskRef | str],
    *,
    last_event_id: str | None = None,
    token: str | None = None,
    uds: str | None = None,
    reconnect_delay: float | None = None,
    max_reconnects: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> AsyncGenerator[TaskEvent, None]:
    """Yield the events of many tasks (``refs``: TaskRefs or ``app.Model:pk`` labels) from one
    connection to ``base_url``'s ``GET /streams``, until every task has ended.

    Each task resumes exactly after its own last event when the connection drops: the client
    sends the last composite id back (``last_event_id`` starts from one, e.g. a connection's
    for a subset of these tasks). The other arguments are :func:`stream_task`'s; ``token`` must
    cover every task."""
    labels = list(dict.fromkeys(str(ref) for ref in refs))
    if not labels:
        raise ValueError("stream_tasks follows at least one task")
    url = base_url.rstrip("/") + streams_path(labels)
    ended: set[str] = set()

    def follow(sse: ServerSentEvent, event_id: str | None) -> tuple[TaskEvent, bool]:
        base = _event(sse, event_id, url)
        label = _label_of(base.data)  # as the gateway names the task: the name its tag is of
        position = parse_composite_id(event_id, len(labels)).get(task_tag(label)) if event_id else None
        event = TaskEvent(base.id, base.event, base.data, label, position.seq if position else None)
        if event.terminal:
            ended.add(label)
        return event, len(ended) == len(labels)

    # The composite position is kept across a reset: the server resets that task again if its
    # part still names history that is gone, and every other task goes on. Tasks that ended
    # before (their terminal event in ``last_event_id``) send nothing: when the response ends
    # after events, reconnecting at once asks the gateway, whose 204 says every task is over.
    return _follow(
        url, follow, last_event_id, forget_on_reset=False, eager=True, token=token, uds=uds,
        reconnect_delay=reconnect_delay, max_reconnects=max_reconnects, client=client,
    )


def _label_of(data: dict[str, Any]) -> str:
    """The task an event's data names (``_app``, ``_model``, ``_task_id``)."""
    return f"{data.get('_app')}.{data.get('_model')}:{data.get('_task_id')}"


E = TypeVar("E", bound=StreamEvent)


async def _follow(
    url: str,
    follow: Callable[[ServerSentEvent, str | None], tuple[E, bool]],
    position: str | None,
    *,
    forget_on_reset: bool,
    eager: bool,
    token: str | None,
    uds: str | None,
    reconnect_delay: float | None,
    max_reconnects: int | None,
    client: httpx.AsyncClient | None,
) -> AsyncGenerator[E, None]:
    """Read ``url``'s events, reconnecting with Last-Event-ID, until ``follow`` (which makes
    each event) says the stream is done or the server answers 204. ``eager``: a response that
    ended by itself after events is followed by a reconnect at once, not counted as a failure."""
    if client is not None and uds is not None:
        raise ValueError("pass either uds or client, not both")
    http = client or httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=uds) if uds else None, timeout=DEFAULT_TIMEOUT
    )
    server_delay: float | None = None
    failures = 0
    try:
        while True:
            headers = {"Accept": "text/event-stream"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if position:
                headers["Last-Event-ID"] = position
            status: int | None = None
            try:
                async with aconnect_sse(http, "GET", url, headers=headers) as source:
                    response = source.response
                    status = response.status_code
                    content_type = response.headers.get("content-type", "")
                    if status == 204:
                        return  # we already have the terminal event
                    if status == 200 and not content_type.startswith("text/event-stream"):
                        raise StreamClientError(
                            f"expected text/event-stream, got {content_type!r}",
                            status=status,
                            url=url,
                        )
                    if status != 200:
                        message = (await response.aread()).decode(errors="replace").strip()
                        if status not in RETRY_STATUSES:
                            raise StreamClientError(
                                message[:500] or response.reason_phrase, status=status, url=url
                            )
                        problem = f"{status} {message[:200]}"
                    else:
                        seen_id = ""  # httpx-sse repeats the last id for events without one
                        got_events = False
                        # Closed in this task when the loop stops early, not by the garbage
                        # collector in another (anyio's cancel scopes refuse that).
                        async with contextlib.aclosing(source.aiter_sse()) as events:
                            async for sse in events:
                                if sse.retry is not None:
                                    server_delay = sse.retry / 1000
                                if not sse.data:
                                    continue  # the opening comment and retry: no event to dispatch
                                event_id = sse.id if sse.id and sse.id != seen_id else None
                                seen_id = sse.id
                                event, done = follow(sse, event_id)
                                failures, got_events = 0, True
                                if event.id is not None:
                                    position = event.id
                                elif event.event == RESET_EVENT and forget_on_reset:
                                    position = None
                                yield event
                                if done:
                                    return
                        if eager and got_events:
                            continue
                        problem = "the stream ended before a terminal event"
            except httpx.TransportError as exc:
                problem, status = f"{type(exc).__name__}: {exc}", None
            failures += 1
            if max_reconnects is not None and failures > max_reconnects:
                raise StreamClientError(
                    f"gave up after {max_reconnects} reconnects: {problem}", status=status, url=url
                )
            base = reconnect_delay if reconnect_delay is not None else server_delay
            base = DEFAULT_RECONNECT_DELAY if base is None else base
            await asyncio.sleep(max(base, min(base * 2 ** (failures - 1), MAX_BACKOFF)))
    finally:
        if client is None:
            await http.aclose()


def iter_task_events(
    base_url: str,
    model: str,
    task_id: str | int,
    *,
    app_label: str | None = None,
    last_event_id: str | None = None,
    token: str | None = None,
    uds: str | None = None,
    reconnect_delay: float | None = None,
    max_reconnects: int | None = None,
) -> Generator[StreamEvent, None, None]:
    """:func:`stream_task` for synchronous code: runs it in an event loop of its own.

    Call it from a thread without a running event loop (a script, the shell, a worker thread);
    async code uses :func:`stream_task` directly.
    """
    yield from _run(stream_task(
        base_url, model, task_id, app_label=app_label, last_event_id=last_event_id, token=token,
        uds=uds, reconnect_delay=reconnect_delay, max_reconnects=max_reconnects,
    ))


def iter_tasks_events(
    base_url: str,
    refs: Iterable[TaskRef | str],
    *,
    last_event_id: str | None = None,
    token: str | None = None,
    uds: str | None = None,
    reconnect_delay: float | None = None,
    max_reconnects: int | None = None,
) -> Generator[TaskEvent, None, None]:
    """:func:`stream_tasks` for synchronous code, as :func:`iter_task_events` is for one task."""
    yield from _run(stream_tasks(
        base_url, refs, last_event_id=last_event_id, token=token, uds=uds,
        reconnect_delay=reconnect_delay, max_reconnects=max_reconnects,
    ))


def _run(events: AsyncGenerator[E, None]) -> Generator[E, None, None]:
    """Yield ``events`` from an event loop of this generator's own."""

    async def following() -> E | None:
        return await anext(events, None)

    with asyncio.Runner() as runner:
        try:
            while (event := runner.run(following())) is not None:
                yield event
        finally:
            runner.run(events.aclose())
