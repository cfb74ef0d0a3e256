"""streamcoord's settings on the Django side: ``settings.STREAMCOORD`` over the environment.

``STREAMCOORD = {"REDIS_URL": "redis://...", "LAZY_START": False, ...}`` takes the field names
of :class:`streamcoord.Settings` (any case); ``STREAMCOORD_*`` environment variables fill the
rest. With no Redis URL anywhere, the embedded default applies: ``runserver_stream`` serves an
in-process Redis stand-in and announces it in ``embedded_url_file`` (default
``<BASE_DIR>/.streamcoord-embedded.url``), where the other commands of this project find it,
and the stream-token secret of that run (unless ``STREAMCOORD_SECRET`` is set).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from django.conf import settings as django_settings

from streamcoord.embedded import Announcement, discover
from streamcoord.settings import Settings

#: The embedded default this process serves or found announced, if any.
_embedded: Announcement | None = None


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
    (this process's own, or one another local process announced), and so is the secret when
    none is configured."""
    global _embedded
    settings = _configured()
    if settings.redis_url:
        return settings
    if _embedded is None:
        _embedded = discover(settings.embedded_url_file)
        if _embedded is None:
            return settings
    return dataclasses.replace(settings, redis_url=_embedded.url, secret=settings.secret or _embedded.secret)


def use_embedded(url: str, secret: str) -> None:
    """Point this process at the embedded default it serves itself."""
    global _embedded
    _embedded = Announcement(url, secret)
