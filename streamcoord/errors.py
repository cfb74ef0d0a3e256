"""Every exception streamcoord raises on purpose.

    StreamcoordError
    ├── ConfigurationError        a setting is missing or wrong
    ├── InvalidTaskRef (ValueError)   an app label, model name or task id that cannot name a task
    ├── InvalidEventId (ValueError)   a Last-Event-ID that is not one of ours
    ├── UnknownTask (LookupError)     no state record and no stream for that task
    ├── TaskFailure               raised by a task: a failure its watchers may read about
    ├── EventRejected (ValueError)    an event refused before it reached Redis
    │   ├── InvalidEventType
    │   ├── PayloadNotSerializable
    │   └── PayloadTooLarge
    └── AppendError               Redis refused an append
        ├── TaskEnded                 the task already has its terminal event
        └── WriterFenced              another writer owns the stream now (different epoch)

Messages say what happened and, where a user can act, what to do.
"""

from __future__ import annotations


class StreamcoordError(Exception):
    """Base class of every streamcoord error."""


class ConfigurationError(StreamcoordError):
    """A setting is missing or has a value streamcoord cannot use."""


class InvalidTaskRef(StreamcoordError, ValueError):
    """An app label, model name or task id that cannot name a task."""


class InvalidEventId(StreamcoordError, ValueError):
    """A Last-Event-ID that streamcoord never issued (wrong shape, too long, out of range)."""


class EventRejected(StreamcoordError, ValueError):
    """An event refused at send time; nothing of it reached Redis."""

    def __init__(self, task: str, event_type: str, reason: str) -> None:
        self.task = task
        self.event_type = event_type
        self.reason = reason
        super().__init__(f"event {event_type!r} of task {task} refused: {reason}")


class InvalidEventType(EventRejected):
    """The event type is empty, too long, reserved, or has characters SSE cannot carry."""


class PayloadNotSerializable(EventRejected):
    """The payload is not a JSON object of JSON-serializable values."""


class PayloadTooLarge(EventRejected):
    """The payload's JSON is larger than ``Settings.max_payload_bytes``."""


class AppendError(StreamcoordError):
    """Redis refused to append an event to a task's stream."""


class TaskEnded(AppendError):
    """The task already has its terminal event; a run ends exactly once."""


class WriterFenced(AppendError):
    """Another writer owns the task's stream now (its epoch differs from this writer's)."""


class TaskFailure(StreamcoordError):
    """Raise it from ``process()`` to end the run with a message meant for the task's watchers:
    its text goes into the ``error`` event as it is. Any other exception's text stays in the
    worker's log and the row (the event says only its type), unless
    ``Settings.expose_errors`` is on."""


class UnknownTask(StreamcoordError, LookupError):
    """No task of that name has a state record or a stream (never created, or expired)."""
