"""streamcoord's settings on the Django side: ``settings.STREAMCOORD`` over the environment.

``STREAMCOORD = {"REDIS_URL": "redis://...", "LAZY_START": False, ...}`` takes the field names
of :class:`streamcoord.Settings` (any case); ``STREAMCOORD_*`` environment variables fill the
rest. With no Redis URL anywhere, the embedded default applies: ``runserver_stream`` serves an
in-process Redis stand-in and announces it in ``embedded_url_file`` (default
``<BASE_DIR>/.streamcoord-embedded.url``), where the other commands of this project find it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from django.conf import settings as django_settings

from streamcoord.embedded import discover
from streamcoord.settings import Settings

_redis_url_override = ""


@functools.cache
def _configured() -> Settings:
    mapping = dict(getattr(django_settings, "STREAMCOORD", {}))
    settings = Settings.from_mapping(mapping)
    if not settings.embedded_url_file:
        base = Path(getattr(django_settings, "BASE_DIR", Path.cwd()))
        settings = dataclasses.replace(settings, embedded_url_file=str(base / ".streamcoord-embedded.url"))
    return settings


def get_settings() -> Settings:
    """This process's settings; the Redis URL is the configured one, or the embedded default's
    (this process's own, or one another local process announced)."""
    global _redis_url_override
    settings = _configured()
    if _redis_url_override:
        return dataclasses.replace(settings, redis_url=_redis_url_override)
    if not settings.redis_url:
        found = discover(settings.embedded_url_file)
        if found:
            _redis_url_override = found
            return dataclasses.replace(settings, redis_url=found)
    return settings


def use_redis_url(url: str) -> None:
    """Point this process at ``url`` (the embedded default this process serves)."""
    global _redis_url_override
    _redis_url_override = url
