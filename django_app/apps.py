from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class StreamcoordConfig(AppConfig):
    name = "django_app"
    label = "streamcoord"
    verbose_name = "streamcoord"

    def ready(self) -> None:
        # Imported once the models are loaded: the coordinator imports them.
        from . import checks  # noqa: F401  (registers the STREAMCOORD settings checks)
        from .coordinator import coordinator
        from .models import StreamTask
        from .signals import forget_deleted, record_pending

        StreamTask.writer_factory = coordinator.writer_for

        # Rows and Redis in step (signals.py): new rows recorded pending, deleted rows' keys gone.
        post_save.connect(record_pending, dispatch_uid="streamcoord-record-pending")
        post_delete.connect(forget_deleted, dispatch_uid="streamcoord-forget-deleted")
