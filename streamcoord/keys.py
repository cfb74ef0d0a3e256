"""The Redis key scheme: every key streamcoord uses is built here and nowhere else.

All keys of one task share the hash tag ``{app_label.Model:pk}``, so a task's stream and state
land in one Redis Cluster slot and the append script may touch both::

    <prefix>:{<app>.<Model>:<pk>}:events   STREAM  the task's events; entry id <seq>-0
    <prefix>:{<app>.<Model>:<pk>}:state    HASH    state, epoch, last_seq, last_type, timestamps
    <prefix>:models                        HASH    lower-cased model names -> "app.Model"
    <prefix>:gateway:<id>:wake             STREAM  wakes one gateway's reader when it gains a stream
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


@dataclasses.dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds every key under one deployment prefix."""

    prefix: str = "sc"

    def events(self, ref: TaskRef) -> str:
        return f"{self.prefix}:{{{ref.label}}}:events"

    def state(self, ref: TaskRef) -> str:
        return f"{self.prefix}:{{{ref.label}}}:state"

    def models(self) -> str:
        return f"{self.prefix}:models"

    def gateway_wake(self, gateway_id: str) -> str:
        return f"{self.prefix}:gateway:{gateway_id}:wake"
