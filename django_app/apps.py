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
        from .coordinator import coordinator, task_models
        from .models import StreamTask
        from .signals import forget_deleted, record_pending

        StreamTask.writer_factory = coordinator.writer_for

        # Rows and Redis in step (signals.py): new rows recorded pending, deleted rows' keys
        # gone. Per task model (every model is loaded by now): a post_delete receiver for all
        # models would turn off the fast deletes of every other model of the project.
        for model in task_models():
            label = model._meta.label
            post_save.connect(record_pending, sender=model, dispatch_uid=f"streamcoord-record-pending-{label}")
            post_delete.connect(forget_deleted, sender=model, dispatch_uid=f"streamcoord-forget-deleted-{label}")
