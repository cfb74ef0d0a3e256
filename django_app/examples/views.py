"""The example pages: start an example task, then watch it live on a page of its own.

``GET /tasks/`` offers a form; ``POST /tasks/`` creates the row, starts it
(``coordinator.start_task_sync``) and redirects to ``GET /tasks/<model>/<pk>/``, which renders
the task's stream URL into the page (``{% stream_url task %}``) for ``streamcoord.js`` to follow.

Anyone who can open these pages may start and watch example tasks: a real application checks
who may watch a task before it renders the task's stream URL (the token in it is the permission).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods

from django_app.coordinator import coordinator
from django_app.models import StreamTask

from .models import ExportTask, ProgressTask

#: What the form offers: a label, the model, and the row's fields beyond steps and delay.
KINDS: dict[str, tuple[str, type[StreamTask], dict[str, Any]]] = {
    "progress": ("ProgressTask", ProgressTask, {}),
    "failing": ("ProgressTask that fails half-way", ProgressTask, {"fail_at": "half"}),
    "export": ("ExportTask (UUID primary key)", ExportTask, {}),
}
#: The models a watch page may show, by the name in its URL (``progresstask``).
MODELS: dict[str, type[StreamTask]] = {model._meta.model_name or "": model for _, model, _ in KINDS.values()}


class StartForm(forms.Form):
    kind = forms.ChoiceField(choices=[(kind, label) for kind, (label, _, _) in KINDS.items()])
    steps = forms.IntegerField(min_value=1, max_value=500, initial=20)
    delay = forms.FloatField(min_value=0, max_value=5, initial=0.25, help_text="seconds per step")


def create_task(kind: str, steps: int, delay: float) -> StreamTask:
    _, model, extra = KINDS[kind]
    fields: dict[str, Any] = {"steps": steps, "delay": delay}
    if extra.get("fail_at") == "half":
        fields["fail_at"] = max(1, steps // 2)
    return model.objects.create(**fields)


@require_http_methods(["GET", "POST"])
def tasks(request: HttpRequest) -> HttpResponse:
    """The form (GET); create and start a task, then show it (POST)."""
    form = StartForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        task = create_task(form.cleaned_data["kind"], form.cleaned_data["steps"], form.cleaned_data["delay"])
        coordinator.start_task_sync(task)
        # See Other: the browser GETs the task's page, and a reload does not start another task.
        response = redirect("examples:task", model=task._meta.model_name, pk=task.pk)
        response.status_code = 303
        return response
    status = 400 if form.is_bound else 200
    return render(request, "examples/tasks.html", {"form": form}, status=status)


@never_cache  # the page carries a stream token: no shared cache may keep it
@require_http_methods(["GET", "HEAD"])
def task(request: HttpRequest, model: str, pk: str) -> HttpResponse:
    """A task's page: its events, live, through ``streamcoord.js``."""
    task_model = MODELS.get(model)
    if task_model is None:
        raise Http404("no such task model")
    try:
        found = task_model.objects.get(pk=pk)
    except (task_model.DoesNotExist, ValidationError, ValueError):  # a malformed pk is no task
        raise Http404("no such task") from None
    return render(request, "examples/task.html", {"task": found})
