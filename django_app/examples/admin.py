"""The example project's admin: every example task model, with start, cancel and retry, and
its events live on each task's page (``django_app.admin``)."""

from __future__ import annotations

from django.contrib import admin

from django_app.admin import StreamTaskAdmin, register_task_models

from .models import ContinueTask


@admin.register(ContinueTask)
class ContinueTaskAdmin(StreamTaskAdmin):
    """A model with event types of its own: the change page listens for them too."""

    list_display = (*StreamTaskAdmin.list_display, "continue_field")
    stream_event_types = ("started", "final")


register_task_models()  # every other task model, with StreamTaskAdmin
