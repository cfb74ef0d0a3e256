"""A task's state record: the one home of its state names, transitions and hash fields.

Every task has one small hash beside its event stream, ``<prefix>:{app.Model:pk}:state``
(``HGETALL`` it in redis-cli). The Lua scripts (``*.lua`` beside this module) are the only
writers; they spell the names below as string literals, and ``tests/test_taskstate.py`` checks
that every name a script uses is defined here. The state moves like this::

    (none) ──declare──▶ pending ──start──▶ queued ──begin (a worker)──▶ running ──terminal event──▶ completed
       │                  │                 │ ▲                        │  ▲                       failed
       └──────start───────┼─────────────────┘ │                        │  │ recover (lease         cancelled
                          └──cancel──▶ cancelling ──cancelled event──▶ │  │ expired: a new run)
                                                                       └──┘

An ended task (completed, failed, cancelled) stays so until it expires, or until a retry
(``retry.lua``) makes it ``pending`` again with its old stream gone. A deleted row's record is
removed unless the task runs (``forget.lua``).

``cancelling`` is Redis-only: a task asked to stop before any worker began it, until its
``cancelled`` event is written. Django's ``Status`` holds every other name.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any


class State(enum.StrEnum):
    """Where a task is in its life (the record's ``state`` field)."""

    PENDING = "pending"  #: recorded, not asked to run (the gateway may start it lazily)
    QUEUED = "queued"  #: asked to run; its job waits in the queue for a worker
    RUNNING = "running"  #: a worker holds its lease and runs it (or events arrive from outside)
    CANCELLING = "cancelling"  #: cancelled before a worker began it; ``cancelled`` follows
    COMPLETED = "completed"  #: ended with ``complete``
    FAILED = "failed"  #: ended with ``error``
    CANCELLED = "cancelled"  #: ended with ``cancelled``


#: The event types that end a run, and the state each one records.
TERMINAL_EVENTS: dict[str, State] = {
    "complete": State.COMPLETED,
    "error": State.FAILED,
    "cancelled": State.CANCELLED,
}
#: States a task leaves only by a retry (else its stream and record expire).
ENDED: frozenset[State] = frozenset(TERMINAL_EVENTS.values())
#: Every move the scripts make, as (from, to); ``None`` is "no record". A test walks the scripts
#: and checks none moves otherwise.
TRANSITIONS: frozenset[tuple[State | None, State]] = frozenset(
    {
        (None, State.PENDING),  # declare
        (None, State.QUEUED),  # start
        (State.PENDING, State.QUEUED),  # start, lazy start
        (State.QUEUED, State.RUNNING),  # begin
        (State.RUNNING, State.RUNNING),  # recover: a new run takes over
        (State.PENDING, State.CANCELLING),
        (State.QUEUED, State.CANCELLING),
        # An event appended while no worker runs the task (the record was lost, or events come
        # from outside a worker) makes it running.
        (None, State.RUNNING),
        (State.PENDING, State.RUNNING),
        (State.QUEUED, State.RUNNING),
        (State.CANCELLING, State.RUNNING),
        *((before, end) for before in (None, State.PENDING, State.QUEUED, State.RUNNING, State.CANCELLING) for end in ENDED),
        # retry: an ended task made new again (its old stream goes with it)
        *((end, State.PENDING) for end in ENDED),
    }
)


class Field(enum.StrEnum):
    """The record's hash fields. Times ending in ``_at`` are ISO 8601 (UTC); ``lease_until``
    is milliseconds of the Redis server's clock."""

    STATE = "state"  #: a :class:`State`
    CREATED_AT = "created_at"  #: when Redis first heard of the task
    QUEUED_AT = "queued_at"  #: when it was started
    JOB = "job"  #: the id of its entry in the job queue, once that entry exists
    STARTING_UNTIL = "starting_until"  #: a start adds the job until then (Redis clock, ms)
    WORKER = "worker"  #: the worker that runs (or ran) it
    RUN = "run"  #: the current run's token: only that run may append
    ATTEMPT = "attempt"  #: runs begun so far (1 on the first)
    RUNNING_SINCE = "running_since"  #: when the current run began
    LEASE_UNTIL = "lease_until"  #: the current run's lease ends here (Redis clock, ms)
    CANCEL_REQUESTED_AT = "cancel_requested_at"  #: when a cancel was asked for
    EPOCH = "epoch"  #: the event stream's epoch (a new one when the stream starts anew)
    LAST_SEQ = "last_seq"  #: the sequence of the last event written
    LAST_TYPE = "last_type"  #: the type of the last event written
    WRITER = "writer"  #: the token of the writer of the last event
    STARTED_AT = "started_at"  #: when the stream's first event was written
    UPDATED_AT = "updated_at"  #: when the last event was written
    ENDED_AT = "ended_at"  #: when the terminal event was written
    END_DATA = "end_data"  #: the terminal event's data (kept after the stream expires)
    FINAL_VALUE = "final_value"  #: the run's return value, JSON


@dataclasses.dataclass(frozen=True, slots=True)
class TaskState:
    """A task's state record, decoded (every :class:`Field`; absent ones are empty)."""

    state: str
    created_at: str = ""
    queued_at: str = ""
    job: str = ""
    starting_until: int = 0
    worker: str = ""
    run: str = ""
    attempt: int = 0
    running_since: str = ""
    lease_until: int = 0
    cancel_requested_at: str = ""
    epoch: str = ""
    last_seq: int = 0
    last_type: str = ""
    writer: str = ""
    started_at: str = ""
    updated_at: str = ""
    ended_at: str = ""
    end_data: bytes = b""
    final_value: Any = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def awaits_start(self) -> bool:
        """Pending, or queued without a job: a start cut off before its job reached the queue,
        which the next start completes (``start.lua``)."""
        return self.state == State.PENDING or (self.state == State.QUEUED and not self.job)

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> TaskState | None:
        """Decode ``HGETALL`` of the record; None when there is no record. Unknown fields are
        ignored, and a malformed number reads as 0 (a hand edit must not break readers)."""
        if not raw:
            return None
        values: dict[str, Any] = {}
        for name, value in raw.items():
            field = name.decode(errors="replace")
            if field not in _KINDS:
                continue
            kind = _KINDS[field]
            if kind is bytes:
                values[field] = value
            elif kind is int:
                values[field] = _int(value)
            elif field == Field.FINAL_VALUE:
                values[field] = _json(value)
            else:
                values[field] = value.decode(errors="replace")
        values.setdefault(Field.STATE.value, "")
        return cls(**values)


#: How each field decodes: text, but for these.
_KINDS: dict[str, type] = {field.value: str for field in Field} | {
    Field.END_DATA: bytes,
    Field.ATTEMPT: int,
    Field.LEASE_UNTIL: int,
    Field.STARTING_UNTIL: int,
    Field.LAST_SEQ: int,
}


def _int(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def _json(value: bytes) -> Any:
    try:
        return json.loads(value) if value else None
    except ValueError:
        return None
