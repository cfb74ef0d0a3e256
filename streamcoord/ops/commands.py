"""The ``streamcoord`` operator subcommands: status, tasks, show, tail, cancel, retry, top.

Each reads ``STREAMCOORD_REDIS_URL`` (any topology: one Redis, Sentinel, Cluster; or, with none,
the embedded default another local process announced) and ``STREAMCOORD_KEY_PREFIX``, opens one
small client, and prints text (rich tables on a terminal) or, with ``--json``, JSON (one
document; ``tail`` and ``top`` one per line). None needs Django or a gateway.

Exit status: 0 done; 1 nothing to do or show (an unknown task, nothing to cancel or retry, a
tail that ended without a terminal event); 2 a usage or configuration error; 3 Redis failed.
Ctrl-C ends ``top`` with 0 and the others with 130.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console, RenderableType
from rich.live import Live
from rich.rule import Rule
from rich.text import Text

from .. import runtime
from ..connection import RedisFactory, redacted
from ..embedded import discover
from ..errors import ConfigurationError, StreamcoordError
from ..keys import KeySpace
from ..settings import Settings
from ..taskstate import State
from . import render
from .control import cancel_task, retry_task
from .events import StreamEvent
from .status import collect_status
from .tail import follow
from .tasks import LATEST_EVENTS, TaskFilter, list_tasks, resolve_ref, show_task

#: Where a project's embedded default announces itself when nothing says otherwise (beside
#: manage.py: the operator runs this command from the project's directory).
EMBEDDED_URL_FILE = ".streamcoord-embedded.url"
#: Width of text output that goes to a file or pipe (a terminal's own width is used otherwise).
PIPE_WIDTH = 160
EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_REDIS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

TASK_HELP = "the task: app.Model:pk (e.g. examples.ProgressTask:7), or Model:pk when no two apps share the name"


def add_commands(commands: Any) -> None:
    """Add the operator subcommands to the ``streamcoord`` parser's subparsers."""

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help)
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
        return parser

    command("status", "the whole system at a glance: queue, workers, gateways, dead letters, tasks by state")
    tasks = command("tasks", "list tasks (newest in their state first) with state, attempt, worker, last event, age")
    tasks.add_argument(
        "--state", action="append", default=[], metavar="S",
        help=f"only tasks in this state (repeat, or a comma list): {', '.join(s.value for s in State)}",
    )
    tasks.add_argument("--model", default="", metavar="M", help="only tasks of this model (Model or app.Model, any case)")
    tasks.add_argument("--limit", type=_positive, default=50, metavar="N", help="show at most N tasks (default 50)")
    show = command("show", "one task's state record and its latest events")
    show.add_argument("task", help=TASK_HELP)
    show.add_argument("--events", type=_natural, default=LATEST_EVENTS, metavar="N",
                      help=f"latest events to list (default {LATEST_EVENTS})")
    tail = command("tail", "follow a task's events straight from Redis, each exactly once, until its end")
    tail.add_argument("task", help=TASK_HELP)
    tail.add_argument("--from", dest="from_seq", type=_positive, default=1, metavar="SEQ",
                      help="start at this event sequence (default 1: the whole retained history)")
    cancel = command("cancel", "cancel a task wherever it is (the database row is not touched)")
    cancel.add_argument("task", help=TASK_HELP)
    retry = command("retry", "queue an ended (failed, cancelled, completed, dead-lettered) task again, same stream, new epoch")
    retry.add_argument("task", help=TASK_HELP)
    top = command("top", "the status view, refreshed live (Ctrl-C quits)")
    top.add_argument("--interval", type=_seconds, default=2.0, metavar="SECONDS", help="refresh every SECONDS (default 2)")
    top.add_argument("--iterations", type=_natural, default=0, metavar="N",
                     help="stop after N refreshes (default 0: until Ctrl-C)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number from 1")
    return value


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: give 0.05 to 3600 seconds")
    return value


def operator_settings() -> Settings:
    """The settings from the environment, with the embedded default's URL when none is set and
    a local project announced one."""
    settings = Settings.from_env()
    if settings.redis_url:
        return settings
    announced = discover(settings.embedded_url_file or EMBEDDED_URL_FILE)
    if announced is None:
        raise ConfigurationError(
            "no Redis: set STREAMCOORD_REDIS_URL (redis://, unix://, redis+sentinel://, redis+cluster://)"
        )
    return Settings.from_env(redis_url=announced.url)


def console() -> Console:
    """Text output: the terminal's width, or :data:`PIPE_WIDTH` into a file or pipe (tables
    would fold at 80 columns otherwise), unless ``COLUMNS`` says."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(width=width, highlight=False)


def run(args: argparse.Namespace) -> int:
    """Run one operator subcommand; its exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = console()
    try:
        settings = operator_settings()
        return runtime.run(_session(settings, lambda redis: COMMANDS[args.command](redis, settings, args, out)))
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "top" else EXIT_INTERRUPTED
    except StreamcoordError as exc:
        print(f"streamcoord {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RedisError, OSError) as exc:
        url = redacted(os.environ.get("STREAMCOORD_REDIS_URL", ""))
        print(f"streamcoord {args.command}: Redis failed ({url or 'embedded'}): {exc}", file=sys.stderr)
        return EXIT_REDIS


async def _session(settings: Settings, work: Callable[[Redis], Awaitable[int]]) -> int:
    factory = RedisFactory(settings)
    client = factory.client("ops", max_connections=4)
    try:
        await factory.ready(client)
        return await work(client)
    finally:
        await client.aclose()
        await factory.close()


def _print_json(document: Any) -> None:
    print(json.dumps(document, ensure_ascii=False, indent=2))


Command = Callable[[Redis, Settings, argparse.Namespace, Console], Awaitable[int]]


async def status_command(redis: Redis, settings: Settings, args: argparse.Namespace, out: Console) -> int:
    status = await collect_status(redis, KeySpace(settings.key_prefix))
    if args.json:
        _print_json(status.to_json())
    else:
        out.print(render.status_view(status))
    return EXIT_OK


def task_filter(states: list[str], model: str) -> TaskFilter:
    """The filter of ``tasks``' options; raises ConfigurationError for an unknown state."""
    wanted = frozenset(s.strip() for given in states for s in given.split(",") if s.strip())
    unknown = wanted - {s.value for s in State}
    if unknown:
        raise ConfigurationError(
            f"unknown state {', '.join(sorted(unknown))}: use {', '.join(s.value for s in State)}"
        )
    return TaskFilter(wanted, model)


async def tasks_command(redis: Redis, settings: Settings, args: argparse.Namespace, out: Console) -> int:
    listing = await list_tasks(redis, KeySpace(settings.key_prefix), task_filter(args.state, args.model), args.limit)
    if args.json:
        rows = [
            {
                "task": r.ref.label, "state": r.state, "attempt": r.attempt, "worker": r.worker,
                "last_seq": r.last_seq, "last_type": r.last_type, "age_seconds": r.age_seconds(listing.at_ms),
                "updated_at": r.updated_at, "epoch": r.epoch,
            }
            for r in listing.tasks
        ]
        _print_json({"matched": listing.matched, "scanned": listing.scanned, "tasks": rows})
    else:
        out.print(render.tasks_view(listing))
    return EXIT_OK


async def show_command(redis: Redis, settings: Settings, args: argparse.Namespace, out: Console) -> int:
    keys = KeySpace(settings.key_prefix)
    detail = await show_task(redis, keys, await resolve_ref(redis, keys, args.task), args.events)
    if args.json:
        _print_json(detail.to_json())
    else:
        out.print(render.task_view(detail))
    return EXIT_OK if detail.known else EXIT_NOTHING


async def tail_command(redis: Redis, settings: Settings, args: argparse.Namespace, out: Console) -> int:
    keys = KeySpace(settings.key_prefix)
    ref = await resolve_ref(redis, keys, args.task)
    ended = False
    async for item in follow(redis, keys, ref, from_seq=args.from_seq, block_ms=settings.block_ms):
        line = render.tail_json(item) if args.json else render.tail_line(item)
        print(line, flush=True)  # plain print: a line per event, whatever rich would wrap
        ended = isinstance(item, StreamEvent) and item.terminal
    return EXIT_OK if ended else EXIT_NOTHING


def _control_output(label: str, result: Any, args: argparse.Namespace, out: Console) -> None:
    if args.json:
        _print_json({"task": label, **result.to_json()})
    else:
        out.print(f"{label}: {result.describe()}", soft_wrap=True)
        out.print(f"row: {result.row_note()}", soft_wrap=True)


async def cancel_command(redis: Redis, settings: Settings, args: argparse.Namespace, out: Console) -> int:
    ref = await resolve_ref(redis, KeySpace(settings.key_prefix), args.task)
    result = await cancel_task(redis, settings, ref)
    _control_output(ref.label, result, args, out)
    return EXIT_OK if result else EXIT_NOTHING


async def retry_command(redis: Redis, settings: Settings, args: argparse.Namespace, out: Console) -> int:
    ref = await resolve_ref(redis, KeySpace(settings.key_prefix), args.task)
    result = await retry_task(redis, settings, ref)
    _control_output(ref.label, result, args, out)
    return EXIT_OK if result else EXIT_NOTHING


async def top_command(redis: Redis, settings: Settings, args: argparse.Namespace, out: Console) -> int:
    """Refresh the status view every ``--interval`` seconds: in place on a terminal (rich
    Live), else one view after another (a log, a pipe; like ``top -b``); JSON lines with
    ``--json``. A failed reading is shown, and the next one tried: top outlives a Redis
    restart."""
    keys = KeySpace(settings.key_prefix)
    frames = 0

    async def frame() -> RenderableType | dict[str, Any]:
        try:
            status = await collect_status(redis, keys)
        except (RedisError, OSError) as exc:
            if args.json:
                return {"error": str(exc)}
            return Text(f"reading the status failed: {exc}; trying again in {args.interval}s", style="red")
        return status.to_json() if args.json else render.status_view(status)

    def more() -> bool:
        return not args.iterations or frames < args.iterations

    if out.is_terminal and not args.json:
        with Live(console=out, auto_refresh=False, screen=False, transient=False) as live:
            while more():
                view = await frame()
                assert not isinstance(view, dict)
                live.update(view, refresh=True)
                frames += 1
                if more():
                    await asyncio.sleep(args.interval)
        return EXIT_OK
    while more():
        view = await frame()
        if isinstance(view, dict):
            print(json.dumps(view, ensure_ascii=False), flush=True)
        else:
            out.print(Rule(style="dim"))
            out.print(view)
            out.file.flush()
        frames += 1
        if more():
            await asyncio.sleep(args.interval)
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "status": status_command,
    "tasks": tasks_command,
    "show": show_command,
    "tail": tail_command,
    "cancel": cancel_command,
    "retry": retry_command,
    "top": top_command,
}
