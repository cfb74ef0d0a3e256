from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_app.coordinator import coordinator, find_model
from streamcoord.errors import ConfigurationError


class Command(BaseCommand):
    help = "Create a StreamTask row (and start it with --start); prints one JSON line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", help="model name, e.g. ExampleTask or examples.ProgressTask")
        parser.add_argument(
            "--set", action="append", default=[], metavar="FIELD=VALUE",
            help="a field value (JSON values are parsed: --set steps=20 --set fail_at=3)",
        )
        parser.add_argument("--start", action="store_true", help="queue it for a worker now")

    def handle(self, *args: Any, model: str, set: list[str], start: bool, **options: Any) -> None:
        try:
            task_model = find_model(model)
        except LookupError as exc:
            raise CommandError(str(exc)) from None
        fields = {}
        for assignment in set:
            name, sep, raw = assignment.partition("=")
            if not sep:
                raise CommandError(f"--set {assignment!r}: expected FIELD=VALUE")
            try:
                task_model._meta.get_field(name)
            except Exception:
                raise CommandError(f"{task_model.__name__} has no field {name!r}") from None
            try:
                fields[name] = json.loads(raw)
            except json.JSONDecodeError:
                fields[name] = raw
        try:
            task = task_model.objects.create(**fields)
        except (ValueError, TypeError, ValidationError) as exc:  # a value the field cannot take
            raise CommandError(f"cannot create {task_model.__name__}: {exc}") from None
        ref = task.stream_ref
        # pk_json: a number for integer keys, the text of any other (a UUID is no JSON value).
        line: dict[str, Any] = {"model": ref.model, "app_label": ref.app_label, "id": ref.pk_json, "stream": task.stream_path}
        try:
            # The operator who created it may watch it, and start it by connecting.
            line["stream_url"] = task.stream_url(start=True)
        except ConfigurationError as exc:
            self.stderr.write(f"no stream_url: {exc}")
        line["started"] = coordinator.start_task_sync(task).queued if start else False
        self.stdout.write(json.dumps(line))
