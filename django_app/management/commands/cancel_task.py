from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_app.coordinator import coordinator, find_model


class Command(BaseCommand):
    help = "Cancel a StreamTask wherever it is (queued: never starts; running: its worker stops it)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model")
        parser.add_argument("id")

    def handle(self, *args: Any, model: str, id: str, **options: Any) -> None:
        try:
            task = find_model(model).objects.get(pk=id)
        except LookupError as exc:
            raise CommandError(str(exc)) from None
        except Exception:
            raise CommandError(f"no {model} with id {id}") from None
        self.stdout.write(coordinator.cancel_task_sync(task).describe())
