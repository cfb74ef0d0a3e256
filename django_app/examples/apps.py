from __future__ import annotations

from django.apps import AppConfig


class ExamplesConfig(AppConfig):
    name = "django_app.examples"
    label = "examples"
    verbose_name = "streamcoord examples"
    default_auto_field = "django.db.models.BigAutoField"
