from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from streamcoord.errors import ConfigurationError

from .coordinator import coordinator
from .models import StreamTask

log = logging.getLogger(__name__)


def record_pending(sender: type, instance: Any, created: bool, raw: bool = False, **kwargs: Any) -> None:
    """post_save: record a new task as pending in Redis (for lazy start by any gateway)."""
    if not created or raw or not isinstance(instance, StreamTask):
        return
    try:
        coordinator.declare_sync(instance)
    except (RedisError, OSError, ConfigurationError) as exc:
        # The row is saved either way; only a lazy start on connect needs the record.
        log.warning("could not record task %s as pending in Redis: %s", instance.stream_ref, exc)
