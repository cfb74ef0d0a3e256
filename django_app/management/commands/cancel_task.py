from __future__ import annotations

from django_app.coordinator import coordinator
from django_app.management.taskcommand import TaskCommand
from django_app.models import StreamTask


class Command(TaskCommand):
    help = "Cancel a StreamTask wherever it is (queued: never starts; running: its worker stops it)."

    def act(self, task: StreamTask) -> str:
        return coordinator.cancel_task_sync(task).describe()
