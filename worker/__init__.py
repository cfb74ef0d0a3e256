"""The worker process: ``python manage.py runworker`` or ``python -m worker``.

Nothing is imported here: ``python -m worker`` must set Django up before the runner (which
imports models) loads.
"""
