"""Running a worker until SIGTERM/SIGINT: the one entry point both commands use."""

from __future__ import annotations

import asyncio
import signal

from streamcoord.settings import Settings

from .metrics import WorkerMetrics
from .runner import Worker


async def run_worker(settings: Settings, concurrency: int | None = None, metrics: WorkerMetrics | None = None) -> None:
    """Run a worker; the first SIGTERM/SIGINT lets running tasks finish within the grace
    period, a second one stops them at once. ``metrics``: the metrics something serves
    (``runworker --metrics-port``), which the worker counts into."""
    worker = Worker(settings, concurrency, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
