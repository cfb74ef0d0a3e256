"""The one settings object.

Every tunable of streamcoord lives in :class:`Settings`. It is built once at process start, from
the environment (``Settings.from_env``) or, on the Django side, from ``settings.STREAMCOORD``,
and passed down. Nothing else in the project reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

ENV_PREFIX = "STREAMCOORD_"
_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}
_ZERO_ALLOWED = frozenset({"retry_ms", "window_events"})
#: The values of ``stream_auth``.
STREAM_AUTH_MODES = ("token", "public")
#: The shortest ``secret`` accepted: 32 characters (RFC 7518 asks HS256 keys for 256 bits).
MIN_SECRET_CHARS = 32
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """streamcoord's configuration. Each field maps to ``STREAMCOORD_<FIELD NAME IN CAPS>``."""

    #: Redis URL (``redis://``, ``rediss://`` or ``unix://``). Empty means the embedded default:
    #: a Redis stand-in inside the serving process, for demos and development only.
    redis_url: str = ""
    #: Prefix of every key, so several deployments can share one Redis.
    key_prefix: str = "sc"
    #: Seconds between heartbeat comment lines on an open stream. Keep it below the read timeout
    #: of every proxy in front of the gateway (nginx: 60 s).
    heartbeat_seconds: float = 15.0
    #: Events retained per task stream while it runs (exact trim on every append).
    max_stream_length: int = 10_000
    #: Seconds a task's event stream is kept after its terminal event.
    stream_ttl_seconds: int = 24 * 3600
    #: Seconds a task's small state record is kept after its terminal event; longer than the
    #: stream, so a late client still learns the outcome.
    state_ttl_seconds: int = 7 * 24 * 3600
    #: Largest accepted event payload, in bytes of JSON.
    max_payload_bytes: int = 64 * 1024
    #: Frames a client may leave untaken before the gateway disconnects it for not keeping up
    #: (the client resumes from Redis with Last-Event-ID). Checked per batch of events read.
    client_queue_size: int = 1000
    #: Latest events of each followed stream a gateway keeps encoded in memory: a client that
    #: joins or resumes within them is served without reading Redis. Costs up to twice this
    #: many frames per stream with listeners in the process; 0 turns the window off.
    window_events: int = 500
    #: Reconnect delay suggested to clients in the SSE ``retry:`` field, in milliseconds.
    retry_ms: int = 2000
    #: How long the gateway's single reader blocks in XREAD, in milliseconds. Must stay below
    #: ``redis_socket_timeout`` or the blocked read times out.
    block_ms: int = 1000
    #: Socket timeout for Redis commands, in seconds.
    redis_socket_timeout: float = 5.0
    #: Seconds open streams get to end cleanly when a gateway shuts down.
    shutdown_grace_seconds: float = 5.0
    #: Seconds ``send_event`` keeps retrying while Redis is unreachable before it raises
    #: (a retry never writes an event twice).
    send_retry_seconds: float = 30.0
    #: Seconds a worker's lease on a running task lasts without renewal; past it, another
    #: worker takes the task over (re-runs it or fails it, per the task's ``max_attempts``).
    lease_seconds: float = 30.0
    #: Connecting to the stream of a task that was created but never started starts it.
    lazy_start: bool = True
    #: Tasks one worker process runs at once (``runworker --concurrency`` overrides it).
    worker_concurrency: int = 50
    #: Seconds between a worker's or gateway's heartbeats in Redis (sc:workers, sc:gateways).
    worker_heartbeat_seconds: float = 5.0
    #: Send every exception's text in the ``error`` event. Off: a task's watchers read the text
    #: of a ``TaskFailure`` only, other failures say "the task failed" and their type (the text
    #: and the traceback stay in the worker's log, the text in the row). For trusted audiences.
    expose_errors: bool = False
    #: Where the embedded default announces its URL to other local processes ('' = nowhere).
    embedded_url_file: str = ""

    # -- Access: who may read and start a task (the README's "Security") ------------------------
    #: Who may read a task's stream: ``token`` (a stream token the application issued, signed
    #: with ``secret``) or ``public`` (anyone who can reach a gateway: the predecessor's way).
    stream_auth: str = "token"
    #: The key that signs stream tokens (HS256), shared by Django and every gateway; at least
    #: 32 characters. Never logged. The embedded default makes one per run when it is unset.
    secret: str = dataclasses.field(default="", repr=False)
    #: Default lifetime of a stream token, in seconds: a day, like the stream a finished task
    #: leaves behind (``stream_ttl_seconds``), so a page opened at the start can follow and
    #: resume a long task to its end with the URL it was given.
    stream_token_seconds: int = 24 * 3600
    #: The public base URL of the gateways (``https://stream.example.com``), for absolute
    #: ``stream_url()``\s; '' gives paths.
    gateway_url: str = ""
    #: Origins (``scheme://host[:port]``, comma-separated) whose pages may read streams across
    #: origins (CORS). ``*`` (any origin) only with ``stream_auth=public``. '' = same origin only.
    cors_origins: str = ""

    # -- Limits: what one client may hold of a gateway ---------------------------------------
    #: Connections one gateway process holds at most; beyond it, new requests get 503 with
    #: ``Retry-After`` (load shedding, not a crash).
    max_connections: int = 10_000
    #: Largest request head (request line and headers) a gateway reads, in bytes; a larger one
    #: gets 431 and the connection is closed, without buffering the rest.
    max_header_bytes: int = 16 * 1024
    #: Seconds a connection may take to send a complete request head; then it is closed
    #: (silent and slowloris sockets).
    header_timeout_seconds: float = 10.0
    #: Bytes of encoded frames a client may leave untaken (history included) before it is cut,
    #: besides ``client_queue_size`` frames; it resumes from Redis with Last-Event-ID.
    client_queue_bytes: int = 1024 * 1024
    #: Seconds a client may accept no bytes at all before it is cut (it resumes with
    #: Last-Event-ID).
    write_stall_seconds: float = 30.0
    #: Tasks one multiplexed connection (``GET /streams?task=...``) may follow; more get 400.
    max_tasks_per_stream: int = 100

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value: Any = getattr(self, field.name)
            kind = _TYPES[str(field.type)]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ConfigurationError(f"{_label(field.name)} must be a {field.type}, not {value!r}")
            number = float(getattr(self, field.name)) if field.type not in ("str", "bool") else 1.0
            if not (number > 0 or (field.name in _ZERO_ALLOWED and number == 0)):  # NaN fails too
                raise ConfigurationError(f"{_label(field.name)} must be a positive number, not {value!r}")
        if self.block_ms / 1000 >= self.redis_socket_timeout:
            raise ConfigurationError(
                f"{_label('block_ms')} ({self.block_ms}) must be below {_label('redis_socket_timeout')} "
                f"({self.redis_socket_timeout} s), or a blocked read times out"
            )
        self._check_access()
        if not self.key_prefix or any(c in self.key_prefix for c in "{}: \t\r\n"):
            raise ConfigurationError(
                f"{_label('key_prefix')} {self.key_prefix!r} must be non-empty, without braces, colons or spaces"
            )

    def _check_access(self) -> None:
        if self.stream_auth not in STREAM_AUTH_MODES:
            raise ConfigurationError(
                f"{_label('stream_auth')} must be one of {', '.join(STREAM_AUTH_MODES)}, not {self.stream_auth!r}"
            )
        if self.secret and len(self.secret) < MIN_SECRET_CHARS:
            raise ConfigurationError(
                f"{_label('secret')} must be at least {MIN_SECRET_CHARS} characters (it signs stream tokens); "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if self.gateway_url and not self.gateway_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"{_label('gateway_url')} must start with http:// or https://, not {self.gateway_url!r}")
        for origin in self.cors_origin_list:
            if origin == "*":
                if self.stream_auth != "public":
                    raise ConfigurationError(f"{_label('cors_origins')} '*' (any origin) is allowed only with stream_auth=public")
            elif not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ConfigurationError(
                    f"{_label('cors_origins')}: {origin!r} is not an origin (scheme://host[:port], no path)"
                )

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """``cors_origins`` split: each origin lower-cased, without a trailing slash."""
        return tuple(o.strip().lower().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    @property
    def public_streams(self) -> bool:
        """True when anyone who reaches a gateway may read every stream (no tokens)."""
        return self.stream_auth == "public"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``STREAMCOORD_*`` variables; ``overrides`` win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = _parse(field.name, field.type, raw)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from a mapping such as Django's ``STREAMCOORD`` (keys: field names,
        any case); the environment fills what the mapping leaves out."""
        known = {f.name for f in dataclasses.fields(cls)}
        overrides = {}
        for key, value in mapping.items():
            name = key.lower()
            if name not in known:
                raise ConfigurationError(f"unknown streamcoord setting {key!r}; known: {sorted(known)}")
            overrides[name] = value
        return cls.from_env(environ, **overrides)

    @property
    def embedded(self) -> bool:
        """True when no Redis URL is set and the in-process stand-in is used."""
        return not self.redis_url


def _label(name: str) -> str:
    """A setting as people set it: its environment variable, and its name in ``STREAMCOORD``."""
    return f"{ENV_PREFIX}{name.upper()} ({name})"


def _parse(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError(raw)
            return raw.lower() in _TRUE
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigurationError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}"
        ) from None
    return raw
