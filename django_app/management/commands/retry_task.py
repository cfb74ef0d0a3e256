from __future__ import annotations

from django_app.coordinator import coordinator
from django_app.management.taskcommand import TaskCommand
from django_app.models import StreamTask


class Command(TaskCommand):
    help = "Run an ended StreamTask (completed, failed or cancelled) again, from a new stream; a pending one is started."

    def act(self, task: StreamTask) -> str:
        return coordinator.retry_task_sync(task).describe()
