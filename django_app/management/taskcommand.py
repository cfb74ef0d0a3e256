"""The commands that act on one task named by model and id (``cancel_task``, ``retry_task``)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_app.coordinator import find_model
from django_app.models import StreamTask


class TaskCommand(BaseCommand):
    """``manage.py <command> <Model> <id>``: loads the row, runs :meth:`act` on it, and prints
    what happened."""

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
        self.stdout.write(self.act(task))

    def act(self, task: StreamTask) -> str:
        raise NotImplementedError
