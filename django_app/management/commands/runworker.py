from __future__ import annotations

import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import autoreload

from django_app import conf
from django_app.checks import tokens_unused
from django_app.worker.main import run_worker
from django_app.worker.metrics import MetricsServer, WorkerMetrics
from streamcoord import runtime

#: The logger of the worker's lines: its start and stop, and each task's outcome.
WORKER_LOGGER = "django_app.worker"
#: Set in the environment of the worker ``--reload`` runs (and restarts).
RELOADED_CHILD = "RUNWORKER_RELOADED_CHILD"  # no STREAMCOORD_ prefix: that would name a setting (W001)


class Command(BaseCommand):
    help = (
        "Run a worker: take StreamTasks from the Redis job queue and run them. It logs its start "
        "and each task's outcome (to stderr, when the project's LOGGING sends them nowhere). "
        "--reload (development only) restarts it whenever a .py file under the project changes. "
        "--metrics-port serves Prometheus metrics on GET /metrics."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=int, default=None, help="tasks run at once (default 50)")
        parser.add_argument(
            "--reload", action="store_true",
            help="development only: run the worker in a child process and restart it whenever a .py "
            "file under the project (settings.BASE_DIR, else the current directory) changes; "
            "tasks running then are stopped as on SIGINT (handed back to other workers)",
        )
        parser.add_argument(
            "--metrics-port", type=int, default=None,
            help="serve this worker's Prometheus metrics on GET /metrics at this port (0: the kernel "
            "picks; the log names the URL)",
        )
        parser.add_argument(
            "--metrics-host", default=None, help="the metrics listener's address (default 127.0.0.1)",
        )

    def check(self, *args: Any, **kwargs: Any) -> None:
        # A worker neither signs nor checks stream tokens: the missing secret's check
        # (streamcoord.W002) is for the Django site and the gateways, not for it.
        with tokens_unused():
            super().check(*args, **kwargs)

    def handle(
        self, *args: Any, concurrency: int | None, reload: bool, metrics_port: int | None,
        metrics_host: str | None, **options: Any,
    ) -> None:
        settings = conf.get_settings()
        if not settings.redis_url:
            raise CommandError(
                "no Redis: set STREAMCOORD_REDIS_URL, or start `manage.py runserver_stream` "
                "(its embedded default runs a worker of its own)"
            )
        if metrics_host is not None and metrics_port is None:
            raise CommandError("--metrics-host needs --metrics-port")
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise CommandError(f"--metrics-port {metrics_port}: not a port (0-65535; 0 lets the kernel pick)")
        # The child --reload starts is marked, so that it never reloads in turn (an abbreviated
        # option, --rel, would reach it unfiltered). It gets every other option, the metrics'
        # too: the child serves them (each restart binds the port anew once the old child is gone).
        if reload and os.environ.get(RELOADED_CHILD) != "1":
            self._run_reloading(math.ceil(settings.shutdown_grace_seconds) + 5)
            return
        log_to_stderr_unless_configured()
        if metrics_port is None:
            runtime.run(run_worker(settings, concurrency))
            return
        metrics = WorkerMetrics()
        host = metrics_host or "127.0.0.1"
        try:
            server = MetricsServer.start(metrics.registry, host, metrics_port)
        except OSError as exc:
            raise CommandError(f"cannot serve metrics on {host}:{metrics_port}: {exc}") from None
        # Before the worker's start line: whoever waits for that line finds the URL already.
        logging.getLogger(WORKER_LOGGER).info("metrics on %s", server.url)
        try:
            runtime.run(run_worker(settings, concurrency, metrics))
        finally:
            server.stop()

    def _run_reloading(self, stop_seconds: int) -> None:
        """This command again, without ``--reload``, in a child process that watchfiles restarts
        on every change to a .py file under the project; until SIGTERM or SIGINT."""
        try:
            import watchfiles  # uvicorn[standard] brings it; imported only for --reload
        except ImportError:
            raise CommandError("--reload needs watchfiles: pip install watchfiles") from None
        root = Path(getattr(django_settings, "BASE_DIR", None) or Path.cwd())
        # How Django's runserver restarts itself: the same interpreter, options and script.
        child = [arg for arg in autoreload.get_child_arguments() if arg != "--reload"]
        os.environ[RELOADED_CHILD] = "1"  # inherited by every child run_process starts
        self.stderr.write(f"runworker --reload: watching {root} for changes to .py files (development only)")

        def restarting(changes: set[tuple[Any, str]]) -> None:
            changed = sorted({path for _change, path in changes})
            self.stderr.write(f"runworker --reload: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed: restarting the worker")

        watchfiles.run_process(
            root, target=shlex.join(str(arg) for arg in child), target_type="command",
            watch_filter=watchfiles.PythonFilter(), callback=restarting,
            # A stopping worker gives running tasks the grace period first.
            sigint_timeout=stop_seconds,
        )


def log_to_stderr_unless_configured() -> None:
    """Give the worker's logger a stderr handler at INFO when nothing would show its lines: a
    project without LOGGING leaves every logger but Django's without a handler, and Python's
    last resort prints warnings only, so the start line and each task's outcome went nowhere. A
    handler on the logger or on any logger above it (the root, ``django_app``) means the
    project decides: it is left alone."""
    worker_log = logging.getLogger(WORKER_LOGGER)
    if worker_log.hasHandlers():
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    worker_log.addHandler(handler)
    if worker_log.level == logging.NOTSET:
        worker_log.setLevel(logging.INFO)
