from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Q
from django.utils import timezone

from django_app import conf
from django_app.coordinator import task_models
from django_app.models import Status
from streamcoord.connection import sync_client
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.taskstate import ENDED, Field, State

#: Keys (and rows) handled per pipeline (and per DELETE).
CHUNK = 500

_T = TypeVar("_T")


class Command(BaseCommand):
    help = (
        "Delete old tasks, the rows of every StreamTask model and their Redis keys: tasks that "
        "ended (completed, failed, cancelled) and tasks stuck pending or queued (created but "
        "never started, or queued but never begun by a worker), when not updated for --hours. "
        "A task Redis says a worker is running is kept, whatever its row says."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--hours", type=float, default=24,
            help="age after which ended and stuck pending or queued tasks go (default 24)",
        )
        parser.add_argument("--dry-run", action="store_true", help="only say what would be deleted")

    def handle(self, *args: Any, hours: float, dry_run: bool, **options: Any) -> None:
        settings = conf.get_settings()
        keys = KeySpace(settings.key_prefix)
        client = sync_client(settings, "django") if settings.redis_url else None
        cutoff = timezone.now() - timedelta(hours=hours)
        ended = Q(status__in=sorted(ENDED)) | Q(completed_at__isnull=False)
        waiting = Q(status__in=[Status.PENDING, Status.QUEUED]) & ~ended
        verb = "would delete" if dry_run else "deleting"
        total = 0
        # Proxy models share their concrete model's rows, but their tasks' keys carry the proxy's
        # name: delete rows once per table, and keys under every name that table's rows go by.
        names: dict[type, list[tuple[str, str]]] = {}
        for model in task_models():
            concrete = model._meta.concrete_model
            names.setdefault(concrete, []).append((model._meta.app_label, model._meta.object_name))
        for model, labels in names.items():
            old = model.objects.filter(updated_at__lt=cutoff)
            done = [str(pk) for pk in old.filter(ended).values_list("pk", flat=True)]
            stuck = [str(pk) for pk in old.filter(waiting).values_list("pk", flat=True)]
            if client is not None and stuck:
                # The row lags behind Redis for a moment when a worker begins a task: keep any
                # task a worker runs now.
                running = _running(client, keys, stuck, labels)
                stuck = [pk for pk in stuck if pk not in running]
            total += len(done) + len(stuck)
            self.stdout.write(
                f"{model._meta.label}: {verb} {len(done) + len(stuck)} tasks "
                f"({len(done)} ended, {len(stuck)} stuck pending or queued)"
            )
            if dry_run:
                continue
            if client is not None:
                _delete_keys(client, keys, [TaskRef(app, name, pk) for pk in done + stuck for app, name in labels])
            # Only the rows counted (and checked) above, and only while they still qualify.
            for pks in _chunks(done):
                old.filter(ended, pk__in=pks).delete()
            for pks in _chunks(stuck):
                old.filter(waiting, pk__in=pks).delete()
        if client is None and not dry_run:
            self.stdout.write("no Redis configured: only rows were deleted")
        self.stdout.write(f"{'would delete' if dry_run else 'deleted'} {total} tasks in all")


def _running(client: Any, keys: KeySpace, pks: list[str], labels: list[tuple[str, str]]) -> set[str]:
    """The tasks among ``pks`` whose state record says a worker runs them (under any name)."""
    refs = [TaskRef(app, name, pk) for pk in pks for app, name in labels]
    running: set[str] = set()
    for chunk in _chunks(refs):
        pipe = client.pipeline(transaction=False)
        for ref in chunk:
            pipe.hget(keys.state(ref), Field.STATE)
        for ref, state in zip(chunk, pipe.execute(), strict=True):
            if state == State.RUNNING.encode():
                running.add(ref.pk)
    return running


def _delete_keys(client: Any, keys: KeySpace, refs: list[TaskRef]) -> None:
    """A queued task's job stays in the queue: the worker that claims it finds no state record,
    so nothing to begin, and drops it (the Django user may not touch the queue but to add)."""
    for chunk in _chunks(refs):
        pipe = client.pipeline(transaction=False)
        for ref in chunk:  # one key per DEL: a cluster's pipeline takes no more
            pipe.delete(keys.events(ref))
            pipe.delete(keys.state(ref))
        pipe.execute()


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]
