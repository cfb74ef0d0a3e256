"""Events as they travel: validated and encoded once at send time, decoded from stream entries.

A stream entry holds three fields, readable in ``redis-cli XRANGE``::

    epoch  the stream's epoch      type  the event type      data  the JSON the client receives

``data`` already carries ``_task_id``, ``_model``, ``_app`` and ``_timestamp``, so the gateway
sends it as it is: one encoding per event, none per client.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, NamedTuple

from . import sse
from .errors import InvalidEventType, PayloadNotSerializable, PayloadTooLarge
from .keys import TaskRef
from .taskstate import TERMINAL_EVENTS

#: Types the gateway itself sends; a task may not send them.
RESERVED_TYPES = frozenset({"reset", "message"})
_TERMINAL_TYPES = frozenset(t.encode() for t in TERMINAL_EVENTS)
#: One encoder for every payload: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")


def check_event_type(ref: TaskRef, event_type: str) -> None:
    if not isinstance(event_type, str) or not _EVENT_TYPE.match(event_type):
        raise InvalidEventType(
            ref.label, str(event_type), "event types are 1-64 letters, digits or '_.:-'"
        )
    if event_type in RESERVED_TYPES:
        raise InvalidEventType(ref.label, event_type, "this event type is reserved")


class DataEncoder:
    """Encodes one task's payloads, with the task's metadata spliced in once per event."""

    def __init__(self, ref: TaskRef, max_payload_bytes: int) -> None:
        self.ref = ref
        self.max_payload_bytes = max_payload_bytes
        meta = {"_task_id": ref.pk_json, "_model": ref.model, "_app": ref.app_label}
        self._meta = json.dumps(meta, separators=(",", ":"))[1:-1]

    def encode(self, event_type: str, payload: Any, now: datetime | None = None) -> bytes:
        """The event's ``data`` as UTF-8 JSON; raises :class:`EventRejected` subclasses."""
        check_event_type(self.ref, event_type)
        if not isinstance(payload, dict):
            raise PayloadNotSerializable(
                self.ref.label, event_type, f"payload must be a dict, not {type(payload).__name__}"
            )
        try:
            body = _JSON.encode(payload)
            encoded = body.encode()  # strict: a lone surrogate is not valid UTF-8 for any client
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            raise PayloadNotSerializable(self.ref.label, event_type, str(exc)) from None
        if len(encoded) > self.max_payload_bytes:
            raise PayloadTooLarge(
                self.ref.label,
                event_type,
                f"payload is {len(encoded)} bytes of JSON, the limit is {self.max_payload_bytes}"
                " (STREAMCOORD_MAX_PAYLOAD_BYTES)",
            )
        stamp = (now or datetime.now(UTC)).isoformat()
        # Splice instead of copying the dict and encoding twice. The metadata comes last, so it
        # wins over any same-named key of the payload in every JSON parser.
        sep = b"," if len(encoded) > 2 else b""
        return encoded[:-1] + sep + f'{self._meta},"_timestamp":"{stamp}"}}'.encode()


class Frame(NamedTuple):
    """One event, encoded as an SSE frame: what gateways keep and send."""

    seq: int
    epoch: bytes
    terminal: bool
    data: bytes


def entry_frame(entry_id: bytes, fields: dict[bytes, bytes]) -> Frame:
    """An XRANGE/XREAD entry straight to its frame: what gateways do for every event they
    read, so with nothing decoded in between."""
    seq, epoch, event_type = int(entry_id.partition(b"-")[0]), fields[b"epoch"], fields[b"type"]
    frame = _sse_frame(seq, epoch, event_type, fields[b"data"])
    return Frame(seq, epoch, event_type in _TERMINAL_TYPES, frame)


def _sse_frame(seq: int, epoch: bytes, event_type: bytes, data: bytes) -> bytes:
    head = event_type + epoch
    if b"\n" in data or b"\r" in data or b"\n" in head or b"\r" in head or b"\0" in head:
        # Split into data lines, or refused (a hand-written entry with a broken epoch or type).
        return sse.encode_event(data, event=event_type, id=epoch + b"-%d" % seq)
    # The usual case (compact JSON, a checked type): one formatting step.
    return b"id: %s-%d\nevent: %s\ndata: %s\n\n" % (epoch, seq, event_type, data)
