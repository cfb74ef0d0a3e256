"""streamcoord: long-running tasks that stream their events through Redis to SSE clients.

The core is framework-free: it never imports Django. Django imports it (``django_app``).
"""

from .errors import (
    AppendError,
    ConfigurationError,
    EventRejected,
    InvalidEventId,
    InvalidEventType,
    InvalidTaskRef,
    PayloadNotSerializable,
    PayloadTooLarge,
    StreamcoordError,
    TaskEnded,
    TaskFailure,
    UnknownTask,
    WriterFenced,
)
from .eventlog import EventLog, TaskWriter
from .ids import EventId, parse_event_id
from .keys import KeySpace, TaskRef
from .settings import Settings
from .taskstate import State, TaskState

__version__ = "0.1.0"

__all__ = [
    "AppendError",
    "ConfigurationError",
    "EventId",
    "EventLog",
    "EventRejected",
    "InvalidEventId",
    "InvalidEventType",
    "InvalidTaskRef",
    "KeySpace",
    "PayloadNotSerializable",
    "PayloadTooLarge",
    "Settings",
    "State",
    "StreamcoordError",
    "TaskEnded",
    "TaskFailure",
    "TaskRef",
    "TaskState",
    "TaskWriter",
    "UnknownTask",
    "WriterFenced",
    "__version__",
    "parse_event_id",
]
