"""The example page of many tasks on one connection: start a batch, watch every bar on one page.

``GET /tasks/many/`` offers a form; ``POST /tasks/many/`` creates and starts that many
``ProgressTask`` rows and redirects to ``GET /tasks/many/?pk=1&pk=2...``, which renders one
streams URL for all of them (``{% streams_url tasks %}``): ``streamcoord.follow`` reads every
task's events from one EventSource (``GET /streams`` on the gateways), so the page holds one of
the browser's six HTTP/1.1 connections to their origin however many tasks it shows.

``POST /tasks/many/more/`` starts one more task and answers with a streams URL (a new token)
covering it and the tasks the page still follows (``pk``): the page's ``watch.add`` moves to it.
As the other example pages, anyone may start and watch these tasks; a real application checks
who may watch each task before it signs a URL for it.
"""

from __future__ import annotations

from django import forms
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from django_app import access
from django_app.coordinator import coordinator

from .models import ProgressTask


class ManyForm(forms.Form):
    # One connection follows at most 100 tasks (STREAMCOORD_MAX_TASKS_PER_STREAM's default).
    count = forms.IntegerField(min_value=1, max_value=100, initial=20)
    steps = forms.IntegerField(min_value=1, max_value=500, initial=20)
    delay = forms.FloatField(min_value=0, max_value=5, initial=0.25, help_text="seconds per step")


class MoreForm(forms.Form):
    steps = forms.IntegerField(min_value=1, max_value=500)
    delay = forms.FloatField(min_value=0, max_value=5)


def start_progress_task(steps: int, delay: float) -> ProgressTask:
    task = ProgressTask.objects.create(steps=steps, delay=delay)
    coordinator.start_task_sync(task)
    return task


def followed(pks: list[str]) -> list[ProgressTask]:
    """The tasks ``pks`` name (a request's ``pk`` list), in their order; unknown ones left out."""
    numbers = list(dict.fromkeys(int(pk) for pk in pks if pk.isdigit()))[:100]
    found = ProgressTask.objects.in_bulk(numbers)
    return [found[pk] for pk in numbers if pk in found]


@never_cache  # the page carries a stream token: no shared cache may keep it
@require_http_methods(["GET", "HEAD", "POST"])
def many(request: HttpRequest) -> HttpResponse:
    """The form (GET without ``pk``); the tasks' page (GET with ``pk``); start a batch (POST)."""
    if request.method == "POST":
        form = ManyForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            tasks = [start_progress_task(data["steps"], data["delay"]) for _ in range(data["count"])]
            query = "&".join(f"pk={task.pk}" for task in tasks)
            # See Other: a reload of the page it leads to starts nothing.
            return HttpResponse(status=303, headers={"Location": f"{reverse('examples:many')}?{query}"})
        return render(request, "examples/many.html", {"form": form}, status=400)
    tasks = followed(request.GET.getlist("pk"))
    if not tasks:
        return render(request, "examples/many.html", {"form": ManyForm()})
    return render(request, "examples/many.html", {"tasks": tasks, "first": tasks[0]})


@never_cache  # the answer carries a stream token
@require_POST
def more(request: HttpRequest) -> JsonResponse:
    """Start one more task; a streams URL for it and the tasks the page still follows."""
    form = MoreForm(request.POST)
    if not form.is_valid():
        return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
    task = start_progress_task(form.cleaned_data["steps"], form.cleaned_data["delay"])
    refs = [t.stream_ref for t in followed(request.POST.getlist("pk"))] + [task.stream_ref]
    return JsonResponse({"task": task.stream_ref.label, "url": access.streams_url(refs)})
