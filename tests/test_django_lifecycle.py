"""The Django commands around a project's life: ``runserver_stream`` with neither Redis nor
fakeredis, ``cleanup_old_tasks`` and tasks stuck pending or queued, ``runworker``'s log lines in
a project without LOGGING, and ``runworker --reload``.

Projects with settings of their own are settings modules in the test's temporary directory
that start from the example project's (``DJANGO_SETTINGS_MODULE`` and ``PYTHONPATH``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import django
import pytest
from django.conf import settings as django_settings
from redis.asyncio import Redis

from streamcoord.keys import TaskRef

from .processes import REPO, Project, stop_process, wait_for
from .workloads import KEYS, shell, state, until

if not django_settings.configured:
    django_settings.configure(INSTALLED_APPS=["django_app"], DATABASES={})
    django.setup()

# Set up above: the command imports the worker, which imports the models.
from django_app.management.commands.runworker import WORKER_LOGGER, log_to_stderr_unless_configured

NO_REDIS = "no Redis: set STREAMCOORD_REDIS_URL, or pip install 'streamcoord[embedded]' for the embedded default"


def ref(pk: object) -> TaskRef:
    return TaskRef("examples", "ProgressTask", str(pk))


def settings_module(directory: Path, name: str, *lines: str) -> str:
    """A settings module in ``directory``: the example project's settings, then ``lines``."""
    body = ["from django_app.project.settings import *  # noqa: F403", *lines]
    (directory / f"{name}.py").write_text("\n".join(body) + "\n")
    return name


def own_settings_env(project: Project, module: str, **settings: object) -> dict[str, str]:
    """The project's environment with the settings module ``module`` (in its directory)."""
    env = project.env(**settings)
    env |= {"DJANGO_SETTINGS_MODULE": module, "PYTHONPATH": str(project.directory)}
    return env


def start_manage(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "manage.py", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_in_log(process: subprocess.Popen[bytes], log: Path, pattern: str, count: int = 1, within: float = 30) -> str:
    """Wait for ``count`` matches of ``pattern`` in ``log`` (the process must not exit first)."""

    def seen() -> bool:
        if len(re.findall(pattern, log.read_text(errors="replace"))) >= count:
            return True
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        return False

    try:
        wait_for(seen, within, f"{count} x {pattern!r} in {log.name}")
    except TimeoutError:
        raise AssertionError(log.read_text(errors="replace")) from None
    return log.read_text(errors="replace")


# -- runserver_stream without Redis and without fakeredis --------------------------------------


@pytest.mark.system
def test_runserver_stream_without_redis_or_fakeredis_ends_with_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_"))}
    env |= {
        "DJANGO_SETTINGS_MODULE": "django_app.project.settings", "DJANGO_DB_PATH": str(tmp_path / "db.sqlite3"),
        "STREAMCOORD_EMBEDDED_URL_FILE": str(tmp_path / "embedded.url"),
    }
    sock = tmp_path / "gw.sock"
    # As if fakeredis (the optional `embedded` extra) were not installed: its import fails.
    code = (
        "import runpy, sys; sys.modules['fakeredis'] = None; "
        f"sys.argv = ['manage.py', 'runserver_stream', '--socket', {str(sock)!r}]; "
        "runpy.run_path('manage.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"CommandError: {NO_REDIS}" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not sock.exists() and not (tmp_path / "embedded.url").exists()


# -- cleanup_old_tasks: stuck pending and queued tasks -----------------------------------------


@pytest.mark.system
async def test_cleanup_deletes_tasks_stuck_pending_or_queued_and_their_keys_but_not_running_ones(
    redis: Redis, project: Project
) -> None:
    stuck_pending = project.create_task("ProgressTask", "steps=1", "delay=0")["id"]
    stuck_queued = project.create_task("ProgressTask", "steps=1", "delay=0", start=True)["id"]
    # Its row still says queued, but a worker has just begun it (the row follows a moment later).
    just_begun = project.create_task("ProgressTask", "steps=1", "delay=0", start=True)["id"]
    await redis.hset(KEYS.state(ref(just_begun)), "state", "running")
    young = project.create_task("ProgressTask", "steps=1", "delay=0")["id"]  # not old enough
    old = [stuck_pending, stuck_queued, just_begun]
    assert shell(project, (
        "from datetime import timedelta; from django.utils import timezone\n"
        "from django_app.examples.models import ProgressTask\n"
        f"print(ProgressTask.objects.filter(pk__in={old}).update(updated_at=timezone.now() - timedelta(hours=2)))"
    )) == "3"
    job_of_stuck = (await state(redis, ref(stuck_queued)))["job"]

    out = project.manage("cleanup_old_tasks", "--hours", "1", "--dry-run")
    assert "examples.ProgressTask: would delete 2 tasks (0 ended, 2 stuck pending or queued)" in out, out
    assert "would delete 2 tasks in all" in out, out
    assert await redis.exists(KEYS.state(ref(stuck_pending)), KEYS.state(ref(stuck_queued))) == 2

    out = project.manage("cleanup_old_tasks", "--hours", "1")
    assert "deleted 2 tasks in all" in out, out
    remaining = shell(project, (
        "from django_app.examples.models import ProgressTask\n"
        "print(sorted(ProgressTask.objects.values_list('pk', flat=True)))"
    ))
    assert remaining == str(sorted([just_begun, young])), remaining
    for pk in (stuck_pending, stuck_queued):
        assert await redis.exists(KEYS.state(ref(pk)), KEYS.events(ref(pk))) == 0, pk
    assert (await state(redis, ref(just_begun)))["state"] == "running"
    assert (await state(redis, ref(young)))["state"] == "pending"

    # The stuck task's job is still queued (Django may only add to the queue): the worker that
    # claims it finds no task to begin and drops it.
    entries: list[tuple[bytes, object]] = await redis.xrange(KEYS.jobs())  # type: ignore[assignment]
    assert job_of_stuck.encode() in [entry_id for entry_id, _ in entries]
    project.worker("w1", concurrency=2)

    async def job_dropped() -> bool:
        found: list[tuple[bytes, object]] = await redis.xrange(KEYS.jobs())  # type: ignore[assignment]
        return job_of_stuck.encode() not in [entry_id for entry_id, _ in found]

    await until(job_dropped, 20, "the worker to drop the stuck task's job")
    assert await redis.exists(KEYS.state(ref(stuck_queued)), KEYS.events(ref(stuck_queued))) == 0


# -- runworker's log lines ---------------------------------------------------------------------


def bare_logging(monkeypatch: pytest.MonkeyPatch) -> logging.Logger:
    """The worker's logger as a project without LOGGING leaves it (restored after the test).
    Called in the test itself: pytest adds its capture handler to the root for the call."""
    worker_log = logging.getLogger(WORKER_LOGGER)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(worker_log, "handlers", [])
    monkeypatch.setattr(worker_log, "level", logging.NOTSET)
    return worker_log


def test_a_project_without_logging_gets_the_workers_lines_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    worker_log = bare_logging(monkeypatch)
    log_to_stderr_unless_configured()
    [handler] = worker_log.handlers
    assert isinstance(handler, logging.StreamHandler) and worker_log.getEffectiveLevel() == logging.INFO
    log_to_stderr_unless_configured()  # once only
    assert len(worker_log.handlers) == 1


@pytest.mark.parametrize("configured", ["", "django_app"])
def test_a_projects_own_logging_is_left_alone(monkeypatch: pytest.MonkeyPatch, configured: str) -> None:
    """A handler on the root or on a logger above the worker's: the project decides."""
    worker_log = bare_logging(monkeypatch)
    monkeypatch.setattr(logging.getLogger(configured or None), "handlers", [logging.NullHandler()])
    log_to_stderr_unless_configured()
    assert worker_log.handlers == [] and worker_log.level == logging.NOTSET


@pytest.mark.system
async def test_runworker_in_a_project_without_logging_logs_its_start_and_each_outcome(project: Project) -> None:
    module = settings_module(project.directory, "nolog_settings", "del LOGGING  # noqa: F821 (a stock project)")
    env = own_settings_env(project, module)
    # Token auth (the default) and no secret: a worker signs no tokens, so no check stops it.
    del env["STREAMCOORD_STREAM_AUTH"]
    log = project.directory / "worker.log"
    worker = start_manage(env, log, "runworker", "--concurrency", "2")
    try:
        text = wait_in_log(worker, log, r"INFO django_app\.worker\.runner: worker \S+ started")
        assert text.count(" started (concurrency 2)") == 1, text  # one handler, one line
        pk = project.create_task("ProgressTask", "steps=1", "delay=0", start=True)["id"]
        wait_in_log(worker, log, rf"INFO django_app\.worker\.execution: task examples\.ProgressTask:{pk} completed")
    finally:
        stop_process(worker)


# -- runworker --reload ------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.system
@pytest.mark.timeout(120)
def test_runworker_reload_restarts_the_worker_when_a_python_file_changes(project: Project) -> None:
    watched = project.directory / "watched"
    watched.mkdir()
    module = settings_module(project.directory, "reload_settings", f"BASE_DIR = __import__('pathlib').Path({str(watched)!r})")
    log = project.directory / "reload.log"
    parent = start_manage(own_settings_env(project, module, shutdown_grace_seconds=1), log, "runworker", "--reload")
    workers: list[int] = []
    try:
        wait_in_log(parent, log, r"worker \S+ started")
        (watched / "notes.txt").write_text("not code")  # only .py files count
        (watched / "tasks_v2.py").write_text("VERSION = 2\n")
        text = wait_in_log(parent, log, r"worker \S+ started", count=2)
        assert "tasks_v2.py changed: restarting the worker" in text and "notes.txt" not in text, text
        workers = [int(pid) for pid in re.findall(r"worker \S+-(\d+)-[0-9a-f]{4} started", text)]
        assert len(set(workers)) == 2 and parent.pid not in workers, text
        assert not alive(workers[0])  # the first worker was stopped, by SIGINT, before the second
        assert "stopped" in text
        assert stop_process(parent, signal.SIGTERM, timeout=20) == 0, log.read_text()
        wait_for(lambda: not alive(workers[1]), 10, "the last worker to stop with its parent")
    finally:
        stop_process(parent)
        for pid in workers:  # ours too: never leave one behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
