"""Rows and their Redis keys, kept in step: a new row is recorded ``pending`` (so a gateway can
start it lazily on first connect, without a database), a deleted row's keys go. Both wait for
the transaction to commit (:mod:`django_app.commits`). Connected per StreamTask model
(``apps.py``), so other models keep Django's fast deletes."""

from __future__ import annotations

import copy
from typing import Any

from .commits import after_commit
from .coordinator import coordinator
from .models import StreamTask


def record_pending(sender: type, instance: Any, created: bool, raw: bool = False, using: str = "default", **kwargs: Any) -> None:
    """post_save: record a new task as pending in Redis once its row is committed."""
    if created and not raw and isinstance(instance, StreamTask):
        task = copy.copy(instance)  # as it is now (see forget_deleted)
        after_commit(lambda: coordinator.declare_sync(task), using, f"record task {task.pk} as pending")


def forget_deleted(sender: type, instance: Any, using: str = "default", **kwargs: Any) -> None:
    """post_delete: remove the task's keys once the delete is committed (a running task is
    cancelled instead)."""
    if isinstance(instance, StreamTask):
        # A copy: Django clears a deleted instance's pk right after its delete, before an outer
        # transaction commits.
        task = copy.copy(instance)
        after_commit(lambda: coordinator.forget_sync(task), using, f"remove the keys of deleted task {task.pk}")
