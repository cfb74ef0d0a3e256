"""Outcomes as terminal events: which failure texts reach a task's watchers."""

from __future__ import annotations

from .workerparts import Outcome, outcomes


def test_a_private_failure_says_only_its_type() -> None:
    outcome = Outcome.failed("KeyError", "'password' not in secrets.json", public=False)
    assert outcome.payload() == {"message": outcomes.PRIVATE_FAILURE, "error_type": "KeyError"}
    assert outcome.row_error == "KeyError: 'password' not in secrets.json"  # the row keeps it


def test_public_failures_say_their_text() -> None:
    assert Outcome.failed("TaskFailure", "the file has no header").payload()["message"] == "the file has no header"
    lost = Outcome.failed("WorkerLost", "the worker running it stopped (attempt 2)", attempt=2)
    assert lost.payload() == {"message": "the worker running it stopped (attempt 2)", "error_type": "WorkerLost", "attempt": 2}


def test_an_outcome_read_back_from_a_row_is_private_unless_its_type_is_public() -> None:
    private = Outcome.from_row("failed", None, "ValueError: row 7 of a secret table")
    assert private is not None and private.payload()["message"] == outcomes.PRIVATE_FAILURE
    exposed = Outcome.from_row("failed", None, "ValueError: row 7 of a secret table", expose=True)
    assert exposed is not None and exposed.payload()["message"] == "row 7 of a secret table"
    public = Outcome.from_row("failed", None, "TaskFailure: the file has no header")
    assert public is not None and public.payload()["message"] == "the file has no header"
