"""The Redis key scheme: every key streamcoord uses is built here and nowhere else.

All keys of one task share the hash tag ``{app_label.Model:pk}``, so a task's stream and state
land in one Redis Cluster slot and the append script may touch both::

    <prefix>:{<app>.<Model>:<pk>}:events   STREAM  the task's events; entry id <seq>-0
    <prefix>:{<app>.<Model>:<pk>}:state    HASH    state, epoch, last_seq, last_type, timestamps
    <prefix>:{<app>.<Model>:<pk>}:live     shard channel (SPUBLISH): each event as it is appended
    <prefix>:models                        HASH    lower-cased model names -> "app.Model"
    <prefix>:jobs                          STREAM  tasks to run; consumer group "workers"
    <prefix>:workers                       HASH    worker id -> JSON (host, pid, heartbeat, ...)
    <prefix>:worker:<id>:running           SET     labels of the tasks a worker runs now
    <prefix>:worker:<id>:control           STREAM  requests to one worker (cancel a task)
    <prefix>:dead                          STREAM  tasks that used up their attempts, malformed job entries
    <prefix>:gateways                      HASH    gateway id -> JSON (host, pid, address, heartbeat, ...)
"""

from __future__ import annotations

import dataclasses
import re

from .errors import InvalidTaskRef

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\Z")
# Task ids reach Redis keys and URLs: integers, UUIDs and slugs, nothing that could break a hash
# tag (braces) or a key's separators (colons).
_PK = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


@dataclasses.dataclass(frozen=True, slots=True)
class TaskRef:
    """Names one task: a Django model (app label and model name) and a primary key."""

    app_label: str
    model: str
    pk: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.app_label):
            raise InvalidTaskRef(f"invalid app label {self.app_label!r}")
        if not _NAME.match(self.model):
            raise InvalidTaskRef(f"invalid model name {self.model!r}")
        if not _PK.match(self.pk):
            raise InvalidTaskRef(
                f"invalid task id {self.pk!r}: use 1-64 letters, digits, '-' or '_'"
            )

    @property
    def label(self) -> str:
        """``app.Model:pk``, the task's name in logs, messages and hash tags."""
        return f"{self.app_label}.{self.model}:{self.pk}"

    @property
    def model_label(self) -> str:
        return f"{self.app_label}.{self.model}"

    @property
    def pk_json(self) -> int | str:
        """The task id as events carry it in ``_task_id``: a number for integer keys."""
        numeric = self.pk.isdigit() and len(self.pk) < 16 and str(int(self.pk)) == self.pk
        return int(self.pk) if numeric else self.pk  # "007" stays a string: it is not 7

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, label: str) -> TaskRef:
        """The inverse of :attr:`label`: ``app.Model:pk``."""
        model_label, sep, pk = label.partition(":")
        app_label, dot, model = model_label.partition(".")
        if not sep or not dot:
            raise InvalidTaskRef(f"invalid task label {label!r}: expected app.Model:pk")
        return cls(app_label, model, pk)


@dataclasses.dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds every key under one deployment prefix."""

    prefix: str = "sc"

    def events(self, ref: TaskRef) -> str:
        return f"{self.prefix}:{{{ref.label}}}:events"

    def state(self, ref: TaskRef) -> str:
        return f"{self.prefix}:{{{ref.label}}}:state"

    @staticmethod
    def state_of(events_key: bytes) -> bytes:
        """The state key of the task whose events key is given (same task, same hash tag)."""
        return events_key.removesuffix(b":events") + b":state"

    def live(self, ref: TaskRef) -> str:
        """The task's shard channel: ``append.lua`` publishes every event there as it appends
        it (same hash tag, so the same cluster slot and node as the stream)."""
        return f"{self.prefix}:{{{ref.label}}}:live"

    @staticmethod
    def live_of(events_key: bytes) -> bytes:
        """The shard channel of the task whose events key is given."""
        return events_key.removesuffix(b":events") + b":live"

    def models(self) -> str:
        return f"{self.prefix}:models"

    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker_running(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}:running"

    def worker_control(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}:control"

    def gateways(self) -> str:
        """The registry of gateway processes (HASH: gateway id -> JSON entry, like workers')."""
        return f"{self.prefix}:gateways"

    def dead_letters(self) -> str:
        return f"{self.prefix}:dead"
