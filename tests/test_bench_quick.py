"""The benchmark suite's smoke test: ``python -m tests.bench --quick`` runs every scenario.

It checks that each scenario of the suite produced rows and that the reports were written;
never how fast anything was (the machine may be shared).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.report import CHART_NAME, JSON_NAME, MARKDOWN_NAME
from tests.bench.scenarios import SCENARIOS

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
#: The quick mode takes under two minutes; the margin is for a busy machine.
QUICK_LIMIT = 240


@pytest.mark.timeout(QUICK_LIMIT + 30)
def test_quick_suite_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--out", str(out)],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=QUICK_LIMIT, check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]

    results = json.loads((out / JSON_NAME).read_text())
    scenarios_with_rows = {row["scenario"] for row in results["rows"]}
    assert scenarios_with_rows >= set(SCENARIOS), done.stderr[-5000:]
    assert set(results["scenarios"]) == set(SCENARIOS)
    for name, outcome in results["scenarios"].items():
        # A scenario module not written yet is reported, not failed; one that exists must run
        # and measure something (a row with figures), however slowly.
        assert outcome["outcome"] in ("ran", "not implemented"), (name, done.stderr[-5000:])
        if outcome["outcome"] == "ran":
            measured = [r for r in results["rows"] if r["scenario"] == name and r["metrics"]]
            assert measured, (name, [r["notes"] for r in results["rows"] if r["scenario"] == name])
    assert results["quick"] is True
    machine = results["machine"]
    assert machine["cores"] and machine["python"] and machine["redis_server"]
    for row in results["rows"]:
        assert set(row) == {"scenario", "contender", "params", "metrics", "notes"}

    markdown = (out / MARKDOWN_NAME).read_text()
    for name in SCENARIOS:
        assert f"## {name}" in markdown
    assert markdown in done.stdout  # the suite prints the Markdown at the end
    assert (out / CHART_NAME).read_bytes().startswith(b"\x89PNG")
