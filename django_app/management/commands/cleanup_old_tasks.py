from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Q
from django.utils import timezone

from django_app import conf
from django_app.coordinator import task_models
from streamcoord.connection import sync_client
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.taskstate import ENDED


class Command(BaseCommand):
    help = "Delete ended tasks older than --hours (rows of every StreamTask model, and their Redis keys)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--hours", type=float, default=24, help="age after which ended tasks go (default 24)")
        parser.add_argument("--dry-run", action="store_true", help="only say what would be deleted")

    def handle(self, *args: Any, hours: float, dry_run: bool, **options: Any) -> None:
        settings = conf.get_settings()
        keys = KeySpace(settings.key_prefix)
        client = sync_client(settings, "django") if settings.redis_url else None
        cutoff = timezone.now() - timedelta(hours=hours)
        ended = Q(status__in=sorted(ENDED)) | Q(completed_at__isnull=False)
        total = 0
        # Proxy models share their concrete model's rows, but their tasks' keys carry the proxy's
        # name: delete rows once per table, and keys under every name that table's rows go by.
        names: dict[type, list[tuple[str, str]]] = {}
        for model in task_models():
            concrete = model._meta.concrete_model
            names.setdefault(concrete, []).append((model._meta.app_label, model._meta.object_name))
        for model, labels in names.items():
            old = model.objects.filter(ended, updated_at__lt=cutoff)
            pks = [str(pk) for pk in old.values_list("pk", flat=True)]
            refs = [TaskRef(app, name, pk) for pk in pks for app, name in labels]
            total += len(pks)
            verb = "would delete" if dry_run else "deleting"
            self.stdout.write(f"{model._meta.label}: {verb} {len(pks)} tasks")
            if dry_run or not refs:
                continue
            if client is not None:
                for start in range(0, len(refs), 500):
                    chunk = refs[start:start + 500]
                    pipe = client.pipeline(transaction=False)
                    for ref in chunk:  # one key per DEL: a cluster's pipeline takes no more
                        pipe.delete(keys.events(ref))
                        pipe.delete(keys.state(ref))
                    pipe.execute()
            old.delete()
        if client is None and not dry_run:
            self.stdout.write("no Redis configured: only rows were deleted")
        self.stdout.write(f"{'would delete' if dry_run else 'deleted'} {total} tasks in all")
