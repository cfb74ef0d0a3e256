"""The operator commands' pure parts: decoding records, registry entries and stream entries,
tallies, the tail's bookkeeping, the rendering, and the command line's parsing. No Redis."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from streamcoord.cli import build_parser
from streamcoord.errors import ConfigurationError
from streamcoord.jobs import CancelOutcome, StartOutcome
from streamcoord.keys import KeySpace, TaskRef
from streamcoord.ops import render
from streamcoord.ops.commands import task_filter
from streamcoord.ops.control import CancelResult, RetryOutcome
from streamcoord.ops.events import StreamEvent, event_of, events_of
from streamcoord.ops.records import (
    FIELDS,
    TaskRecord,
    glob_escape,
    record_of,
    ref_of_state_key,
    seconds_since,
    state_pattern,
)
from streamcoord.ops.status import (
    DeadLetter,
    GatewayStatus,
    QueueStatus,
    RunningTask,
    Status,
    TaskTally,
    WorkerStatus,
    dead_letter_of,
    entry_ms,
    gateway_of,
    heartbeat_age,
    worker_of,
)
from streamcoord.ops.tail import Position, Reset, Stopped, StopReason, after, take
from streamcoord.ops.tasks import TaskDetail, TaskFilter, TaskListing, newest_first
from streamcoord.resets import ResetReason

KEYS = KeySpace("sc")
REF = TaskRef("examples", "ProgressTask", "7")
#: 2026-12-03T12:00:00Z in ms
NOW_MS = 1_796_299_200_000
NOW_ISO = "2026-12-03T12:00:00+00:00"


def text_of(renderable: object, width: int = 200) -> str:
    console = Console(file=io.StringIO(), width=width, record=True)
    console.print(renderable)
    return console.export_text()


# -- records ---------------------------------------------------------------------------------


def test_the_state_key_pattern_matches_task_state_keys_only() -> None:
    assert state_pattern(KEYS) == "sc:{*}:state"
    assert state_pattern(KeySpace("a*b")) == "a\\*b:{*}:state"
    assert glob_escape("x?[y]\\") == "x\\?\\[y\\]\\\\"


@pytest.mark.parametrize(
    ("key", "ref"),
    [
        (b"sc:{examples.ProgressTask:7}:state", REF),
        ("sc:{examples.ProgressTask:7}:state", REF),
        (b"sc:{shop.Job:ab-1}:state", TaskRef("shop", "Job", "ab-1")),
        (b"other:{examples.ProgressTask:7}:state", None),  # another deployment's prefix
        (b"sc:{examples.ProgressTask:7}:events", None),
        (b"sc:{no-model}:state", None),  # written by hand
        (b"sc:{examples.Progress Task:7}:state", None),
    ],
)
def test_a_state_key_names_its_task(key: bytes | str, ref: TaskRef | None) -> None:
    assert ref_of_state_key(KEYS, key) == ref


def values(**fields: str) -> list[bytes | None]:
    return [fields[f.value].encode() if f.value in fields else None for f in FIELDS]


def test_a_record_decodes_and_a_gone_one_is_none() -> None:
    record = record_of(REF, values(state="running", attempt="2", worker="w1", last_seq="12", last_type="progress",
                                   running_since=NOW_ISO, epoch="ab12"))
    assert record == TaskRecord(ref=REF, state="running", attempt=2, worker="w1", epoch="ab12", last_seq=12,
                                last_type="progress", running_since=NOW_ISO)
    assert record_of(REF, values()) is None  # expired between SCAN and HMGET
    assert record_of(REF, values(state="queued", attempt="x")) == TaskRecord(ref=REF, state="queued")  # a hand edit


@pytest.mark.parametrize(
    ("state", "since"),
    [
        ("pending", "created"), ("queued", "queued"), ("cancelling", "queued"), ("running", "running"),
        ("completed", "ended"), ("failed", "ended"), ("cancelled", "ended"),
    ],
)
def test_a_tasks_age_is_the_time_in_its_state(state: str, since: str) -> None:
    times = {"created": "2026-12-03T11:00:00+00:00", "queued": "2026-12-03T11:10:00+00:00",
             "running": "2026-12-03T11:20:00+00:00", "ended": "2026-12-03T11:30:00+00:00"}
    record = TaskRecord(ref=REF, state=state, created_at=times["created"], queued_at=times["queued"],
                        running_since=times["running"], ended_at=times["ended"])
    assert record.since == times[since]
    assert record.age_seconds(NOW_MS) == seconds_since(times[since], NOW_MS)


def test_ages_are_never_negative_and_unknown_times_have_none() -> None:
    assert seconds_since("2026-12-03T11:59:58.5+00:00", NOW_MS) == 1.5
    assert seconds_since("2026-12-03T12:00:05+00:00", NOW_MS) == 0.0  # a host clock ahead of Redis
    assert seconds_since("", NOW_MS) is None
    assert seconds_since("yesterday", NOW_MS) is None
    assert seconds_since("2026-12-03T11:00:00", NOW_MS) is None  # no zone: no guess
    assert TaskRecord(ref=REF, state="running").age_seconds(NOW_MS) is None


# -- registry entries, dead letters, queue ids -------------------------------------------------


def test_a_worker_entry_reads_as_presence_writes_it() -> None:
    raw = json.dumps({"host": "h1", "pid": 42, "concurrency": 50, "running": 3, "started_at": NOW_ISO,
                      "heartbeat_at": NOW_ISO, "heartbeat_ms": NOW_MS - 2500}).encode()
    assert worker_of("h1-42-ab", raw, NOW_MS) == WorkerStatus("h1-42-ab", "h1", 42, 50, 3, 2.5)


def test_a_gateway_entry_reads_as_presence_writes_it() -> None:
    raw = json.dumps({"host": "h2", "pid": 7, "address": "unix:/run/gw.sock", "admin": "", "started_at": NOW_ISO,
                      "heartbeat_ms": NOW_MS - 1000, "heartbeat_at": NOW_ISO, "listeners": 4, "streams": 2,
                      "deliveries": 99}).encode()
    assert gateway_of("gw-1", raw, NOW_MS) == GatewayStatus("gw-1", "h2", 7, "unix:/run/gw.sock", 4, 2, 99, 1.0)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'{"pid": "x", "running": true, "heartbeat_ms": "soon"}', b'{"heartbeat_ms": 1e400}'],
)
def test_an_unreadable_entry_is_shown_with_blanks_not_an_error(raw: bytes) -> None:
    worker = worker_of("w", raw, NOW_MS)
    assert (worker.id, worker.pid, worker.running, worker.heartbeat_age_seconds) == ("w", None, None, None)


def test_an_older_entry_with_only_heartbeat_at_has_an_age() -> None:
    assert heartbeat_age(json.dumps({"heartbeat_at": "2026-12-03T11:59:00+00:00"}).encode(), NOW_MS) == 60.0


def test_a_dead_letter_decodes() -> None:
    fields = {b"task": b"examples.PoisonTask:3", b"attempts": b"3", b"reason": b"WorkerLost", b"at": NOW_ISO.encode()}
    assert dead_letter_of(b"1-0", fields) == DeadLetter("1-0", "examples.PoisonTask:3", 3, "WorkerLost", NOW_ISO)
    assert dead_letter_of("2-0", {b"reason": b"malformed job"}).attempts is None


def test_a_queue_entry_id_carries_the_redis_clock() -> None:
    assert entry_ms(b"1796299200000-3") == NOW_MS
    assert entry_ms("5-0") == 5


# -- tallies and the status document ------------------------------------------------------------


def record(pk: int, state: str, minutes_ago: int = 1) -> TaskRecord:
    at = f"2026-12-03T11:{60 - minutes_ago:02d}:00+00:00"
    return TaskRecord(ref=TaskRef("examples", "ProgressTask", str(pk)), state=state, attempt=1, worker="w",
                      running_since=at, created_at=at, queued_at=at, ended_at=at, updated_at=at)


def test_the_tally_counts_every_state_and_keeps_the_longest_running() -> None:
    tally = TaskTally(limit=2)
    tally.add([record(1, "running", 5), record(2, "completed"), record(3, "running", 30)], NOW_MS)
    tally.add([record(4, "cancelling", 10), record(5, "running", 1), record(3, "running", 30)], NOW_MS)
    assert tally.by_state == {"pending": 0, "queued": 0, "running": 4, "cancelling": 1, "completed": 1,
                              "failed": 0, "cancelled": 0}
    assert [r.task for r in tally.running(NOW_MS)] == ["examples.ProgressTask:3", "examples.ProgressTask:4"]


def test_the_tally_stays_bounded_over_many_batches() -> None:
    tally = TaskTally(limit=3)
    for batch in range(20):
        tally.add([record(batch * 100 + n, "running", 1 + (n % 50)) for n in range(100)], NOW_MS)
    assert len(tally.active) <= 2 * 500
    assert [r.age_seconds for r in tally.running(NOW_MS)] == [50 * 60.0] * 3


def sample_status() -> Status:
    return Status(
        at="2026-12-03T12:00:00.000+00:00",
        queue=QueueStatus(length=3, pending=2, lag=1, oldest_age_seconds=4.2),
        workers=[WorkerStatus("h-1-a", "h", 1, 1, 1, 0.5)],
        gateways=[GatewayStatus("gw-a", "h", 2, "unix:/tmp/gw.sock", 3, 2, 40, 0.25)],
        dead_letter_count=1,
        dead_letters=[DeadLetter("9-0", "examples.ProgressTask:2", 1, "WorkerLost", NOW_ISO)],
        by_state={"pending": 1, "running": 1},
        running=[RunningTask("examples.ProgressTask:5", "running", 2, "h-1-a", 7, "progress", 61.0, NOW_ISO)],
    )


def test_the_status_document_has_the_shape_the_dashboard_reads() -> None:
    document = json.loads(json.dumps(sample_status().to_json()))
    assert set(document) == {"at", "queue", "workers", "gateways", "dead_letters", "tasks"}
    assert set(document["queue"]) == {"length", "pending", "lag", "oldest_age_seconds"}
    assert set(document["workers"][0]) == {"id", "host", "pid", "concurrency", "running", "heartbeat_age_seconds"}
    assert set(document["gateways"][0]) == {"id", "host", "pid", "address", "listeners", "streams", "deliveries",
                                            "heartbeat_age_seconds"}
    assert set(document["dead_letters"]) == {"count", "latest"}
    assert set(document["dead_letters"]["latest"][0]) == {"id", "task", "attempts", "reason", "at"}
    assert set(document["tasks"]) == {"by_state", "running"}
    assert set(document["tasks"]["running"][0]) == {"task", "state", "attempt", "worker", "last_seq", "last_type",
                                                    "age_seconds", "updated_at"}


def test_the_status_view_shows_every_part() -> None:
    text = text_of(render.status_view(sample_status()))
    for expected in ("length 3", "waiting 1", "claimed 2", "oldest wait 4.2s", "pending 1", "running 1",
                     "dead letters  1", "workers (1)", "h-1-a", "1/1", "gateways (1)", "unix:/tmp/gw.sock",
                     "examples.ProgressTask:5", "7 progress", "1m01s", "WorkerLost"):
        assert expected in text, (expected, text)


def test_an_empty_system_renders() -> None:
    empty = Status("2026-12-03T12:00:00.000+00:00", QueueStatus(), [], [], 0, [], {}, [])
    text = text_of(render.status_view(empty))
    assert "workers: none" in text and "gateways: none" in text and "oldest wait -" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.04, "0.0s"), (9.94, "9.9s"), (42.7, "42s"), (184, "3m04s"), (7500, "2h05m"), (273600, "3d04h")],
)
def test_durations_are_short(seconds: float | None, text: str) -> None:
    assert render.duration(seconds) == text


# -- tasks -------------------------------------------------------------------------------------


def test_the_filter_matches_states_and_models_in_any_case() -> None:
    running = record(1, "running")
    assert TaskFilter().matches(running)
    assert TaskFilter(frozenset({"running", "queued"})).matches(running)
    assert not TaskFilter(frozenset({"failed"})).matches(running)
    assert TaskFilter(model="progresstask").matches(running)
    assert TaskFilter(model="Examples.ProgressTask").matches(running)
    assert not TaskFilter(model="other.ProgressTask").matches(running)
    assert not TaskFilter(model="Progress").matches(running)


def test_the_state_options_take_lists_and_refuse_unknown_states() -> None:
    assert task_filter(["running,failed", " queued "], "M") == TaskFilter(frozenset({"running", "failed", "queued"}), "M")
    with pytest.raises(ConfigurationError, match="unknown state runing"):
        task_filter(["runing"], "")


def test_newest_first_keeps_the_limit_and_one_row_per_task() -> None:
    records = [record(1, "running", 30), record(2, "failed", 2), record(3, "queued", 10), record(2, "failed", 2),
               TaskRecord(ref=TaskRef("examples", "ProgressTask", "4"), state="pending")]
    assert [r.ref.pk for r in newest_first(records, NOW_MS, 3)] == ["2", "3", "1"]
    assert [r.ref.pk for r in newest_first(records, NOW_MS, 10)] == ["2", "3", "1", "4"]  # no time: last


def test_the_tasks_view_lists_the_rows() -> None:
    listing = TaskListing(NOW_MS, [record(1, "running", 5)], matched=1, scanned=9)
    text = text_of(render.tasks_view(listing))
    assert "1 shown of 1 matching (9 in Redis)" in text and "examples.ProgressTask:1" in text and "5m00s" in text


def test_the_task_view_shows_the_record_and_events() -> None:
    events = events_of([
        (b"1-0", {b"epoch": b"ab12", b"type": b"start", b"data": b'{"total_steps":2,"_task_id":7,"_timestamp":"T1"}'}),
        (b"2-0", {b"epoch": b"ab12", b"type": b"complete", b"data": b'{"final_value":{"steps":2},"_task_id":7}'}),
    ])
    from streamcoord.taskstate import TaskState

    detail = TaskDetail(REF, NOW_MS, TaskState("completed", attempt=1, epoch="ab12", last_seq=2,
                                               end_data=b'{"final_value":{"steps":2}}'),
                        events, length=2, first_seq=1, stream_ttl=86000, state_ttl=None,
                        events_key=KEYS.events(REF), state_key=KEYS.state(REF))
    text = text_of(render.task_view(detail))
    for expected in ("examples.ProgressTask:7", "completed", "ab12-1", "ab12-2", '{"total_steps":2}', "T1",
                     "2 events, from 1", "sc:{examples.ProgressTask:7}:events"):
        assert expected in text, (expected, text)
    document = detail.to_json()
    assert document["record"]["end_data"] == '{"final_value":{"steps":2}}'
    assert [e["id"] for e in document["events"]] == ["ab12-1", "ab12-2"]


# -- stream entries and the tail -----------------------------------------------------------------


def event(seq: int, epoch: str = "ab12", event_type: str = "progress") -> StreamEvent:
    return StreamEvent(seq, epoch, event_type, json.dumps({"step": seq, "_task_id": 7, "_timestamp": "T"}))


def test_entries_decode_and_malformed_ones_are_left_out() -> None:
    good = (b"3-0", {b"epoch": b"ab12", b"type": b"progress", b"data": b'{"step":3}'})
    assert event_of(*good) == StreamEvent(3, "ab12", "progress", '{"step":3}')
    assert event_of(b"3-1", good[1]) is None
    assert event_of(b"0-0", good[1]) is None
    assert event_of(b"4-0", {b"type": b"x"}) is None
    assert events_of([good, (b"x", {})]) == [event_of(*good)]
    assert event_of(b"5-0", {b"epoch": b"e", b"type": b"complete", b"data": b"not json"}).payload == "not json"  # type: ignore[union-attr]


def test_the_tail_gives_each_event_once_and_stops_at_the_terminal_one() -> None:
    position = Position(seq=1)
    items, restart = take(position, [event(1), event(2), event(3), event(4, event_type="complete"), event(5)])
    assert items == [event(2), event(3), event(4, event_type="complete")] and not restart
    assert (position.epoch, position.seq) == ("ab12", 4)
    assert after(0) == "-" and after(4) == "(4-0"


def test_a_takeover_is_just_the_next_event() -> None:
    position = Position()
    items, _ = take(position, [event(1, event_type="start"), event(2)])
    items += take(position, [event(3, event_type="attempt"), event(4, event_type="start")])[0]
    assert [i.seq for i in items if isinstance(i, StreamEvent)] == [1, 2, 3, 4]


def test_a_new_epoch_resets_the_tail_to_the_new_streams_start() -> None:
    position = Position("ab12", 5)
    items, restart = take(position, [event(6, epoch="cd34"), event(7, epoch="cd34")])
    assert items == [Reset(ResetReason.EPOCH, "ab12", "cd34")] and restart
    assert (position.epoch, position.seq) == ("cd34", 0)


def test_a_gap_is_told_as_trimmed_and_the_tail_goes_on() -> None:
    position = Position("ab12", 2)
    items, restart = take(position, [event(6), event(7)])
    assert items == [Reset(ResetReason.TRIMMED, "ab12", "ab12", (3, 5)), event(6), event(7)] and not restart
    first = Position(seq=0)  # --from 1 on a stream trimmed to 6..
    assert take(first, [event(6)])[0][0] == Reset(ResetReason.TRIMMED, "", "ab12", (1, 5))


def test_tail_lines() -> None:
    assert render.tail_line(event(3)) == 'ab12-3  progress  T  {"step":3}'
    assert "events 3..5 are no longer in the stream" in render.tail_line(Reset(ResetReason.TRIMMED, "a", "a", (3, 5)))
    assert "epoch ab12 -> cd34" in render.tail_line(Reset(ResetReason.EPOCH, "ab12", "cd34"))
    assert "Redis lost events" in render.tail_line(Reset(ResetReason.POSITION, "ab12", "ab12"))
    assert "no stream and no state record" in render.tail_line(Stopped(StopReason.GONE, ""))
    assert "ended at event 4" in render.tail_line(Stopped(StopReason.PAST_END, "completed", 4))
    assert json.loads(render.tail_json(Reset(ResetReason.EPOCH, "ab12", "cd34"))) == {
        "reset": {"reason": "epoch", "epoch": "ab12", "new_epoch": "cd34", "missing": None}
    }
    assert json.loads(render.tail_json(event(3)))["data"] == {"step": 3, "_task_id": 7, "_timestamp": "T"}


# -- cancel and retry outcomes -------------------------------------------------------------------


def test_the_outcomes_say_what_becomes_of_the_row() -> None:
    running = CancelResult(CancelOutcome("running", worker="w1"), "running")
    assert running.describe() == "cancellation sent to worker w1" and "its worker records" in running.row_note()
    queued = CancelResult(CancelOutcome("cancelled", cancelled=True), "queued")
    assert "claims its job records the row cancelled" in queued.row_note() and bool(queued)
    pending = CancelResult(CancelOutcome("cancelled", cancelled=True), "pending")
    assert "still says pending" in pending.row_note()
    ended = CancelResult(CancelOutcome("completed"), "completed")
    assert not ended and "not touched" in ended.row_note()
    retried = RetryOutcome(True, "failed", StartOutcome(True, "pending"))
    assert retried.describe().startswith("retried: the failed task is queued") and "worker" in retried.row_note()
    assert not RetryOutcome(False, "running") and RetryOutcome(False, "running").describe() == "not retried: the task is running"
    assert "Redis knows nothing" in RetryOutcome(False, "").describe()
    assert RetryOutcome(False, "pending", StartOutcome(True, "pending")).describe() == "queued"


# -- the command line --------------------------------------------------------------------------


def test_every_subcommand_parses_and_the_gateway_is_unchanged() -> None:
    parser = build_parser()
    assert parser.parse_args(["status", "--json"]).json
    args = parser.parse_args(["tasks", "--state", "failed", "--model", "ProgressTask", "--limit", "5"])
    assert (args.state, args.model, args.limit, args.json) == (["failed"], "ProgressTask", 5, False)
    assert parser.parse_args(["show", "examples.ProgressTask:7", "--events", "3"]).events == 3
    assert parser.parse_args(["tail", "examples.ProgressTask:7", "--from", "4"]).from_seq == 4
    assert parser.parse_args(["cancel", "examples.ProgressTask:7"]).task == "examples.ProgressTask:7"
    assert parser.parse_args(["retry", "examples.ProgressTask:7", "--json"]).json
    top = parser.parse_args(["top", "--interval", "0.5", "--iterations", "2"])
    assert (top.interval, top.iterations) == (0.5, 2)
    gateway = parser.parse_args(["gateway", "--socket", "/tmp/x.sock", "--admin-socket", "/tmp/a.sock"])
    assert (gateway.socket, gateway.admin_socket, gateway.host, gateway.port) == ("/tmp/x.sock", "/tmp/a.sock", None, None)


@pytest.mark.parametrize("argv", [["tail", "x:1", "--from", "0"], ["tasks", "--limit", "0"], ["top", "--interval", "0"]])
def test_bad_numbers_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_no_redis_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: object,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from streamcoord.cli import main

    for name in ("STREAMCOORD_REDIS_URL", "STREAMCOORD_EMBEDDED_URL_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(str(tmp_path))
    assert main(["status"]) == 2
    assert "set STREAMCOORD_REDIS_URL" in capsys.readouterr().err
