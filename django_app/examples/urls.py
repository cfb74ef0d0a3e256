"""The example pages (see ``views``)."""

from __future__ import annotations

from django.urls import URLPattern, path
from django.views.generic import RedirectView

from . import views

app_name = "examples"

urlpatterns: list[URLPattern] = [
    path("", RedirectView.as_view(pattern_name="examples:tasks"), name="index"),
    path("tasks/", views.tasks, name="tasks"),
    path("tasks/<str:model>/<str:pk>/", views.task, name="task"),
]
