"""The example pages (see ``views``; ``many``: many tasks on one connection)."""

from __future__ import annotations

from django.urls import URLPattern, path
from django.views.generic import RedirectView

from . import many, views

app_name = "examples"

urlpatterns: list[URLPattern] = [
    path("", RedirectView.as_view(pattern_name="examples:tasks"), name="index"),
    path("tasks/", views.tasks, name="tasks"),
    path("tasks/many/", many.many, name="many"),
    path("tasks/many/more/", many.more, name="many-more"),
    path("tasks/<str:model>/<str:pk>/", views.task, name="task"),
]
