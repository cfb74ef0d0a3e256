from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser
from redis.exceptions import RedisError

from django_app import conf
from django_app.coordinator import coordinator
from django_app.worker.runner import Worker
from streamcoord import runtime
from streamcoord.cli import DEFAULT_SOCKET, add_admin_options, admin_target, bind_target
from streamcoord.connection import redacted
from streamcoord.embedded import EmbeddedRedis
from streamcoord.errors import ConfigurationError
from streamcoord.server import serve
from streamcoord.settings import Settings

log = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Serve task streams over SSE. With STREAMCOORD_REDIS_URL set: a stateless gateway. With "
        "nothing configured: the embedded default (an in-process Redis stand-in, a worker and the "
        "demo pages, in this one process)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--socket", default=None, help=f"unix socket path (default {DEFAULT_SOCKET})")
        parser.add_argument("--host", default=None, help="TCP host (with --port)")
        parser.add_argument("--port", type=int, default=None, help="TCP port; 0 lets the kernel pick")
        add_admin_options(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        namespace = argparse.Namespace(**options)
        try:
            target = {**bind_target(namespace, DEFAULT_SOCKET), **admin_target(namespace)}
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from None
        settings = conf.get_settings()
        embedded = None
        if not settings.redis_url:
            try:
                embedded = EmbeddedRedis(settings.embedded_url_file, settings.secret)
            except ConfigurationError:  # fakeredis, the optional stand-in, is not installed
                raise CommandError(
                    "no Redis: set STREAMCOORD_REDIS_URL, or pip install 'streamcoord[embedded]' "
                    "for the embedded default"
                ) from None
            conf.use_embedded(embedded.url, embedded.secret)
            settings = conf.get_settings()
        try:
            runtime.run(self._serve(settings, target, embedded is not None))
        except ConfigurationError as exc:  # e.g. --socket names something that is no socket
            raise CommandError(str(exc)) from None

        finally:
            if embedded is not None:
                embedded.close()

    async def _serve(self, settings: Settings, target: dict[str, Any], embedded: bool) -> None:
        try:  # the first Redis call: an unreachable Redis is a clear error, not a traceback
            await coordinator.register_models()
        except (RedisError, OSError, TimeoutError) as exc:
            raise ConfigurationError(f"cannot reach Redis at {redacted(settings.redis_url)}: {exc}") from None
        if not embedded:
            # A stateless gateway holds only its own connections: drop the coordinator's.
            await coordinator.close()
            await serve(settings, **target)
            return
        worker = Worker(settings, concurrency=20)
        worker_run = asyncio.create_task(worker.run(), name="embedded-worker")
        log.info("embedded default: Redis stand-in at %s, with an in-process worker", settings.redis_url)
        extra: dict[str, Any] = {"announce": "streamcoord (embedded default) listening on {url}"}
        # The demo pages belong to this repository's example app (not installed with the
        # distribution): served when the project has it.
        if apps.is_installed("django_app.examples"):
            from django_app.examples.demo import demo_routes

            extra = {"extra_routes": demo_routes, "announce": extra["announce"] + ": open {url}/ for the demo"}
        try:
            await serve(settings, **target, **extra)
        finally:
            worker.stop()
            worker.stop()  # the gateway is gone: do not wait for running tasks
            with contextlib.suppress(asyncio.CancelledError):
                await worker_run
