"""How the operator views look in a terminal: rich tables and plain lines, built from the
readings alone (pure: no Redis, no clock; tests render them to text).

Cells never cut a value short (``overflow="fold"``): an operator copies task labels and
worker ids out of these tables into the next command.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..presence import iso_of_ms
from .events import StreamEvent
from .records import TaskRecord
from .status import Status
from .tail import Reset, Stopped, StopReason, TailItem
from .tasks import TaskDetail, TaskListing

NONE = "-"


def duration(seconds: float | None) -> str:
    """A short human duration: ``0.4s``, ``42s``, ``3m04s``, ``2h05m``, ``3d04h``."""
    if seconds is None:
        return NONE
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _cell(value: Any) -> str:
    return NONE if value is None or value == "" else str(value)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", expand=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def status_view(status: Status) -> RenderableType:
    """``streamcoord status`` (and each frame of ``top``)."""
    queue = status.queue
    by_state = "  ".join(f"{state} {count}" for state, count in status.by_state.items())
    head = Text.assemble(
        ("streamcoord", "bold"), f"  at {status.at} (Redis clock)\n",
        ("queue  ", "bold"),
        f"length {queue.length}  waiting {queue.lag}  claimed {queue.pending}  "
        f"oldest wait {duration(queue.oldest_age_seconds)}\n",
        ("tasks  ", "bold"), by_state or NONE, "\n",
        ("dead letters  ", "bold"), str(status.dead_letter_count),
    )
    workers = _table(f"workers ({len(status.workers)})", "id", "host", "pid", "running", "heartbeat")
    for w in status.workers:
        workers.add_row(w.id, _cell(w.host), _cell(w.pid), f"{_cell(w.running)}/{_cell(w.concurrency)}",
                        f"{duration(w.heartbeat_age_seconds)} ago")
    gateways = _table(
        f"gateways ({len(status.gateways)})", "id", "host", "pid", "address", "listeners", "streams",
        "deliveries", "heartbeat",
    )
    for g in status.gateways:
        gateways.add_row(g.id, _cell(g.host), _cell(g.pid), _cell(g.address), _cell(g.listeners),
                         _cell(g.streams), _cell(g.deliveries), f"{duration(g.heartbeat_age_seconds)} ago")
    running = _table(
        f"running ({len(status.running)} longest shown)", "task", "state", "attempt", "worker", "last event", "for",
        "updated",
    )
    for r in status.running:
        running.add_row(r.task, r.state, _cell(r.attempt or None), _cell(r.worker),
                        _last_event(r.last_seq, r.last_type), duration(r.age_seconds), _cell(r.updated_at))
    dead = _table(f"latest dead letters (of {status.dead_letter_count})", "id", "task", "attempts", "reason", "at")
    for d in status.dead_letters:
        dead.add_row(d.id, d.task, _cell(d.attempts), d.reason, d.at)
    return Group(
        head,
        _or_none(workers, "workers: none registered (no worker has beaten lately)"),
        _or_none(gateways, "gateways: none registered"),
        _or_none(running, "running: none"),
        _or_none(dead, "dead letters: none"),
    )


def _or_none(table: Table, empty: str) -> RenderableType:
    """The table, or one line saying there is nothing (an empty table's frame is noise)."""
    return table if table.row_count else Text(empty, style="dim")


def _last_event(seq: int, event_type: str) -> str:
    return f"{seq} {event_type}" if seq else NONE


def tasks_view(listing: TaskListing) -> RenderableType:
    """``streamcoord tasks``: the newest matching tasks first."""
    table = _table(
        f"tasks: {len(listing.tasks)} shown of {listing.matched} matching ({listing.scanned} in Redis)",
        "task", "state", "attempt", "worker", "last event", "in state for", "updated",
    )
    for record in listing.tasks:
        table.add_row(*task_row(record, listing.at_ms))
    return table


def task_row(record: TaskRecord, now_ms: int) -> list[str]:
    return [
        record.ref.label, record.state, _cell(record.attempt or None), _cell(record.worker),
        _last_event(record.last_seq, record.last_type), duration(record.age_seconds(now_ms)),
        _cell(record.updated_at),
    ]


def task_view(detail: TaskDetail) -> RenderableType:
    """``streamcoord show``: the record, field by field, then the latest events."""
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    fields.add_row("task", detail.ref.label)
    fields.add_row("at", f"{iso_of_ms(detail.at_ms)} (Redis clock)")
    record = detail.to_json()["record"]
    if record is None:
        fields.add_row("record", "none (Redis knows nothing of this task's state)")
    else:
        for name, value in record.items():
            if value not in ("", 0, None) or name in ("state", "attempt"):
                fields.add_row(name, value if isinstance(value, str) else json.dumps(value))
    fields.add_row("stream", (
        f"{detail.length} events" + (f", from {detail.first_seq}" if detail.first_seq else "")
        + (f", expires in {duration(detail.stream_ttl)}" if detail.stream_ttl is not None else "")
    ))
    if detail.state_ttl is not None:
        fields.add_row("record expires in", duration(detail.state_ttl))
    fields.add_row("keys", f"{detail.events_key}  {detail.state_key}")
    events = _table(f"latest events ({len(detail.events)} of {detail.length})", "id", "type", "sent", "data")
    for event in detail.events:
        events.add_row(event.id, event.type, _cell(event.timestamp), _compact(event.body()))
    return Group(fields, events)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def event_line(event: StreamEvent) -> str:
    """One tail line: ``<epoch>-<seq>  <type>  <time>  <data without metadata>``."""
    return f"{event.id}  {event.type}  {event.timestamp or NONE}  {_compact(event.body())}"


def reset_line(reset: Reset) -> str:
    if reset.missing is not None:
        first, last = reset.missing
        gone = f"event {first}" if first == last else f"events {first}..{last}"
        return f"--- reset ({reset.reason}): {gone} are no longer in the stream (trimmed); going on after them"
    if reset.reason == "epoch":
        return (f"--- reset (epoch): the stream started anew (epoch {reset.epoch} -> {reset.new_epoch}); "
                "from its first event")
    return (f"--- reset ({reset.reason}): the stream now ends before the last event shown (Redis lost "
            "events); from its first event")


def stopped_line(stopped: Stopped) -> str:
    if stopped.reason == StopReason.GONE:
        return "--- the task has no stream and no state record in Redis (unknown, expired or deleted)"
    if stopped.reason == StopReason.EXPIRED:
        return f"--- the task is {stopped.state}; its stream expired before its last event could be shown"
    return f"--- the task is {stopped.state}: it ended at event {stopped.last_seq}, before the one asked for"


def tail_line(item: TailItem) -> str:
    """The text line of anything a tail gives."""
    if isinstance(item, StreamEvent):
        return event_line(item)
    if isinstance(item, Reset):
        return reset_line(item)
    return stopped_line(item)


def tail_json(item: TailItem) -> str:
    """The JSON line of anything a tail gives (``--json``)."""
    return json.dumps(item.to_json(), separators=(",", ":"), ensure_ascii=False)
