"""Stream tokens: signed capabilities to read (and lazily start) named task streams.

A gateway never touches the database, so it cannot ask who may watch a task. The application
answers once, when it hands out a stream URL, and signs the answer: a JWT (HS256, through
PyJWT) with ``Settings.secret``, which the application and every gateway share. A gateway
checks the signature and the claims, and nothing else, before it looks anything up in Redis.

Claims (any backend that holds the secret can mint the same token)::

    streams  ["app_label.Model:pk", ...]   the streams it may read (TaskRef.label)
    exp      seconds since the epoch       when it stops being accepted (required)
    iat      seconds since the epoch       when it was issued (optional)
    sub      "user:42"                     whom it was issued to, for logs (optional)
    start    true                          it may also start those tasks (lazy start; optional)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from typing import Any

import jwt

from .errors import InvalidTaskRef, StreamcoordError
from .keys import TaskRef

#: The only algorithm accepted (a token that names another, ``none`` included, is invalid).
ALGORITHM = "HS256"
#: Clock difference tolerated between the host that mints and the gateway that checks.
LEEWAY_SECONDS = 10
#: A token naming more streams than this is refused (it would cost every check to look up).
MAX_STREAMS = 1000
#: Longest ``sub`` accepted; it reaches logs.
MAX_SUBJECT_CHARS = 200


class TokenInvalid(StreamcoordError):
    """A stream token that is missing, malformed, badly signed or expired. Its message is safe
    to show the client: it never repeats the token."""


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What one verified token allows."""

    streams: frozenset[TaskRef]
    start: bool = False
    subject: str | None = None
    expires_at: int = 0
    #: (lower-case model, pk) and (lower-case app, lower-case model, pk) of every stream: a URL
    #: without the app label, or with another case, is matched before any registry lookup.
    _short: frozenset[tuple[str, str]] = dataclasses.field(default=frozenset(), repr=False)
    _long: frozenset[tuple[str, str, str]] = dataclasses.field(default=frozenset(), repr=False)

    @classmethod
    def of(cls, streams: Iterable[TaskRef], *, start: bool = False, subject: str | None = None,
           expires_at: int = 0) -> Grant:
        refs = frozenset(streams)
        return cls(
            refs, start, subject, expires_at,
            frozenset((r.model.lower(), r.pk) for r in refs),
            frozenset((r.app_label.lower(), r.model.lower(), r.pk) for r in refs),
        )

    def may_name(self, app_label: str | None, model: str, pk: str) -> bool:
        """Whether a stream URL (app label optional, names in any case) may be one of the
        granted streams: the check made before the model name is resolved."""
        if app_label is None:
            return (model.lower(), pk) in self._short
        return (app_label.lower(), model.lower(), pk) in self._long

    def covers(self, ref: TaskRef) -> bool:
        """Whether the resolved task ``ref`` is granted."""
        return ref in self.streams


def mint(
    secret: str,
    streams: Iterable[TaskRef],
    *,
    expires_in: float,
    start: bool = False,
    subject: str | None = None,
    now: float | None = None,
) -> str:
    """A token granting ``streams`` for ``expires_in`` seconds (and their start if ``start``)."""
    if not secret:
        raise TokenInvalid("no secret to sign stream tokens with: set STREAMCOORD_SECRET")
    labels = sorted({ref.label for ref in streams})
    if not labels:
        raise ValueError("a stream token names at least one task")
    if len(labels) > MAX_STREAMS:
        raise ValueError(f"a stream token names at most {MAX_STREAMS} tasks, not {len(labels)}")
    if expires_in <= 0:
        raise ValueError(f"expires_in must be positive, not {expires_in!r}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"streams": labels, "iat": issued, "exp": issued + int(expires_in)}
    if start:
        claims["start"] = True
    if subject is not None:
        claims["sub"] = subject[:MAX_SUBJECT_CHARS]
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str, *, now: float | None = None) -> Grant:
    """The grant of a token signed with ``secret``; raises TokenInvalid for anything else."""
    try:
        # Expiry is checked below, against ``now`` when a test gives one: one code path.
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=[ALGORITHM],
            options={"require": ["exp", "streams"], "verify_exp": False, "verify_iat": False},
        )
    except jwt.PyJWTError:
        raise TokenInvalid("invalid stream token") from None
    expires = claims["exp"]
    if not isinstance(expires, int | float) or isinstance(expires, bool) or not math.isfinite(expires):
        raise TokenInvalid("invalid stream token: 'exp' must be a number")
    if expires + LEEWAY_SECONDS <= (time.time() if now is None else now):
        raise TokenInvalid("the stream token has expired: ask the application for a new one")
    return _grant(claims)


def _grant(claims: dict[str, Any]) -> Grant:
    """The claims' grant, each claim held to its documented shape."""
    streams, start, subject = claims["streams"], claims.get("start", False), claims.get("sub")
    if not isinstance(streams, list) or not streams or len(streams) > MAX_STREAMS:
        raise TokenInvalid(f"invalid stream token: 'streams' must list 1 to {MAX_STREAMS} tasks")
    if not isinstance(start, bool):
        raise TokenInvalid("invalid stream token: 'start' must be true or false")
    if subject is not None and (not isinstance(subject, str) or len(subject) > MAX_SUBJECT_CHARS):
        raise TokenInvalid("invalid stream token: 'sub' must be a short string")
    try:
        refs = [TaskRef.parse(label) for label in streams if isinstance(label, str)]
    except InvalidTaskRef:
        raise TokenInvalid("invalid stream token: 'streams' must hold app_label.Model:pk names") from None
    if len(refs) != len(streams):
        raise TokenInvalid("invalid stream token: 'streams' must hold app_label.Model:pk names")
    return Grant.of(refs, start=start, subject=subject, expires_at=int(claims["exp"]))
