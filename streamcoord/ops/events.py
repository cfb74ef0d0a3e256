"""A task's stream entries decoded for people (the gateway never decodes them: it sends frames).

An entry is ``<seq>-0 {epoch, type, data}`` (see :mod:`streamcoord.codec`); ``data`` is the JSON
object clients receive, with ``_task_id``, ``_model``, ``_app`` and ``_timestamp`` spliced in.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..taskstate import TERMINAL_EVENTS

#: The metadata every payload carries; the text views leave it out (the task is named once).
META_FIELDS = ("_task_id", "_model", "_app", "_timestamp")


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEvent:
    seq: int
    epoch: str
    type: str
    data: str  #: the JSON text, as clients receive it

    @property
    def id(self) -> str:
        """The event's SSE id, ``<epoch>-<seq>`` (what a client resumes with)."""
        return f"{self.epoch}-{self.seq}"

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def payload(self) -> Any:
        """The data as JSON (the raw text when it is none: a hand-written entry)."""
        try:
            return json.loads(self.data)
        except ValueError:
            return self.data

    @property
    def timestamp(self) -> str:
        """When it was sent (``_timestamp``, ISO 8601), or ''."""
        payload = self.payload
        stamp = payload.get("_timestamp") if isinstance(payload, dict) else None
        return stamp if isinstance(stamp, str) else ""

    def body(self) -> Any:
        """The payload without the metadata: what the task itself sent."""
        payload = self.payload
        if not isinstance(payload, dict):
            return payload
        return {k: v for k, v in payload.items() if k not in META_FIELDS}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "epoch": self.epoch, "type": self.type, "data": self.payload}


def event_of(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEvent | None:
    """An XRANGE/XREAD entry decoded; None for one ``append.lua`` would not write (no epoch,
    type or data, an id other than ``<seq>-0``): a tool shows what it can and goes on."""
    raw_id = entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id
    head, _, tail = raw_id.partition("-")
    if not head.isdigit() or tail != "0" or int(head) < 1:
        return None
    try:
        epoch, event_type, data = fields[b"epoch"], fields[b"type"], fields[b"data"]
    except KeyError:
        return None
    return StreamEvent(
        int(head), epoch.decode(errors="replace"), event_type.decode(errors="replace"), data.decode(errors="replace")
    )


def events_of(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[StreamEvent]:
    """The decodable events of ``entries``, in their order."""
    return [event for event in (event_of(i, f) for i, f in entries) if event is not None]
