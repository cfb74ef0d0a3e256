"""The worker process: ``python manage.py runworker`` or ``python -m worker``."""

from .runner import Worker

__all__ = ["Worker"]
