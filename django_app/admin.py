"""The Django admin for StreamTasks: rows with their status, actions that start, cancel and
retry them through the coordinator, and a change page that shows the task's Redis state and
its events as they arrive.

One line in a project's ``admin.py`` registers every StreamTask model that has no admin yet::

    from django_app.admin import register_task_models

    register_task_models()                      # admin.site, StreamTaskAdmin

A model that wants more (its own fields in ``list_display``, say) subclasses
:class:`StreamTaskAdmin` and registers itself before that line. Nothing is registered when this
module is imported (Django's autodiscovery imports it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.text import Truncator
from django.views.decorators.http import require_POST
from redis.exceptions import RedisError

from streamcoord.errors import ConfigurationError, StreamcoordError
from streamcoord.taskstate import TaskState

from .coordinator import coordinator, task_models
from .models import Status, StreamTask

#: What a coordinator call may raise when Redis or the settings are not there: reported per
#: row (or in place of the state on the change page), never a server error.
UNAVAILABLE = (RedisError, OSError, StreamcoordError)

#: Ids named in a summary line before the rest are only counted.
IDS_SHOWN = 5


class Outcome(Protocol):
    """What the coordinator's start, cancel and retry return (``StartOutcome``,
    ``CancelOutcome``): true when something was done, and what happened in words."""

    def __bool__(self) -> bool: ...

    def describe(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class TaskAction:
    """One of the admin's task actions: what it calls, and when a row may get it."""

    name: str
    label: str
    call: Callable[[StreamTask], Outcome]
    #: Row statuses whose change page shows the button (the action itself takes any row).
    offered_when: frozenset[str]


def _actions() -> dict[str, TaskAction]:
    # Looked up at call time: tests and projects may wrap the coordinator's methods.
    return {
        "start": TaskAction("start", "Start", coordinator.start_task_sync, frozenset({Status.PENDING})),
        "cancel": TaskAction(
            "cancel", "Cancel", coordinator.cancel_task_sync,
            frozenset({Status.PENDING, Status.QUEUED, Status.RUNNING}),
        ),
        "retry": TaskAction(
            "retry", "Retry", coordinator.retry_task_sync,
            frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED}),
        ),
    }


@dataclasses.dataclass(frozen=True)
class RowResult:
    """What an action did to one row."""

    pk: Any
    done: bool
    text: str
    #: The call raised (Redis unreachable, a setting missing): the row was left as it was.
    failed: bool = False


def apply_action(action: TaskAction, tasks: Iterable[StreamTask]) -> list[RowResult]:
    """Run ``action`` on each task in turn; one row's failure does not stop the others."""
    results = []
    for task in tasks:
        try:
            outcome = action.call(task)
        except UNAVAILABLE as exc:
            results.append(RowResult(task.pk, False, f"failed: {exc}", failed=True))
        else:
            results.append(RowResult(task.pk, bool(outcome), outcome.describe()))
    return results


def summarize(label: str, results: Sequence[RowResult]) -> tuple[str, int]:
    """One message for the rows an action took, and its level: the rows grouped by what
    happened to them, in order of first appearance, with their ids, e.g. ``Start, 4 tasks:
    3 queued (ids 1, 2, 3); 1 not started: the task is already running (id 4)``."""
    groups: dict[str, list[Any]] = {}
    for result in results:
        groups.setdefault(result.text, []).append(result.pk)
    parts = [f"{len(pks)} {text} ({_ids(pks)})" for text, pks in groups.items()]
    count = f"{len(results)} task" + ("" if len(results) == 1 else "s")
    message = f"{label}, {count}: " + "; ".join(parts)
    if any(r.failed for r in results):
        level = messages.ERROR
    elif all(r.done for r in results):
        level = messages.SUCCESS
    else:
        level = messages.WARNING
    return message, level


def _ids(pks: list[Any]) -> str:
    shown = ", ".join(str(pk) for pk in pks[:IDS_SHOWN])
    more = f" and {len(pks) - IDS_SHOWN} more" if len(pks) > IDS_SHOWN else ""
    return ("id " if len(pks) == 1 else "ids ") + shown + more


class StreamTaskAdmin(admin.ModelAdmin):
    """The admin of a StreamTask model: status, times and error in the list; start, cancel
    and retry as actions (and as buttons on the change page); the Redis state and the live
    events on the change page."""

    list_display: tuple[str, ...] = (
        "task_id", "status", "attempt", "error_summary", "created_at", "updated_at", "completed_at",
    )
    list_filter = ("status", "created_at")
    search_fields = ("error",)
    search_help_text = "An id (exact), or words of the error."
    readonly_fields = ("status", "error", "final_value", "created_at", "updated_at", "completed_at")
    date_hierarchy = "created_at"
    actions = ("start_tasks", "cancel_tasks", "retry_tasks")
    change_form_template = "streamcoord/admin/change_form.html"
    #: Event types the change page listens for beyond streamcoord.js's own (``start``,
    #: ``progress``, ``attempt``, ``message`` and the terminal ones): a browser's EventSource
    #: delivers a named event only to a listener of that name.
    stream_event_types: tuple[str, ...] = ()
    #: Characters of ``error`` shown in the list.
    error_chars = 80

    # -- the list ------------------------------------------------------------------------------

    @admin.display(description="id", ordering="pk")
    def task_id(self, obj: StreamTask) -> str:
        return str(obj.pk)

    @admin.display(description="error", ordering="error")
    def error_summary(self, obj: StreamTask) -> str:
        return Truncator(obj.error).chars(self.error_chars)

    @admin.display(description="attempt")
    def attempt(self, obj: StreamTask) -> str:
        """Runs begun so far, from the Redis record (read for the whole page at once)."""
        state = getattr(obj, "_streamcoord_state", None)
        return str(state.attempt) if state is not None and state.attempt else "-"

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        """The page's rows, with their Redis records read in one round trip (for ``attempt``);
        without Redis the column shows ``-`` and the page still renders."""
        changelist = super().get_changelist_instance(request)
        rows = list(changelist.result_list)
        try:
            states = coordinator.task_states_sync(rows)
        except (RedisError, OSError, TimeoutError, StreamcoordError):
            states = [None] * len(rows)
        for row, state in zip(rows, states, strict=True):
            row._streamcoord_state = state
        return changelist

    def get_search_results(self, request: HttpRequest, queryset: Any, search_term: str) -> tuple[Any, bool]:
        """``search_fields``, and a row whose primary key is the term (any pk type: an id, a
        UUID with or without dashes, a slug)."""
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if not term:
            return found, may_have_duplicates
        try:
            pk = self.opts.pk.to_python(term)
        except ValidationError:
            return found, may_have_duplicates
        return found | queryset.filter(pk=pk), may_have_duplicates

    # -- the actions ---------------------------------------------------------------------------

    @admin.action(description="Start the selected tasks", permissions=["change"])
    def start_tasks(self, request: HttpRequest, queryset: Any) -> None:
        self._run(request, "start", queryset.order_by("pk"))

    @admin.action(description="Cancel the selected tasks", permissions=["change"])
    def cancel_tasks(self, request: HttpRequest, queryset: Any) -> None:
        self._run(request, "cancel", queryset.order_by("pk"))

    @admin.action(description="Retry the selected tasks (ended ones run again)", permissions=["change"])
    def retry_tasks(self, request: HttpRequest, queryset: Any) -> None:
        self._run(request, "retry", queryset.order_by("pk"))

    def _run(self, request: HttpRequest, name: str, tasks: Iterable[StreamTask]) -> None:
        action = _actions()[name]
        results = apply_action(action, tasks)
        if results:
            message, level = summarize(action.label, results)
            self.message_user(request, message, level)

    # -- the change page ------------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        info = self.opts.app_label, self.opts.model_name
        view = self.admin_site.admin_view(require_POST(self.task_action_view))
        run = path("<path:object_id>/task/<str:action>/", view, name="{}_{}_task_action".format(*info))
        return [run, *super().get_urls()]

    def task_action_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        """POST from a change page's button: the action on this one row, then back to its page."""
        if action not in _actions():
            raise PermissionDenied
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404(f"no {self.opts.verbose_name} with id {unquote(object_id)!r}")
        if not self.has_change_permission(request, obj):
            raise PermissionDenied
        self._run(request, action, [obj])
        return HttpResponseRedirect(self._change_url(obj))

    def _change_url(self, obj: StreamTask) -> str:
        info = self.opts.app_label, self.opts.model_name
        return reverse("admin:{}_{}_change".format(*info), args=(quote(obj.pk),), current_app=self.admin_site.name)

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], add: bool = False, change: bool = False,
        form_url: str = "", obj: StreamTask | None = None,
    ) -> HttpResponse:
        if obj is not None and not add:
            context.update(self.task_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def task_context(self, request: HttpRequest, obj: StreamTask) -> dict[str, Any]:
        """What the change page's task section shows: the Redis state record (or why not), the
        buttons this row's status offers, and whether its stream URL can be made (a token needs
        ``STREAMCOORD_SECRET``)."""
        state, state_note = self._task_state(obj)
        stream_note = ""
        try:
            obj.stream_url()
        except ConfigurationError as exc:
            stream_note = str(exc)
        buttons = []
        if self.has_change_permission(request, obj):
            info = self.opts.app_label, self.opts.model_name
            for action in _actions().values():
                if obj.status in action.offered_when:
                    url = reverse(
                        "admin:{}_{}_task_action".format(*info), args=(quote(obj.pk), action.name),
                        current_app=self.admin_site.name,
                    )
                    buttons.append({"name": action.name, "label": action.label, "url": url})
        return {
            "streamcoord_state": state,
            "streamcoord_state_note": state_note,
            "streamcoord_stream_note": stream_note,
            "streamcoord_buttons": buttons,
            "streamcoord_event_types": list(self.stream_event_types),
        }

    def _task_state(self, obj: StreamTask) -> tuple[TaskState | None, str]:
        try:
            state = coordinator.task_state_sync(obj)
        except UNAVAILABLE as exc:
            return None, f"Redis could not be read: {exc}"
        return state, "" if state is not None else "Redis holds no state record for this task"


def register_task_models(
    site: admin.AdminSite | None = None, admin_class: type[admin.ModelAdmin] = StreamTaskAdmin,
) -> list[type[StreamTask]]:
    """Register every StreamTask model of the project that ``site`` (default ``admin.site``)
    has no admin for, with ``admin_class``; returns the models it registered. Models already
    registered (with an admin of their own) are left alone, so calling it again is harmless."""
    site = admin.site if site is None else site
    added = [model for model in task_models() if not site.is_registered(model)]
    if added:
        site.register(added, admin_class)
    return added
