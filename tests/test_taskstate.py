"""The task-state record: names the scripts write, decoding, and the moves the scripts make."""

from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path

import pytest
from redis.asyncio import Redis

import streamcoord
from streamcoord import EventLog, Settings, TaskRef
from streamcoord.errors import AppendError
from streamcoord.jobs import Job, JobQueue, Verdict
from streamcoord.keys import KeySpace
from streamcoord.publisher import Append, Status
from streamcoord.taskstate import ENDED, TERMINAL_EVENTS, TRANSITIONS, Field, State, TaskState

from .processes import RedisServer

SCRIPTS = sorted(Path(streamcoord.__file__).parent.glob("*.lua"))
#: Lowercase words a script may spell besides state and field names: its modes and replies,
#: the fields of a stream entry, Redis's names of key types, and the live channel's suffix.
SCRIPT_WORDS = {"start", "lazy"} | set(Status) | set(Verdict) | {"epoch", "type", "data"} | {"stream", "hash", "none"} | {"live"}


def test_every_script_is_known_and_documents_its_contract() -> None:
    names = {path.stem for path in SCRIPTS}
    assert names == {
        "append", "start", "job_added", "start_failed", "begin", "renew", "recover", "hand_back", "cancel",
        "retry", "forget", "finish_if_ours",
    }
    for path in SCRIPTS:
        header = path.read_text().split("\n", 1)[0]
        assert header.startswith("-- "), f"{path.name} starts without its contract comment"
        assert "KEYS:" in path.read_text() and "Returns" in path.read_text(), path.name


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_spell_only_names_defined_in_taskstate(path: Path) -> None:
    code = "\n".join(line.split("--", 1)[0] for line in path.read_text().splitlines())
    words = set(re.findall(r"'([a-z_]+)'", code))
    unknown = words - set(State) - set(Field) - SCRIPT_WORDS
    assert not unknown, f"{path.name} spells {sorted(unknown)}, which taskstate.py does not define"


def test_append_arguments_are_named_in_the_scripts_order() -> None:
    header = (Path(streamcoord.__file__).parent / "append.lua").read_text()
    order = re.search(r"--\s+epoch, seq, type, data,\n((?:--\s+\w+\s.*\n)+)", header)
    assert order is not None
    rest = [line.split()[1] for line in order.group(1).splitlines() if re.match(r"--\s{4,}\w+\s{2,}", line)]
    assert list(Append._fields) == ["events_key", "state_key", "epoch", "seq", "type", "data", *rest]


def test_terminal_events_end_in_ended_states() -> None:
    assert set(TERMINAL_EVENTS.values()) == ENDED == {State.COMPLETED, State.FAILED, State.CANCELLED}


def test_from_hash_reads_every_field_and_survives_hand_edits() -> None:
    raw = {field.value.encode(): b"x" for field in Field}
    raw |= {b"state": b"running", b"attempt": b"2", b"last_seq": b"oops", b"final_value": b"{bad",
            b"end_data": b'{"a":1}', b"unknown": b"ignored"}
    state = TaskState.from_hash(raw)
    assert state is not None
    assert (state.state, state.attempt, state.last_seq, state.final_value) == ("running", 2, 0, None)
    assert state.end_data == b'{"a":1}' and state.worker == "x" and not state.ended
    assert TaskState.from_hash({}) is None
    assert TaskState.from_hash({b"final_value": b"[1]"}) == TaskState(state="", final_value=[1])


@pytest.mark.system
async def test_random_walks_through_the_scripts_make_only_the_drawn_moves(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Operations on a few tasks in a random order, as callers racing each other would issue
    them: every move of a record is one of TRANSITIONS, and an ended task stays ended."""
    keys = KeySpace("sc")
    log = EventLog(redis, Settings(redis_url=redis_server.url))
    queue = JobQueue(redis, keys)
    await queue.ensure_group()
    rng = random.Random(20261203)
    refs = [TaskRef("shop", "Job", str(pk)) for pk in range(6)]
    writers = {ref: log.writer(ref, "") for ref in refs}
    seen: set[tuple[State | None, State]] = set()

    async def state_of(ref: TaskRef) -> State | None:
        value = await redis.hget(keys.state(ref), "state")
        return State(value.decode()) if value else None

    for _ in range(600):
        ref = rng.choice(refs)
        before = await state_of(ref)
        step = rng.choice(["declare", "start", "lazy", "begin", "cancel", "event", "end", "expire", "recover", "retry", "forget"])
        if step == "declare":
            await log.declare(ref)
        elif step in ("start", "lazy"):
            await queue.start(ref, lazy=step == "lazy")
        elif step == "begin":
            await queue.begin(ref, "w1", f"run-{rng.random()}", 30_000)
        elif step == "cancel":
            await queue.request_cancel(ref)
        elif step == "recover":
            await redis.hset(keys.state(ref), "lease_until", 0)  # its worker stopped renewing
            entry = await redis.xadd(keys.jobs(), {"task": ref.label})
            await queue.recover(Job(entry.decode(), ref), "w2", f"run-{rng.random()}", 30_000, 3)
        elif step == "retry":
            await queue.renew_ended(ref)
        elif step in ("expire", "forget"):
            if step == "expire":
                await redis.delete(keys.state(ref), keys.events(ref))
            elif await queue.forget(ref) == State.RUNNING:
                assert await state_of(ref) == State.RUNNING, "forget deleted a running task's record"
                continue
            assert await state_of(ref) is None and not await redis.exists(keys.events(ref))
            writers[ref] = log.writer(ref, "")
            continue
        else:
            kind = rng.choice(list(TERMINAL_EVENTS)) if step == "end" else "progress"
            # The writer of the task's current run: appends outside it are fenced, as they must be.
            run = (await redis.hget(keys.state(ref), "run") or b"").decode()
            if writers[ref].run_token != run:
                writers[ref] = log.writer(ref, run)
            with contextlib.suppress(AppendError):  # fenced, ended: refusals are fine here
                await writers[ref].append(kind, {})
        after = await state_of(ref)
        if after != before:
            assert after is not None, f"{step} deleted the record of {ref}"
            assert (before, after) in TRANSITIONS, f"{step} moved {ref} from {before} to {after}"
            seen.add((before, after))
        if before in ENDED and step != "retry":
            assert after == before, f"{step} moved the ended {ref} on"
    assert len(seen) >= 10, f"the walk saw only {sorted(map(str, seen))}"
    assert any(before in ENDED and after == State.PENDING for before, after in seen), "no retry renewed a task"
