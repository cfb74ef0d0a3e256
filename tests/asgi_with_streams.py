"""The example project with streams, as the README shows it: ``uvicorn tests.asgi_with_streams:application``
(``DJANGO_SETTINGS_MODULE=django_app.project.settings``; tests/test_with_streams.py runs it)."""

from __future__ import annotations

from django.core.asgi import get_asgi_application

from django_app.asgi import with_streams

application = with_streams(get_asgi_application())
