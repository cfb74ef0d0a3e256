"""System checks of streamcoord's settings: ``manage.py check`` (and every command that runs
the checks) names a mistake in ``settings.STREAMCOORD`` or a ``STREAMCOORD_*`` variable before
anything starts.

==================  =============================================================================
``E001``            an unknown key in ``settings.STREAMCOORD`` (a typo; the hint names the closest one)
``E002``            ``REDIS_URL`` is not one of the forms streamcoord reads (``streamcoord.connection``)
``E003``            ``GATEWAY_URL`` is not ``http(s)://host[:port][/path]``
``E005``            ``SECRET`` shorter than 32 characters
``E006``            any other value :class:`streamcoord.Settings` refuses (its message)
``E007``            ``settings.STREAMCOORD`` is not a dict
``W001``            a ``STREAMCOORD_*`` environment variable that names no setting
``W002``            token auth (the default) with a Redis URL but no ``SECRET``: no stream token can
                    be signed or checked (without a Redis URL the embedded default makes one). A
                    warning: commands that need none (``migrate``) still run; a gateway refuses to
                    start without it and ``stream_url()`` raises
==================  =============================================================================

:func:`check_settings` is the pure function (a mapping and an environment in, messages out);
:func:`streamcoord_settings` is the registered check, which reads both from this process. The
app's ``ready()`` imports this module, which registers it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import redis.connection
from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, register
from django.core.checks import Warning as CheckWarning

from streamcoord.connection import parse_redis_url, redacted
from streamcoord.errors import ConfigurationError
from streamcoord.settings import ENV_PREFIX, MIN_SECRET_CHARS, Settings

#: The settings' names (lower case, as in ``Settings``), and their defaults.
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings)}
_MAKE_SECRET = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"

#: False while a command that never signs nor checks stream tokens runs its checks (see
#: :func:`tokens_unused`): a missing secret is not its problem.
_tokens_used: contextvars.ContextVar[bool] = contextvars.ContextVar("streamcoord_tokens_used", default=True)


@register("streamcoord")
def streamcoord_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The registered check: ``settings.STREAMCOORD`` over this process's environment."""
    # The environment is read here, like Settings.from_env reads it, so the check judges the
    # very values the process would run with.
    mapping = getattr(django_settings, "STREAMCOORD", {})
    return check_settings(mapping, os.environ, tokens_used=_tokens_used.get())


@contextlib.contextmanager
def tokens_unused() -> Iterator[None]:
    """Checks run inside this leave out ``W002`` (no secret): for a command that neither signs
    nor checks stream tokens (a worker). A short secret is still an error: Settings refuses it."""
    reset = _tokens_used.set(False)
    try:
        yield
    finally:
        _tokens_used.reset(reset)


def check_settings(mapping: Any, environ: Mapping[str, str], *, tokens_used: bool = True) -> list[CheckMessage]:
    """Every problem of the settings ``mapping`` (Django's ``STREAMCOORD``) over ``environ``."""
    if not isinstance(mapping, Mapping):
        return [Error(
            f"settings.STREAMCOORD must be a dict, not {type(mapping).__name__}",
            hint='e.g. STREAMCOORD = {"REDIS_URL": "redis://127.0.0.1:6379/0"}', id="streamcoord.E007",
        )]
    messages: list[CheckMessage] = []
    known: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(key, str) and key.lower() in _DEFAULTS:
            known[key.lower()] = value
        else:
            messages.append(_unknown_key(key))
    messages += _unknown_variables(environ)
    values = _Values(known, environ)
    problems = {
        "redis_url": _redis_url(values), "gateway_url": _gateway_url(values), "secret": _short_secret(values),
    }
    messages += [problem for problem in problems.values() if problem is not None]
    # Settings is asked about the rest only: each refused value said once, by its own check.
    refused = {name for name, problem in problems.items() if problem is not None}
    missing = _missing_secret(values) if tokens_used else None
    if missing is not None:
        messages.append(missing)
    try:
        Settings.from_mapping(
            {name: value for name, value in known.items() if name not in refused},
            {k: v for k, v in environ.items() if k not in {_variable(name) for name in refused}},
        )
    except ConfigurationError as exc:
        messages.append(Error(str(exc), id="streamcoord.E006"))
    return messages


@dataclasses.dataclass(frozen=True)
class _Values:
    """Where each setting comes from, as ``Settings.from_mapping`` reads them: the mapping, else
    a non-empty environment variable, else the default."""

    known: dict[str, Any]
    environ: Mapping[str, str]

    def get(self, name: str) -> tuple[Any, str]:
        """The raw value of setting ``name``, and how the user wrote its name."""
        if name in self.known:
            return self.known[name], f'STREAMCOORD["{name.upper()}"]'
        raw = self.environ.get(_variable(name))
        if raw:
            return raw, _variable(name)
        return _DEFAULTS[name], _variable(name)


def _variable(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _unknown_key(key: Any) -> Error:
    hint = f"known settings: {', '.join(name.upper() for name in _DEFAULTS)}"
    if isinstance(key, str):
        close = difflib.get_close_matches(key.lower(), _DEFAULTS, n=1)
        if close:
            hint = f"did you mean {close[0].lower() if key.islower() else close[0].upper()!r}?"
    return Error(f"unknown setting {key!r} in settings.STREAMCOORD", hint=hint, id="streamcoord.E001")


def _unknown_variables(environ: Mapping[str, str]) -> list[CheckMessage]:
    """A ``STREAMCOORD_*`` variable that names no setting is ignored by Settings: a warning."""
    messages: list[CheckMessage] = []
    for variable in sorted(environ):
        if variable.startswith(ENV_PREFIX) and variable[len(ENV_PREFIX):].lower() not in _DEFAULTS:
            close = difflib.get_close_matches(variable[len(ENV_PREFIX):].lower(), _DEFAULTS, n=1)
            messages.append(CheckWarning(
                f"the environment variable {variable} names no streamcoord setting; it is ignored",
                hint=f"did you mean {_variable(close[0])}?" if close else None, id="streamcoord.W001",
            ))
    return messages


def _redis_url(values: _Values) -> CheckMessage | None:
    url, name = values.get("redis_url")
    if not isinstance(url, str) or not url:
        return None  # a wrong type is Settings' to report; empty is the embedded default
    problem = redis_url_problem(url)
    if problem is None:
        return None
    return Error(
        f"{name} {redacted(url)!r}: {problem}",
        hint="use redis://[user:password@]host:port/db, rediss://..., unix:///path/redis.sock?db=0, "
        "redis+sentinel://host:port,host:port/service[/db] or redis+cluster://host:port,host:port",
        id="streamcoord.E002",
    )


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, in a few words; None when streamcoord can use it."""
    try:
        topology = parse_redis_url(url)
    except ConfigurationError as exc:  # its message names the URL first: keep what follows
        return str(exc).removeprefix(f"STREAMCOORD_REDIS_URL {redacted(url)!r}: ")
    except ValueError:  # a Sentinel database that is no number
        return "the database after the service must be a number"
    if topology.kind == "single":
        try:
            redis.connection.parse_url(url)  # what redis-py will make of it: ports, query values
        except ValueError as exc:
            return str(exc).rstrip(".")
        parts = urlsplit(url)
        if parts.scheme == "unix" and not parts.path:
            return "name the socket's path (unix:///path/redis.sock)"
        database = parts.path.strip("/")
        if parts.scheme != "unix" and database and not database.isdigit():
            return f"the database must be a number, not {database!r}"
        return None
    for host, port in topology.nodes:
        if not host or not 0 < port < 65536:
            return f"every node must be host:port, not {host}:{port}"
    return None


def _gateway_url(values: _Values) -> CheckMessage | None:
    url, name = values.get("gateway_url")
    if not isinstance(url, str) or not url:
        return None
    problem = gateway_url_problem(url)
    if problem is None:
        return None
    return Error(
        f"{name} {url!r}: {problem}",
        hint="the gateways' public base URL: http(s)://host[:port][/path], e.g. https://stream.example.com",
        id="streamcoord.E003",
    )


def gateway_url_problem(url: str) -> str | None:
    """What is wrong with a gateway URL, in a few words; None when it is http(s)://host[:port][/path]."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (it raises ValueError for a port that is no number or out of range)
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "it must start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    if parts.username is not None or parts.password is not None:
        return "it must carry no user or password"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "it must have no query or fragment (stream URLs are built under it)"
    return None


def _short_secret(values: _Values) -> CheckMessage | None:
    secret, name = values.get("secret")
    if not isinstance(secret, str) or not secret or len(secret) >= MIN_SECRET_CHARS:
        return None
    return Error(
        f"{name} is {len(secret)} characters; it must be at least {MIN_SECRET_CHARS}",
        hint=_MAKE_SECRET, id="streamcoord.E005",
    )


def _missing_secret(values: _Values) -> CheckMessage | None:
    """Token auth (the default) with a Redis URL and no secret: nothing can sign a token. With
    no Redis URL the embedded default makes a secret for its run."""
    secret, _ = values.get("secret")
    auth, _ = values.get("stream_auth")
    redis_url, where = values.get("redis_url")
    if secret or auth != "token" or not redis_url:
        return None
    return CheckWarning(
        f"stream tokens need {_variable('secret')}: it is unset, with {where} set",
        hint=f"set it (the same in Django and every gateway; {_MAKE_SECRET}), "
        f"or {_variable('stream_auth')}=public if every client is trusted",
        id="streamcoord.W002",
    )
