"""Stream tokens on the Django side: the application decides who may watch a task, and signs it.

Issue a stream URL (or token) only to whoever may watch the task, e.g. in the view that shows
it::

    task.stream_url()                       # "/stream/examples/ProgressTask/7?token=..."
    coordinator.stream_token(a, b, start=True, expires_in=600)

A gateway checks the token's signature and streams, without a database (``streamcoord.tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlencode

from streamcoord import tokens
from streamcoord.client import task_path
from streamcoord.errors import ConfigurationError
from streamcoord.keys import TaskRef

from . import conf


def stream_token(
    refs: Iterable[TaskRef], *, start: bool = False, expires_in: float | None = None,
    subject: str | None = None,
) -> str:
    """A token that lets its holder read the streams of the tasks ``refs`` name (and start them
    if ``start``)
    for ``expires_in`` seconds (default ``Settings.stream_token_seconds``)."""
    settings = conf.get_settings()
    if not settings.secret:
        raise ConfigurationError(
            "cannot sign stream tokens: set STREAMCOORD_SECRET (the same on every gateway), "
            "or run runserver_stream's embedded default, which makes one"
        )
    lifetime = settings.stream_token_seconds if expires_in is None else expires_in
    return tokens.mint(settings.secret, refs, start=start, expires_in=lifetime, subject=subject)


def stream_url(ref: TaskRef, *, start: bool = False, expires_in: float | None = None) -> str:
    """The task's stream URL with a token: absolute under ``Settings.gateway_url``, else a path.
    In ``public`` mode without a secret, the bare URL (no token is needed)."""
    settings = conf.get_settings()
    url = settings.gateway_url.rstrip("/") + task_path(ref.model, ref.pk, ref.app_label)
    if settings.public_streams and not settings.secret:
        return url
    return f"{url}?{urlencode({'token': stream_token([ref], start=start, expires_in=expires_in)})}"
