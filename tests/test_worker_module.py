"""``python -m worker`` starts (Django set up before the runner loads) and stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from .processes import REPO, Project, wait_for

pytestmark = pytest.mark.system


def test_python_dash_m_worker_runs_and_stops_cleanly(project: Project) -> None:
    log = project.directory / "module-worker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "--concurrency", "3"],
            cwd=REPO, env=project.env(), stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "started (concurrency 3)" in log.read_text() or process.poll() is not None, 30, "the worker")
        assert process.poll() is None, log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
