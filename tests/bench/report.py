"""The suite's outputs: Markdown tables (one per scenario), a JSON file of every row with the
machine and each scenario's outcome, and a PNG chart of the fan-out: deliveries/s and p99
latency against clients, one line per contender."""

from __future__ import annotations

import dataclasses
import json
from math import nan
from pathlib import Path
from typing import Any

from . import machine as machine_info
from .scenarios import Row

JSON_NAME, MARKDOWN_NAME, CHART_NAME = "results.json", "results.md", "fanout.png"

LABELS = {
    "deliveries_per_s": "deliveries/s", "offered_per_s": "offered/s", "p50_ms": "p50 ms",
    "p99_ms": "p99 ms", "max_ms": "max ms", "server_cpu_pct": "server CPU %",
    "redis_cpu_pct": "Redis CPU %", "client_cpu_pct": "client CPU %",
    "bench_cpu_pct": "publisher CPU %", "other_cpu_pct": "host's other CPU %",
    "rss_peak_mb": "server RSS MB", "redis_conns": "Redis conns", "publish_rate": "published/s",
    "kb_per_client": "KB per client", "client_events_per_s": "events/s per client",
    "kb_per_connection": "KB per connection", "bytes_per_delivery": "SSE bytes per delivery",
    "server_cpu_us_per_delivery": "server CPU us per delivery",
}
#: Figures kept in the JSON but left out of the tables (they would only widen them).
HIDDEN = {"window_s", "delivered", "rss_ready_mb"}


def label(key: str) -> str:
    return LABELS.get(key, key.replace("_", " "))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}".removesuffix(".0")
    return str(value).replace("|", "\\|").replace("\n", " ")


def _keys(dicts: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for d in dicts:
        keys.update(dict.fromkeys(k for k in d if k not in HIDDEN))
    return list(keys)


def table(rows: list[Row]) -> str:
    params = _keys([r.params for r in rows])
    metrics = _keys([r.metrics for r in rows])
    notes = any(r.notes for r in rows)
    header = ["contender", *params, *(label(k) for k in metrics), *(["notes"] if notes else [])]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(params) + len(metrics)) + (["---"] if notes else [])) + "|",
    ]
    for row in rows:
        cells = [row.contender, *(cell(row.params.get(k)) for k in params),
                 *(cell(row.metrics.get(k)) for k in metrics)]
        if notes:
            cells.append(cell(row.notes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any], rows: list[Row], descriptions: dict[str, str]) -> str:
    mode = "quick (smoke) run" if result["quick"] else "full run"
    parts = [
        "# streamcoord benchmark results",
        f"{mode}, started {result['started_at']}, {result['duration_s'] / 60:.1f} min. "
        f"Machine: {machine_info.describe(result['machine'])}.",
        "Figures come from one shared machine: the host's other CPU column shows how busy it "
        "was with work that was not ours. Read them as orders of magnitude.",
    ]
    for name, outcome in result["scenarios"].items():
        scenario_rows = [r for r in rows if r.scenario == name]
        parts.append(f"## {name}")
        if descriptions.get(name):
            parts.append(descriptions[name])
        parts.append(f"_{outcome['outcome']}, {outcome['seconds']:.0f} s._")
        parts.append(table(scenario_rows))
    return "\n\n".join(parts) + "\n"


def write_json(path: Path, result: dict[str, Any], rows: list[Row]) -> None:
    document = {**result, "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def shared_rate(rows: list[Row]) -> float | None:
    """The publish rate measured at the most client counts (the lowest of equals)."""
    counts: dict[float, set[int]] = {}
    for row in rows:
        counts.setdefault(row.params["rate"], set()).add(row.params["clients"])
    return min(counts, key=lambda rate: (-len(counts[rate]), rate)) if counts else None


def write_chart(path: Path, rows: list[Row]) -> None:
    """Fan-out against clients, a line per contender: the most deliveries/s it reached at any
    publish rate, and its p99 latency at the rate measured at every client count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fanout = [r for r in rows if r.scenario == "fanout" and r.metrics.get("deliveries_per_s")]
    rate = shared_rate(fanout)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for color, contender in enumerate(dict.fromkeys(r.contender for r in fanout)):
        own = [r for r in fanout if r.contender == contender]
        best: dict[int, float] = {}
        for r in own:
            clients = r.params["clients"]
            best[clients] = max(best.get(clients, 0.0), r.metrics["deliveries_per_s"])
        p99 = sorted(
            (r.params["clients"], r.metrics.get("p99_ms")) for r in own if r.params["rate"] == rate
        )
        look = {"color": f"C{color}", "marker": "o", "label": contender}
        left.plot(sorted(best), [best[c] for c in sorted(best)], **look)
        right.plot([c for c, _ in p99], [nan if v is None else v for _, v in p99], **look)
    left.set_title("fan-out: deliveries/s (best of the publish rates)")
    right.set_title(f"fan-out: p99 latency, send to client, ms (at {rate or 0:g} events/s)")
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    ticks = sorted({r.params["clients"] for r in fanout})
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("clients on one stream, one server process")
        axes.grid(True, which="both", alpha=0.3)
        if ticks:
            axes.set_xticks(ticks, [f"{t:,}" for t in ticks])
            axes.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(NullFormatter())
    if fanout:
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no fan-out results", ha="center", transform=left.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_all(
    out: Path, result: dict[str, Any], rows: list[Row], descriptions: dict[str, str]
) -> str:
    """Write the JSON, the Markdown and the chart to ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result, rows, descriptions)
    write_json(out / JSON_NAME, result, rows)
    (out / MARKDOWN_NAME).write_text(text)
    write_chart(out / CHART_NAME, rows)
    return text
