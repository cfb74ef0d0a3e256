"""This repository's worker process: ``python -m worker`` runs a worker of the example project
(or of the project in ``DJANGO_SETTINGS_MODULE``).

Not installed with the distribution: the worker itself is ``django_app.worker``, started in any
project by ``manage.py runworker``. A project's own top-level ``worker`` package is left alone.
Nothing is imported here: ``python -m worker`` must set Django up before the runner (which
imports models) loads.
"""
