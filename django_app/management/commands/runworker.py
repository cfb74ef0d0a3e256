from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_app import conf
from django_app.worker.main import run_worker
from streamcoord import runtime


class Command(BaseCommand):
    help = "Run a worker: take StreamTasks from the Redis job queue and run them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=int, default=None, help="tasks run at once (default 50)")

    def handle(self, *args: Any, concurrency: int | None, **options: Any) -> None:
        settings = conf.get_settings()
        if not settings.redis_url:
            raise CommandError(
                "no Redis: set STREAMCOORD_REDIS_URL, or start `manage.py runserver_stream` "
                "(its embedded default runs a worker of its own)"
            )
        runtime.run(run_worker(settings, concurrency))
