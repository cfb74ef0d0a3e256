"""The monitoring files of deploy/ read only the metrics streamcoord exports, and the
Kubernetes manifests let Prometheus scrape them, and nobody else.

- ``METRICS`` below is the contract: every metric the gateways (admin listener, ``GET
  /metrics``) and the workers (``runworker --metrics-port``) export, with its type and labels.
  tests/test_deploy_files.py scrapes the compose commands' own processes and holds them to it.
- deploy/grafana/streamcoord.json is a Grafana dashboard on a ``${DS_PROMETHEUS}`` datasource
  variable, its panels laid out without overlaps; every query names only metrics of the
  contract, each used as its type allows (counters under rate/increase, histograms through
  ``_bucket`` in histogram_quantile, labels the metric has), and every metric is on it.
- deploy/prometheus/alerts.yaml: rule groups of alerts, each with ``for``, a severity and the
  annotations that say what to do; the same check of its queries; with promtool on the PATH,
  ``promtool check rules``, the dashboard's queries parsed by promtool, and ``promtool test
  rules`` on the cases below (each alert fires when it should, and only then).
- k8s/: each gateway and worker binds its admin or metrics listener on the pod's address, names
  that port, and carries the prometheus.io annotations that point at it; no Service routes to
  it; the NetworkPolicies admit only the monitoring namespace to it while the public port stays
  open; the prometheus-operator overlay's PodMonitor selects the same ports.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from .processes import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "streamcoord.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
K8S_DIR = DEPLOY / "k8s"
OPERATOR_DIR = K8S_DIR / "prometheus-operator"
PROMTOOL = shutil.which("promtool")
#: promtool is a binary ./run test installs (Debian's, out of the prometheus package); the tests
#: that run it are system tests, and without it they fail, saying so, rather than skip.


@dataclasses.dataclass(frozen=True)
class Metric:
    role: str  # "gateway" or "worker": which process exports it
    kind: str  # "counter", "gauge" or "histogram"
    labels: tuple[str, ...] = ()


#: The contract: every metric streamcoord exports (issue 14), and nothing else of its own.
METRICS: dict[str, Metric] = {
    "streamcoord_gateway_connections_open": Metric("gateway", "gauge"),
    "streamcoord_gateway_connections_total": Metric("gateway", "counter"),
    "streamcoord_gateway_deliveries_total": Metric("gateway", "counter"),
    "streamcoord_gateway_events_read_total": Metric("gateway", "counter"),
    "streamcoord_gateway_bytes_written_total": Metric("gateway", "counter"),
    "streamcoord_gateway_resets_total": Metric("gateway", "counter", ("reason",)),
    "streamcoord_gateway_clients_cut_total": Metric("gateway", "counter", ("reason",)),
    "streamcoord_gateway_window_hits_total": Metric("gateway", "counter"),
    "streamcoord_gateway_history_reads_total": Metric("gateway", "counter"),
    "streamcoord_gateway_redis_errors_total": Metric("gateway", "counter"),
    "streamcoord_gateway_reader_restarts_total": Metric("gateway", "counter"),
    "streamcoord_gateway_streams_followed": Metric("gateway", "gauge"),
    "streamcoord_gateway_reader_up": Metric("gateway", "gauge"),
    "streamcoord_worker_tasks_started_total": Metric("worker", "counter", ("model",)),
    "streamcoord_worker_tasks_ended_total": Metric("worker", "counter", ("model", "outcome")),
    "streamcoord_worker_task_duration_seconds": Metric("worker", "histogram", ("model",)),
    "streamcoord_worker_queue_lag_seconds": Metric("worker", "gauge"),
    "streamcoord_worker_queue_wait_seconds": Metric("worker", "histogram"),
    "streamcoord_worker_send_event_seconds": Metric("worker", "histogram"),
    "streamcoord_worker_lease_takeovers_total": Metric("worker", "counter"),
    "streamcoord_worker_dead_letters_total": Metric("worker", "counter"),
    "streamcoord_worker_dead_letter_entries": Metric("worker", "gauge"),
    "streamcoord_worker_running_tasks": Metric("worker", "gauge"),
    "streamcoord_worker_concurrency": Metric("worker", "gauge"),
    "streamcoord_worker_redis_errors_total": Metric("worker", "counter"),
    # prometheus-client's process collector, which the gateway registers (a gateway runs on one
    # core: its CPU is what to scale on; its descriptors, one per client).
    "process_cpu_seconds_total": Metric("gateway", "counter"),
    "process_resident_memory_bytes": Metric("gateway", "gauge"),
    "process_open_fds": Metric("gateway", "gauge"),
    "process_max_fds": Metric("gateway", "gauge"),
}
#: Labels Prometheus adds to every scraped series (instance and job always; the others from the
#: usual Kubernetes relabelling and the prometheus-operator).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "container", "endpoint"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
#: Functions and aggregations the queries may use (a typo in one is caught without promtool).
FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "rate", "irate", "increase",
    "delta", "deriv", "histogram_quantile", "absent", "absent_over_time", "vector", "scalar",
    "clamp_min", "clamp_max", "max_over_time", "min_over_time", "avg_over_time", "time", "abs",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
#: Grafana's variables, and what promtool gets in their place.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: What the rules must cover (issue 14), by alert name.
REQUIRED_ALERTS = {
    "StreamcoordQueueLagHigh", "StreamcoordDeadLetters", "StreamcoordNoLiveWorker",
    "StreamcoordGatewayReaderDown", "StreamcoordGatewayRedisErrors", "StreamcoordWorkerRedisErrors",
}
SEVERITIES = {"critical", "warning"}
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
#: Each role's listener for Prometheus: its options, the container port's name.
SCRAPED = {
    "gateway": ("--admin-port", "--admin-host", "admin"),
    "worker": ("--metrics-port", "--metrics-host", "metrics"),
}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


# -- reading PromQL ---------------------------------------------------------------------------


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def series_names(expr: str) -> list[tuple[str, str]]:
    """Each series name in ``expr`` with the function it is the direct argument of ('' when
    none): what is left once strings, label matchers, ranges, label lists and function names
    are taken out."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    found = []
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        name = match[0]
        if name in KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        outer = re.search(r"(\w+)\s*\(\s*$", text[:match.start()])
        found.append((name, outer[1] if outer else ""))
    return found


def functions(expr: str) -> set[str]:
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", strip_strings(expr))
    return set(re.findall(r"(?<![\w.$])([A-Za-z_]\w*)\s*\(", text))


def grouping_labels(expr: str) -> set[str]:
    """The labels named in ``by (...)``, ``on (...)`` and the like, and in label matchers."""
    text = strip_strings(expr)
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def check_expr(where: str, expr: str) -> list[str]:
    """Why ``expr`` does not read the contract's metrics as their types allow ([] when it does)."""
    problems = []
    used: list[Metric] = []
    histogram_buckets = False
    names = series_names(expr)
    if not names:
        problems.append(f"{where}: reads no metric")
    for name, outer in names:
        base = next((name.removesuffix(s) for s in HISTOGRAM_SERIES if name.endswith(s) and name.removesuffix(s) in METRICS), name)
        metric = METRICS.get(base)
        if metric is None:
            problems.append(f"{where}: {name} is not a metric streamcoord exports (tests/test_deploy_metrics.py METRICS)")
            continue
        used.append(metric)
        if metric.kind == "histogram" and base == name:
            problems.append(f"{where}: {name} is a histogram: read {name}_bucket, _sum or _count")
        elif metric.kind == "histogram":
            histogram_buckets |= name.endswith("_bucket")
            if outer not in {"rate", "irate", "increase"}:
                problems.append(f"{where}: {name} is a counter of a histogram: rate() or increase() it, not {outer or 'nothing'}")
        elif metric.kind == "counter" and outer not in {"rate", "irate", "increase"}:
            problems.append(f"{where}: {name} is a counter: rate() or increase() it, not {outer or 'nothing'}")
        elif metric.kind == "gauge" and outer in {"rate", "irate", "increase"}:
            problems.append(f"{where}: {name} is a gauge: {outer}() of it means nothing")
    if "histogram_quantile" in functions(expr) and not histogram_buckets:
        problems.append(f"{where}: histogram_quantile over no _bucket series")
    known_labels = TARGET_LABELS | {label for metric in used for label in metric.labels} | ({"le"} if histogram_buckets else set())
    problems += [f"{where}: label {label!r} is on none of its metrics" for label in sorted(grouping_labels(expr) - known_labels)]
    problems += [f"{where}: unknown function {name}()" for name in sorted(functions(expr) - FUNCTIONS - KEYWORDS)]
    return problems


def test_the_query_check_catches_mistakes() -> None:
    """A checker that finds nothing checks nothing: each of these is caught."""
    good = [
        "sum by (instance) (rate(streamcoord_gateway_deliveries_total[$__rate_interval]))",
        "histogram_quantile(0.95, sum by (model, le) (rate(streamcoord_worker_task_duration_seconds_bucket[5m])))",
        "max(streamcoord_worker_queue_lag_seconds) > 60",
        'sum(rate(streamcoord_gateway_clients_cut_total{reason="stall"}[5m]))',
        "count(streamcoord_gateway_reader_up == 0) or vector(0)",
        "absent(streamcoord_worker_concurrency)",
        "sum by (instance) (rate(process_cpu_seconds_total[5m]) and on (instance) streamcoord_gateway_reader_up)",
    ]
    for expr in good:
        assert check_expr("ok", expr) == [], expr
    bad = {
        "sum(rate(streamcoord_gateway_deliverys_total[5m]))": "not a metric streamcoord exports",
        "sum(streamcoord_gateway_deliveries_total)": "is a counter",
        "rate(streamcoord_gateway_connections_open[5m])": "is a gauge",
        "histogram_quantile(0.5, rate(streamcoord_worker_queue_wait_seconds[5m]))": "is a histogram",
        "histogram_quantile(0.5, rate(streamcoord_worker_queue_wait_seconds_sum[5m]))": "no _bucket",
        "sum by (model) (streamcoord_worker_running_tasks)": "label 'model'",
        'sum(rate(streamcoord_gateway_resets_total{outcome="x"}[5m]))': "label 'outcome'",
        "summ(streamcoord_worker_running_tasks)": "unknown function summ()",
        "up == 0": "not a metric streamcoord exports",
        "vector(1)": "reads no metric",
    }
    for expr, why in bad.items():
        problems = check_expr("bad", expr)
        assert any(why in problem for problem in problems), f"{expr}: {problems}"


# -- the dashboard ----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside a collapsed row included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (f"panel {panel['title']!r} {target.get('refId')}", target["expr"])
        for panel in all_panels(load_dashboard()["panels"]) for target in panel.get("targets", [])
    ]


def test_dashboard_is_a_grafana_dashboard_on_the_prometheus_variable() -> None:
    dashboard = load_dashboard()
    problems = []
    for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list), ("templating", dict)):
        if not isinstance(dashboard.get(key), kind):
            problems.append(f"no {key} ({kind.__name__})")
    assert not problems, problems
    assert re.fullmatch(r"[\w-]{1,40}", dashboard["uid"]), "uid: up to 40 letters, digits, - and _"
    assert dashboard.get("id") is None, "no id: Grafana gives one on import"
    # The datasource is a variable (provisioning and Import both resolve it), never a fixed uid.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables.get("DS_PROMETHEUS", {})
    assert (source.get("type"), source.get("query")) == ("datasource", "prometheus"), f"DS_PROMETHEUS: {source}"
    assert "${DS_PROMETHEUS}" not in json.dumps(dashboard["templating"]), "the variable cannot refer to itself"
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert [title for title in rows if title in {"Queue", "Workers", "Gateways"}] == ["Queue", "Workers", "Gateways"], rows
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard["panels"]):
        where = f"panel {panel['title']!r}"
        grid = panel["gridPos"]
        if not (grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24):
            problems.append(f"{where}: gridPos {grid} is off the 24-column grid")
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in taken:
                    problems.append(f"{where} overlaps {taken[(x, y)]} at {x},{y}")
                    break
                taken[(x, y)] = where
            else:
                continue
            break
        if panel["type"] == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{where}: datasource {panel.get('datasource')}, expected {DATASOURCE}")
        if not panel.get("targets"):
            problems.append(f"{where}: no query")
        for target in panel.get("targets", []):
            if target.get("datasource", DATASOURCE) != DATASOURCE:
                problems.append(f"{where} {target.get('refId')}: datasource {target['datasource']}")
            if not target.get("expr"):
                problems.append(f"{where} {target.get('refId')}: no expr")
    assert not problems, "\n".join(problems)


def test_dashboard_reads_every_metric_of_the_contract_and_no_other() -> None:
    queries = dashboard_queries()
    problems = [problem for where, expr in queries for problem in check_expr(where, expr)]
    assert not problems, "\n".join(problems)
    shown = {name for _, expr in queries for name, _ in series_names(expr)}
    shown = {next((n.removesuffix(s) for s in HISTOGRAM_SERIES if n.endswith(s) and n.removesuffix(s) in METRICS), n) for n in shown}
    assert set(METRICS) <= shown, f"not on the dashboard: {sorted(set(METRICS) - shown)}"


# -- the alert rules --------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_are_well_formed() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}, f"a rule file holds groups only: {sorted(document)}"
    problems = []
    names: list[str] = []
    for group in document["groups"]:
        if set(group) - {"name", "interval", "rules", "limit"} or not group.get("name") or not group.get("rules"):
            problems.append(f"group {group.get('name')}: needs a name and rules, has {sorted(group)}")
        for rule in group.get("rules", []):
            name = rule.get("alert")
            where = f"alert {name}"
            names.append(name)
            if not name or "record" in rule:
                problems.append(f"group {group['name']}: {rule}: alerting rules only")
            if unknown := set(rule) - RULE_KEYS:
                problems.append(f"{where}: unknown keys {sorted(unknown)}")
            if not DURATION.match(str(rule.get("for", ""))):
                problems.append(f"{where}: `for` {rule.get('for')!r} is not a duration")
            if (rule.get("labels") or {}).get("severity") not in SEVERITIES:
                problems.append(f"{where}: severity {(rule.get('labels') or {}).get('severity')!r} not one of {sorted(SEVERITIES)}")
            annotations = rule.get("annotations") or {}
            for key in ("summary", "description"):
                if not str(annotations.get(key, "")).strip():
                    problems.append(f"{where}: no {key} annotation")
            problems += check_expr(where, str(rule.get("expr", "")))
    if len(names) != len(set(names)):
        problems.append(f"alert names repeat: {names}")
    if missing := REQUIRED_ALERTS - set(names):
        problems.append(f"missing alerts: {sorted(missing)}")
    assert not problems, "\n".join(problems)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool is not installed: run the tests with ./run test (it unpacks Debian's)"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.system
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.system
def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    """Each query as a recording rule (Grafana's variables replaced): promtool parses them all."""
    rules = []
    for number, (_, expr) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable promtool cannot stand in for: {expr}"
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


#: promtool test rules cases: (name, input series {series: values}, [(alert, eval time,
#: [expected labels of each firing alert])]). Samples every minute; a value list in promtool's
#: expanding notation ('a+bxN': N+1 samples from a, step b).
W1 = 'instance="w1:9100", job="worker"'
W2 = 'instance="w2:9100", job="worker"'
G1 = 'instance="g1:9001", job="gateway"'
G2 = 'instance="g2:9001", job="gateway"'
ALERT_CASES: list[tuple[str, dict[str, str], list[tuple[str, str, list[dict[str, str]]]]]] = [
    ("queue lag over 60 s for 5 minutes", {
        f"streamcoord_worker_queue_lag_seconds{{{W1}}}": "0+0x5 90+0x15",
        f"streamcoord_worker_queue_lag_seconds{{{W2}}}": "0+0x5 80+0x15",
    }, [
        ("StreamcoordQueueLagHigh", "10m", []),
        ("StreamcoordQueueLagHigh", "12m", [{"severity": "warning"}]),
    ]),
    ("queue lag under 60 s", {f"streamcoord_worker_queue_lag_seconds{{{W1}}}": "50+0x30"}, [
        ("StreamcoordQueueLagHigh", "30m", []),
    ]),
    ("workers at 92 % of their concurrency", {
        f"streamcoord_worker_running_tasks{{{W1}}}": "46+0x20",
        f"streamcoord_worker_concurrency{{{W1}}}": "50+0x20",
        f"streamcoord_worker_running_tasks{{{W2}}}": "10+0x20",
        f"streamcoord_worker_concurrency{{{W2}}}": "10+0x20",
    }, [
        ("StreamcoordWorkersSaturated", "14m", []),
        ("StreamcoordWorkersSaturated", "16m", [{"severity": "warning"}]),
        ("StreamcoordNoLiveWorker", "16m", []),
    ]),
    ("the last worker goes away", {f"streamcoord_worker_concurrency{{{W1}}}": "50+0x4 stale"}, [
        ("StreamcoordNoLiveWorker", "4m", []),
        ("StreamcoordNoLiveWorker", "6m", []),
        ("StreamcoordNoLiveWorker", "8m", [{"severity": "critical"}]),
    ]),
    # The dead letters' count is a Redis fact (XLEN sc:dead): every worker reports the same.
    ("a dead letter, then none for 15 minutes", {
        f"streamcoord_worker_dead_letter_entries{{{W1}}}": "0+0x20 1+0x25",
        f"streamcoord_worker_dead_letter_entries{{{W2}}}": "0+0x20 1+0x25",
    }, [
        ("StreamcoordDeadLetters", "20m", []),
        ("StreamcoordDeadLetters", "21m", [{"severity": "warning"}]),
        ("StreamcoordDeadLetters", "35m", [{"severity": "warning"}]),
        ("StreamcoordDeadLetters", "36m", []),
    ]),
    # The case a per-process counter misses: the only worker is lost (its last run used up its
    # attempts); its successor, a new target, lists the task in its first recovery round,
    # before Prometheus first scrapes it: its series begins at 1.
    ("a restarted worker's series begins with its predecessor's dead letter", {
        f"streamcoord_worker_dead_letter_entries{{{W1}}}": "0+0x20 stale",
        f"streamcoord_worker_dead_letter_entries{{{W2}}}": "_x21 1+0x25",
    }, [
        ("StreamcoordDeadLetters", "20m", []),
        ("StreamcoordDeadLetters", "22m", [{"severity": "warning"}]),
        ("StreamcoordDeadLetters", "35m", [{"severity": "warning"}]),
        ("StreamcoordDeadLetters", "36m", []),
    ]),
    ("old dead letters, none new; a worker starts and measures late", {
        f"streamcoord_worker_dead_letter_entries{{{W1}}}": "3+0x40",
        f"streamcoord_worker_dead_letter_entries{{{W2}}}": "_x20 NaN 3+0x19",
    }, [
        ("StreamcoordDeadLetters", "0m", []),
        ("StreamcoordDeadLetters", "14m", []),
        ("StreamcoordDeadLetters", "20m", []),
        ("StreamcoordDeadLetters", "40m", []),
    ]),
    ("a worker's Redis errors go on", {
        f"streamcoord_worker_redis_errors_total{{{W1}}}": "0+3x20",
        f"streamcoord_worker_redis_errors_total{{{W2}}}": "5+0x20",
    }, [
        ("StreamcoordWorkerRedisErrors", "4m", []),
        ("StreamcoordWorkerRedisErrors", "10m", [{"severity": "warning", "instance": "w1:9100", "job": "worker"}]),
    ]),
    ("a gateway's reader down for 5 minutes", {
        f"streamcoord_gateway_reader_up{{{G1}}}": "1+0x3 0+0x5 1+0x5",
        f"streamcoord_gateway_reader_up{{{G2}}}": "1+0x13",
    }, [
        ("StreamcoordGatewayReaderDown", "4m", []),
        ("StreamcoordGatewayReaderDown", "6m", [{"severity": "critical", "instance": "g1:9001", "job": "gateway"}]),
        ("StreamcoordGatewayReaderDown", "11m", []),
    ]),
    ("a gateway's Redis errors go on", {
        f"streamcoord_gateway_redis_errors_total{{{G1}}}": "0+0x20",
        f"streamcoord_gateway_redis_errors_total{{{G2}}}": "0+1x20",
    }, [
        ("StreamcoordGatewayRedisErrors", "4m", []),
        ("StreamcoordGatewayRedisErrors", "10m", [{"severity": "warning", "instance": "g2:9001", "job": "gateway"}]),
    ]),
]


def test_every_alert_has_a_case() -> None:
    tested = {alert for _, _, checks in ALERT_CASES for alert, _, expected in checks if expected}
    assert tested == {rule["alert"] for rule in load_rules()}, "each alert is seen firing in some case"


@pytest.mark.system
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """``promtool test rules`` on ALERT_CASES. The rules' annotations are left out of the copy
    it loads (promtool compares every annotation; `promtool check rules` has parsed their
    templates), so each case states the labels only."""
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(document))
    tests = [
        {
            "name": name,
            "interval": "1m",
            "input_series": [{"series": series, "values": values} for series, values in inputs.items()],
            "alert_rule_test": [
                {"alertname": alert, "eval_time": at, "exp_alerts": [{"exp_labels": labels} for labels in expected]}
                for alert, at, expected in checks
            ],
        }
        for name, inputs, checks in ALERT_CASES
    ]
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["alerts.yaml"], "evaluation_interval": "1m", "tests": tests,
    }))
    result = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes: scraped, and by nobody else --------------------------------------------------


def k8s_documents(directory: Path = K8S_DIR) -> list[dict[str, Any]]:
    return [
        doc for path in sorted(directory.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") != "Kustomization"
    ]


def workloads() -> list[dict[str, Any]]:
    return [doc for doc in k8s_documents() if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}]


def role_of(container: Mapping[str, Any]) -> str | None:
    argv = [*container.get("command", []), *container.get("args", [])]
    if "runserver_stream" in argv or argv[1:4] == ["-m", "streamcoord", "gateway"]:
        return "gateway"
    if "runworker" in argv or argv[1:3] == ["-m", "worker"]:
        return "worker"
    return None


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return selector.items() <= labels.items()


def scraped_ports() -> dict[str, tuple[dict[str, Any], str, int]]:
    """Each workload's name: (its pod template, the scraped port's name, its number)."""
    found = {}
    for doc in workloads():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if (kind := role_of(container)) is None:
                continue
            port_option, _, port_name = SCRAPED[kind]
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            argv = [*container.get("command", []), *container.get("args", [])]
            found[doc["metadata"]["name"]] = (doc["spec"]["template"], port_name, ports.get(port_name) or int(option(argv, port_option) or 0))
    return found


def test_every_gateway_and_worker_pod_is_scraped() -> None:
    problems = []
    roles = set()
    for doc in workloads():
        template = doc["spec"]["template"]
        for container in template["spec"]["containers"]:
            if (kind := role_of(container)) is None:
                continue
            roles.add(kind)
            where = f"{doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            argv = [*container.get("command", []), *container.get("args", [])]
            port_option, host_option, port_name = SCRAPED[kind]
            port = option(argv, port_option)
            if port is None or not port.isdigit() or port == "0":
                problems.append(f"{where}: no {port_option} (Prometheus has nothing to scrape)")
                continue
            if option(argv, host_option) != "0.0.0.0":
                problems.append(f"{where}: {host_option} {option(argv, host_option)}: Prometheus reaches only the pod's address (0.0.0.0)")
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            if ports.get(port_name) != int(port):
                problems.append(f"{where}: no container port {port_name!r} = {port} (the PodMonitor and NetworkPolicy name it)")
            annotations = template["metadata"].get("annotations", {})
            expected = {"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"}
            if {k: annotations.get(k) for k in expected} != expected:
                problems.append(f"{where}: pod annotations {annotations}, expected {expected}")
    assert roles == {"gateway", "worker"}, roles
    assert not problems, "\n".join(problems)


def test_no_service_routes_to_a_metrics_port() -> None:
    scraped = scraped_ports()
    problems = []
    for doc in k8s_documents():
        if doc["kind"] != "Service":
            continue
        for name, (template, port_name, number) in scraped.items():
            if not selects(doc["spec"]["selector"], template["metadata"]["labels"]):
                continue
            for port in doc["spec"]["ports"]:
                if port.get("targetPort", port["port"]) in {port_name, number}:
                    problems.append(f"Service/{doc['metadata']['name']}: routes to {name}'s {port_name} port")
    assert not problems, "\n".join(problems)


def peer_is_picked_namespaces(peer: Mapping[str, Any]) -> bool:
    selector = peer.get("namespaceSelector")
    return set(peer) == {"namespaceSelector"} and bool(selector and (selector.get("matchLabels") or selector.get("matchExpressions")))


def test_network_policies_admit_only_monitoring_to_the_metrics_ports() -> None:
    """Each scraped pod is selected by a policy that admits its metrics port from namespaces
    picked by a namespaceSelector only, and keeps the public port open to all."""
    policies = [doc for doc in k8s_documents() if doc["kind"] == "NetworkPolicy"]
    problems = []
    for name, (template, port_name, number) in scraped_ports().items():
        labels = template["metadata"]["labels"]
        mine = [p for p in policies if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not mine:
            problems.append(f"{name}: no NetworkPolicy selects its pods: anyone in the cluster reaches {port_name}")
            continue
        public = [
            (p.get("name"), p["containerPort"]) for c in template["spec"]["containers"] for p in c.get("ports", [])
            if p.get("name") != port_name
        ]
        rules = [(policy["metadata"]["name"], rule) for policy in mine for rule in policy["spec"].get("ingress", [])]
        for policy_name, rule in rules:
            ports = {p.get("port") for p in rule.get("ports", [])}
            peers = rule.get("from", [])
            # A peer that is not a namespace picked by its labels: everyone, pods of the same
            # namespace, address blocks, or every namespace (an empty selector).
            if (not ports or ports & {port_name, number}) and (not peers or not all(peer_is_picked_namespaces(peer) for peer in peers)):
                problems.append(f"NetworkPolicy/{policy_name}: admits {peers or 'everyone'} to {name}'s {port_name} port")
        for port in public:
            if not any(not rule.get("from") and set(port) & {p.get("port") for p in rule.get("ports", [])} for _, rule in rules):
                problems.append(f"{name}: its public port {port[0]!r} is closed by the NetworkPolicies (clients could not reach it)")
    assert not problems, "\n".join(problems)


def test_the_prometheus_operator_overlay_scrapes_the_same_ports() -> None:
    kustomization = yaml.safe_load((OPERATOR_DIR / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert any((OPERATOR_DIR / r).resolve() == K8S_DIR for r in resources), "the overlay builds on the base (deploy/k8s)"
    assert {r for r in resources if (OPERATOR_DIR / r).is_file()} == {p.name for p in OPERATOR_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    [monitor] = [doc for doc in k8s_documents(OPERATOR_DIR) if doc["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = {e["port"]: e.get("path", "/metrics") for e in monitor["spec"]["podMetricsEndpoints"]}
    problems = []
    for name, (template, port_name, _number) in scraped_ports().items():
        if not selects(selector, template["metadata"]["labels"]):
            problems.append(f"the PodMonitor does not select {name}")
        if endpoints.get(port_name) != "/metrics":
            problems.append(f"the PodMonitor does not scrape {name}'s {port_name} port at /metrics")
    names = {p.get("name") for doc in workloads() for c in doc["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    problems += [f"the PodMonitor scrapes port {port!r}, which no container names" for port in endpoints if port not in names]
    assert not problems, "\n".join(problems)
