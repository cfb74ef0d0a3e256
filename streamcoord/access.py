"""Who may read a stream, decided from the request alone (before any Redis lookup).

``stream_auth=token`` (the default): a request carries a stream token (``?token=``, since
EventSource cannot set headers, or ``Authorization: Bearer``); no token or a bad one is 401, a
good one that does not name the stream is 403, so a stranger learns nothing of which tasks
exist. ``stream_auth=public``: anyone who reaches the gateway reads every stream (the
predecessor's way), and lazy start follows ``Settings.lazy_start``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

from .errors import ConfigurationError
from .keys import TaskRef
from .settings import Settings
from .tokens import Grant, TokenInvalid, verify

#: A token longer than this is refused unread (the request head limit bounds it anyway).
MAX_TOKEN_CHARS = 8192
#: Sent with every 401, as RFC 6750 asks of bearer-token resources.
CHALLENGE = 'Bearer realm="streamcoord"'


class Refusal(NamedTuple):
    """Why a request may not read: an HTTP status (401 or 403) and a message for the client."""

    status: int
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Permit:
    """What a request may do: read the streams of ``grant`` (every stream when None) and,
    when ``start``, start them."""

    grant: Grant | None
    start: bool
    subject: str | None = None

    def covers(self, ref: TaskRef) -> bool:
        return self.grant is None or self.grant.covers(ref)


def require_secret(settings: Settings) -> None:
    """Refuse to serve streams in token mode without the key to check tokens with."""
    if not settings.public_streams and not settings.secret:
        raise ConfigurationError(
            "stream_auth is 'token' but no secret is set: give every gateway and the Django "
            "side the same STREAMCOORD_SECRET (at least 32 characters), or set "
            "STREAMCOORD_STREAM_AUTH=public to let anyone who reaches a gateway read every stream"
        )


def bearer_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | Refusal | None:
    """The request's token: ``Authorization: Bearer`` first, else ``?token=``. Another scheme
    is not ours (a browser adds a site's Basic credentials to same-origin EventSource requests
    by itself): the query's token applies then."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip() or Refusal(401, "use Authorization: Bearer <stream token>")
    return query.get("token") or None


def authorize(
    settings: Settings, headers: Mapping[str, str], query: Mapping[str, str],
    *streams: tuple[str | None, str, str],
) -> Permit | Refusal:
    """Whether a request may read every stream of ``streams``, each named as in its URL:
    ``(app_label or None, model, pk)``."""
    if settings.public_streams:
        return Permit(None, settings.lazy_start)
    token = bearer_token(headers, query)
    if isinstance(token, Refusal):
        return token
    if token is None:
        return Refusal(401, "a stream token is required: use the stream URL the application gave you")
    if len(token) > MAX_TOKEN_CHARS:
        return Refusal(401, "invalid stream token")
    try:
        grant = verify(settings.secret, token)
    except TokenInvalid as exc:
        return Refusal(401, str(exc))
    for app_label, model, pk in streams:
        if not grant.may_name(app_label, model, pk):
            named = f"{app_label}.{model}:{pk}" if app_label else f"{model}:{pk}"
            which = f" ({named})" if len(streams) > 1 else ""
            return Refusal(403, f"this stream token does not grant this stream{which}")
    return Permit(grant, grant.start and settings.lazy_start, grant.subject)
