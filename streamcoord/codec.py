"""Events as they travel: validated and encoded once at send time, decoded from stream entries
and from the live messages that announce them.

A stream entry holds three fields, readable in ``redis-cli XRANGE``::

    epoch  the stream's epoch      type  the event type      data  the JSON the client receives

``append.lua`` publishes each entry it appends on the task's shard channel as one message of
four parts joined by line feeds (:func:`live_message`; seq, epoch and type hold none)::

    <seq>\n<epoch>\n<type>\n<data>

``data`` already carries ``_task_id``, ``_model``, ``_app`` and ``_timestamp``, so the gateway
sends it as it is: one encoding per event, none per client.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
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
#: Skipped entries remembered (stream, kind) before the memory starts over.
_SKIPS_REMEMBERED = 10_000

log = logging.getLogger(__name__)


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
        encoded = self._json(event_type, payload, "payload")
        stamp = (now or datetime.now(UTC)).isoformat()
        # Splice instead of copying the dict and encoding twice. The metadata comes last, so it
        # wins over any same-named key of the payload in every JSON parser.
        sep = b"," if len(encoded) > 2 else b""
        return encoded[:-1] + sep + f'{self._meta},"_timestamp":"{stamp}"}}'.encode()

    def encode_final_value(self, event_type: str, value: Any) -> str:
        """A run's final value (any JSON value, stored with its terminal event ``event_type``)
        as JSON text, held to the payloads' rules; raises :class:`EventRejected` subclasses."""
        return self._json(event_type, value, "final value").decode()

    def _json(self, event_type: str, value: Any, what: str) -> bytes:
        """``value`` as compact UTF-8 JSON: no NaN or Infinity, strict UTF-8, at most
        ``max_payload_bytes``."""
        try:
            encoded = _JSON.encode(value).encode()  # strict: a lone surrogate is no UTF-8
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            raise PayloadNotSerializable(self.ref.label, event_type, f"{what}: {exc}") from None
        if len(encoded) > self.max_payload_bytes:
            raise PayloadTooLarge(
                self.ref.label,
                event_type,
                f"{what} is {len(encoded)} bytes of JSON, the limit is {self.max_payload_bytes}"
                " (STREAMCOORD_MAX_PAYLOAD_BYTES)",
            )
        return encoded


class Frame(NamedTuple):
    """One event, encoded as an SSE frame: what gateways keep and send."""

    seq: int
    epoch: bytes
    terminal: bool
    data: bytes


class MalformedEntry(ValueError):
    """A stream entry no frame can be made of: written by hand, not by ``append.lua``.
    Readers skip it (internal: never reaches a client or a caller of the public API)."""

    def __init__(self, entry_id: bytes, kind: str) -> None:
        super().__init__(f"entry {entry_id!r}: {kind}")
        self.entry_id = entry_id
        #: What is wrong, in a few words that do not depend on the entry (one log line each).
        self.kind = kind


class Skipped(NamedTuple):
    """A malformed entry a reader skipped."""

    entry_id: bytes
    kind: str


def entry_frame(entry_id: bytes, fields: dict[bytes, bytes]) -> Frame:
    """An XRANGE/XREAD entry straight to its frame: what gateways do for every event they
    read, so with nothing decoded in between. Raises :class:`MalformedEntry` for an entry
    ``append.lua`` would not write (a missing field, an id other than ``<seq>-0``, an empty or
    non-alphanumeric epoch, an empty type or one with line breaks)."""
    try:
        head, _, tail = entry_id.partition(b"-")
        epoch, event_type, data = fields[b"epoch"], fields[b"type"], fields[b"data"]
        seq = int(head)
    except Exception:  # any shape at all: say what is wrong, off the hot path
        raise MalformedEntry(entry_id, _fault(fields)) from None
    if not epoch.isalnum():  # bytes: ASCII letters and digits, at least one
        raise MalformedEntry(entry_id, "epoch is empty or not letters and digits")
    frame = _sse_frame(seq, epoch, event_type, data)
    if frame is None:
        raise MalformedEntry(entry_id, "type is empty or holds a line break or NUL")
    if seq < 1 or tail != b"0":
        raise MalformedEntry(entry_id, "id is not <sequence>-0")
    return Frame(seq, epoch, event_type in _TERMINAL_TYPES, frame)


def live_message(seq: int, epoch: bytes, event_type: bytes, data: bytes) -> bytes:
    """The message ``append.lua`` publishes for the entry ``<seq>-0`` (written there in Lua;
    this is its reference, for tests and tools)."""
    return b"%d\n%s\n%s\n%s" % (seq, epoch, event_type, data)


def live_frame(message: bytes) -> Frame:
    """A live message straight to its frame, as :func:`entry_frame` does for an entry. Raises
    :class:`MalformedEntry` for a message ``append.lua`` would not publish (someone else's)."""
    parts = message.split(b"\n", 3)
    if len(parts) != 4 or not parts[0].isdigit():
        raise MalformedEntry(b"live", "message is not <seq>\\n<epoch>\\n<type>\\n<data>")
    head, epoch, event_type, data = parts
    seq = int(head)
    if seq < 1 or not epoch.isalnum():
        raise MalformedEntry(b"live", "sequence below 1, or an epoch not letters and digits")
    frame = _sse_frame(seq, epoch, event_type, data)
    if frame is None:
        raise MalformedEntry(b"live", "type is empty or holds a line break or NUL")
    return Frame(seq, epoch, event_type in _TERMINAL_TYPES, frame)


def entry_frames(entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> tuple[list[Frame], list[Skipped]]:
    """The frames of ``entries`` (oldest first), and the malformed entries skipped."""
    try:  # the usual case, at the speed of a comprehension
        return [entry_frame(entry_id, fields) for entry_id, fields in entries], []
    except MalformedEntry:
        pass
    frames: list[Frame] = []
    skipped: list[Skipped] = []
    for entry_id, fields in entries:
        try:
            frames.append(entry_frame(entry_id, fields))
        except MalformedEntry as exc:
            skipped.append(Skipped(exc.entry_id, exc.kind))
    return frames, skipped


class SkipLog:
    """Logs malformed entries that readers skipped: each kind once per stream, so a stream
    full of them (or many clients reading it) does not flood the log. One per process."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def report(self, key: str | bytes, skipped: Iterable[Skipped]) -> None:
        name = key.decode(errors="replace") if isinstance(key, bytes) else key
        for entry in skipped:
            if (name, entry.kind) in self._seen:
                continue
            if len(self._seen) >= _SKIPS_REMEMBERED:
                self._seen.clear()
            self._seen.add((name, entry.kind))
            log.warning(
                "skipped malformed entry %s of stream %s: %s (not written by streamcoord;"
                " further entries of this kind in this stream are skipped without a log line)",
                entry.entry_id.decode(errors="replace"), name, entry.kind,
            )


def _fault(fields: object) -> str:
    if not isinstance(fields, dict):
        return "fields are not a hash"
    for name in (b"epoch", b"type", b"data"):
        if not isinstance(fields.get(name), bytes):
            return f"no {name.decode()} field"
    return "id is not <sequence>-0"


def _sse_frame(seq: int, epoch: bytes, event_type: bytes, data: bytes) -> bytes | None:
    """The frame's bytes, or None for a type SSE cannot carry (a hand-written entry)."""
    head = event_type + epoch
    if not event_type or b"\n" in head or b"\r" in head or b"\0" in head:
        return None
    if b"\n" in data or b"\r" in data:
        return sse.encode_event(data, event=event_type, id=epoch + b"-%d" % seq)  # data lines
    # The usual case (compact JSON, a checked type): one formatting step.
    return b"id: %s-%d\nevent: %s\ndata: %s\n\n" % (epoch, seq, event_type, data)
