"""Rows and their Redis keys, kept in step: a new row is recorded ``pending`` (so a gateway can
start it lazily on first connect, without a database), a deleted row's keys go. Both wait for
the transaction to commit: Redis never hears of a row that was rolled back."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction
from redis.exceptions import RedisError

from streamcoord.errors import ConfigurationError

from .coordinator import coordinator
from .models import StreamTask

log = logging.getLogger(__name__)


def record_pending(sender: type, instance: Any, created: bool, raw: bool = False, using: str = "default", **kwargs: Any) -> None:
    """post_save: record a new task as pending in Redis once its row is committed."""
    if created and not raw and isinstance(instance, StreamTask):
        _on_commit(coordinator.declare_sync, instance, using, "record task %s as pending")


def forget_deleted(sender: type, instance: Any, using: str = "default", **kwargs: Any) -> None:
    """post_delete: remove the task's keys once the delete is committed (a running task is
    cancelled instead)."""
    if isinstance(instance, StreamTask):
        _on_commit(coordinator.forget_sync, instance, using, "remove the keys of deleted task %s")


def _on_commit(call: Callable[[StreamTask], object], instance: StreamTask, using: str, what: str) -> None:
    # A copy: Django clears a deleted instance's pk right after its delete, before an outer
    # transaction commits.
    task = copy.copy(instance)

    def run() -> None:
        try:
            call(task)
        except (RedisError, OSError, TimeoutError, ConfigurationError) as exc:
            # The row is saved (or deleted) either way; Redis is told again by the next start
            # (start.lua records an unknown task), and keys left over expire or are cleaned up.
            log.warning("could not " + what + " in Redis: %s", task.stream_ref, exc)

    transaction.on_commit(run, using=using)
