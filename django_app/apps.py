from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_save


class StreamcoordConfig(AppConfig):
    name = "django_app"
    label = "streamcoord"
    verbose_name = "streamcoord"

    def ready(self) -> None:
        # Imported once the models are loaded: the coordinator imports them.
        from .coordinator import coordinator
        from .models import StreamTask
        from .signals import record_pending

        StreamTask.writer_factory = coordinator.writer_for

        # Every new StreamTask row is recorded "pending" in Redis, so a gateway can lazily start
        # it on first connect without a database.
        post_save.connect(record_pending, dispatch_uid="streamcoord-record-pending")
