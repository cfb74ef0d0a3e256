"""The core's command line, ``streamcoord`` (also ``python -m streamcoord``).

``streamcoord gateway`` runs a stateless SSE gateway. The operator subcommands (``status``,
``tasks``, ``show``, ``tail``, ``cancel``, ``retry``, ``top``) read and steer the whole system
straight from Redis; they live in :mod:`streamcoord.ops.commands`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import runtime
from .access import require_secret
from .errors import ConfigurationError, StreamcoordError
from .ops import commands as operator_commands
from .settings import Settings

DEFAULT_SOCKET = "/tmp/django-stream.sock"


def _add_bind_options(parser: argparse.ArgumentParser, default_socket: str | None) -> None:
    parser.add_argument("--host", help="TCP host to bind (with --port)")
    parser.add_argument("--port", type=int, help="TCP port to bind; 0 lets the kernel pick")
    parser.add_argument(
        "--socket",
        default=None,
        help=f"unix socket path (default {default_socket})" if default_socket else "unix socket path",
    )


def add_admin_options(parser: argparse.ArgumentParser) -> None:
    """The admin listener's options (``/stats``; never on the public socket or port)."""
    parser.add_argument(
        "--admin-socket", default=None, help="unix socket path of the admin listener (GET /stats); none by default"
    )
    parser.add_argument(
        "--admin-port", type=int, default=None,
        help="TCP port of the admin listener instead (0 lets the kernel pick); none by default",
    )
    parser.add_argument(
        "--admin-host", default=None, help="TCP host of the admin listener (default 127.0.0.1; with --admin-port)"
    )


def admin_target(args: argparse.Namespace) -> dict[str, object]:
    """Where the admin listener listens: --admin-socket wins; --admin-port means TCP on
    --admin-host (127.0.0.1 by default); neither means no admin listener."""
    if args.admin_socket:
        if args.admin_port is not None or args.admin_host is not None:
            raise ConfigurationError("--admin-socket and --admin-port/--admin-host exclude each other: choose one")
        return {"admin_socket_path": args.admin_socket}
    if args.admin_port is not None:
        return {"admin_host": args.admin_host or "127.0.0.1", "admin_port": args.admin_port}
    if args.admin_host is not None:
        raise ConfigurationError("--admin-host needs --admin-port (or use --admin-socket)")
    return {}


def bind_target(args: argparse.Namespace, default_socket: str | None) -> dict[str, object]:
    """Where to listen: --socket, or --host/--port (TCP; port 8000 when only --host is given),
    or neither: the default."""
    if args.socket:
        if args.host is not None or args.port is not None:
            raise ConfigurationError("--socket and --host/--port exclude each other: choose one")
        return {"socket_path": args.socket}
    if args.host is not None or args.port is not None:
        return {"host": args.host or "127.0.0.1", "port": args.port if args.port is not None else 8000}
    if default_socket:
        return {"socket_path": default_socket}
    return {"host": "127.0.0.1", "port": 8000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamcoord", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gateway = commands.add_parser(
        "gateway", help="serve task streams over SSE (stateless; STREAMCOORD_REDIS_URL names Redis)"
    )
    _add_bind_options(gateway, DEFAULT_SOCKET)
    add_admin_options(gateway)
    operator_commands.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "gateway":
        return operator_commands.run(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        if settings.embedded:
            raise ConfigurationError(
                "a gateway needs STREAMCOORD_REDIS_URL (for the embedded default, run "
                "`manage.py runserver_stream` with nothing configured)"
            )
        require_secret(settings)  # before connecting anywhere
        from .server import serve

        target = {**bind_target(args, DEFAULT_SOCKET), **admin_target(args)}
        runtime.run(serve(settings, **target))  # type: ignore[arg-type]
    except StreamcoordError as exc:
        print(f"streamcoord: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
