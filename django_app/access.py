"""Stream tokens on the Django side: the application decides who may watch a task, and signs it.

Issue a stream URL (or token) only to whoever may watch the task, e.g. in the view that shows
it::

    task.stream_url()                       # "/stream/examples/ProgressTask/7?token=..."
    streams_url([a.stream_ref, b.stream_ref])  # "/streams?task=...&task=...&token=..."
    coordinator.stream_token(a, b, start=True, expires_in=600)

``streams_url`` leads to many tasks on one connection (``GET /streams``): one token covers them
all, so a page following twenty tasks holds one of the browser's six HTTP/1.1 connections to
the gateways' origin instead of all six.

A gateway checks the token's signature and streams, without a database (``streamcoord.tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlencode

from streamcoord import tokens
from streamcoord.client import streams_path, task_path
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


def streams_url(refs: Iterable[TaskRef], *, start: bool = False, expires_in: float | None = None) -> str:
    """One URL for the streams of the tasks ``refs`` on one connection
    (``/streams?task=app.Model:pk&...``), with one token for all of them; otherwise as
    :func:`stream_url`. The gateways take at most ``max_tasks_per_stream`` tasks (100) a URL."""
    refs = list(dict.fromkeys(refs))  # a repeated task is followed once: one task= for it
    if not refs:
        raise ValueError("streams_url needs at least one task")
    settings = conf.get_settings()
    url = settings.gateway_url.rstrip("/") + streams_path(refs)
    if settings.public_streams and not settings.secret:
        return url
    return f"{url}&{urlencode({'token': stream_token(refs, start=start, expires_in=expires_in)})}"
