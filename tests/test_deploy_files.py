"""The deployment files (deploy/) are linted and name only what exists in the project.

- yamllint passes on deploy/ with the repository's .yamllint.yaml.
- Every command that compose.yaml, the Kubernetes manifests, the systemd units, the Dockerfile
  and deploy/README.md run is checked: each ``manage.py <command>`` exists (ours or Django's)
  and accepts the options given (that command's own parser reads them, in a Django process),
  each ``python -m <module>`` exists (``python -m streamcoord`` parses its options too), and
  runtime commands name only programs the images have.
- Every STREAMCOORD_* variable named anywhere is a field of streamcoord.Settings, every value
  given parses, and every DJANGO_* variable is one the example project reads.
- Probes and healthchecks hit routes the gateway serves, on the port it binds; readiness is
  /ready, liveness /health. Shutdown timeouts (compose, Kubernetes, systemd) stay above the
  shutdown grace they wrap. The Kubernetes objects, the compose services and the nginx upstream
  refer to each other correctly.
- Each role logs in to Redis as its own user of deploy/users.acl: compose's URLs, the
  Kubernetes containers' Secret keys and the README's commands name the same users and
  password variables as users.acl.
- The compose file's own migrate, gateway and worker commands, with its environment and its
  Redis URLs (each role its user), run a task end to end against a redis-server started with
  deploy/redis.conf and users.acl, pass the compose healthchecks (Redis's and the gateway's),
  serve /metrics as the contract says (tests/test_deploy_metrics.py, which checks the
  dashboard, the alert rules and the scraping in k8s/), and stop on SIGTERM within their
  stop_grace_period.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis as SyncRedis

from streamcoord.cli import build_parser
from streamcoord.client import iter_task_events
from streamcoord.settings import Settings

from .processes import REPO, wait_for
from .test_deploy_metrics import METRICS
from .test_redis_acl import USERS_ACL, acl_users, redis_url, redis_with_conf, write_acl
from .topologies import free_port

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S_DIR = DEPLOY / "k8s"
SYSTEMD_DIR = DEPLOY / "systemd"
REDIS_CONF = DEPLOY / "redis.conf"
README = DEPLOY / "README.md"
NGINX_CONF = DEPLOY / "nginx" / "streamcoord.conf"

SETTINGS = {"STREAMCOORD_" + f.name.upper() for f in dataclasses.fields(Settings)}
GRACE_VAR = "STREAMCOORD_SHUTDOWN_GRACE_SECONDS"
DEFAULT_GRACE = Settings().shutdown_grace_seconds
#: What the example project reads from the environment (and Django's own variable).
DJANGO_VARS = {"DJANGO_SETTINGS_MODULE"} | set(
    re.findall(r'os\.environ\.get\("(DJANGO_\w+)"', (REPO / "django_app/project/settings.py").read_text())
)
#: Other variables the files may set (Python's and pip's own, in the Dockerfile).
OTHER_VARS = {
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK",
    "REDISCLI_AUTH",  # redis-cli's password, for compose's Redis healthcheck
}
#: The Redis user (deploy/users.acl) each role's processes log in as.
REDIS_USERS = {"gateway": "gateway", "worker": "worker", "migrate": "django"}
#: Kubernetes: the Secret that holds each role's Redis URL, under the key ``<user>-url``.
REDIS_SECRET = "streamcoord-redis"
#: A compose variable: ``${NAME}``, ``${NAME:?message}``, ``${NAME:-default}``, ...
COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?+])[^}]*)?\}")
#: The fixed routes the gateway serves, read from its handler.
GATEWAY_ROUTES = set(re.findall(r'path == "(/[^"]*)"', (REPO / "streamcoord/gateway.py").read_text()))
#: Programs other than Python that runtime commands may run (the redis:7 image's, coreutils').
PROGRAMS = {"redis-server", "redis-cli", "sleep"}
#: The least a supervisor's kill timeout must exceed the process's own shutdown grace by.
MARGIN = 5.0
PYTHON = re.compile(r"(?:^|=)((?:[^\s=]*/)?python(?:3(?:\.\d+)?)?)$")
SHELLS = {"sh", "bash"}


def k8s_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def systemd_files() -> list[Path]:
    return sorted([*SYSTEMD_DIR.glob("*.service"), *SYSTEMD_DIR.glob("*.target")])


def own_files() -> list[Path]:
    return [DOCKERFILE, COMPOSE, *k8s_files(), *systemd_files(), REDIS_CONF, README]


# -- reading the files ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Invocation:
    """One command a deployment file runs, and where it is named."""

    where: str
    argv: tuple[str, ...]
    #: A command a container or unit runs (only known programs allowed), not documentation.
    runtime: bool = True


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at && || ; | &), without leading
    ``exec``/``env`` and variable assignments; ``sh -c '...'`` is opened up."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    result = []
    for command in commands:
        while command and (command[0] in {"exec", "env"} or re.fullmatch(r"[A-Za-z_]\w*=.*", command[0])):
            command = command[1:]
        result.extend(simple_commands(command))
    return result


def simple_commands(argv: Sequence[str]) -> list[list[str]]:
    for i, token in enumerate(argv[:-2]):
        if Path(token).name in SHELLS and argv[i + 1] == "-c":
            return shell_commands(argv[i + 2])
    return [list(argv)] if argv else []


def as_argv(value: str | Sequence[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def healthcheck_argv(test: str | list[str]) -> list[str] | None:
    if isinstance(test, str):
        return ["sh", "-c", test]
    if test[0] == "CMD":
        return [str(t) for t in test[1:]]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    return None  # NONE


def compose_invocations() -> list[Invocation]:
    found = []
    for name, service in load_compose()["services"].items():
        for key in ("entrypoint", "command"):
            if key in service:
                found.append(Invocation(f"compose.yaml services.{name}.{key}", tuple(as_argv(service[key]))))
        test = (service.get("healthcheck") or {}).get("test")
        if test and (argv := healthcheck_argv(test)):
            found.append(Invocation(f"compose.yaml services.{name}.healthcheck", tuple(argv)))
    return found


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in k8s/ (kustomization.yaml is kustomize's, not an object)."""
    return [
        (path, doc) for path in k8s_files() for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") != "Kustomization"
    ]


def pod_spec(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def k8s_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(where, document, pod spec, container) for every container of every workload."""
    for path, doc in k8s_documents():
        spec = pod_spec(doc)
        if spec is None:
            continue
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            where = f"k8s/{path.name} {doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            yield where, doc, spec, container


def k8s_invocations() -> list[Invocation]:
    found = []
    for where, _doc, _spec, container in k8s_containers():
        argv = [*container.get("command", []), *container.get("args", [])]
        if argv:
            found.append(Invocation(where, tuple(argv)))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if command := (container.get(probe) or {}).get("exec", {}).get("command"):
                found.append(Invocation(f"{where} {probe}", tuple(command)))
        for hook in ("preStop", "postStart"):
            if command := (container.get("lifecycle") or {}).get(hook, {}).get("exec", {}).get("command"):
                found.append(Invocation(f"{where} {hook}", tuple(command)))
    return found


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = (pending + " " + raw.strip()).strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def instance(value: str) -> str:
    """A unit's %i/%I specifiers as a sample instance (gateways take a port)."""
    return value.replace("%i", "8001").replace("%I", "8001")


def unit_env(unit: Mapping[str, Mapping[str, list[str]]]) -> dict[str, str]:
    env = {}
    for line in unit.get("Service", {}).get("Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


EXEC_KEYS = ("ExecCondition", "ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost")


def systemd_invocations() -> list[Invocation]:
    found = []
    for path in systemd_files():
        service = parse_unit(path).get("Service", {})
        for key in EXEC_KEYS:
            for value in service.get(key, []):
                if value:
                    argv = shlex.split(instance(value.lstrip("-@:+!")))
                    found.append(Invocation(f"systemd/{path.name} {key}", tuple(argv)))
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def exec_form(rest: str) -> list[str]:
    return json.loads(rest) if rest.startswith("[") else ["sh", "-c", rest]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for assignment in shlex.split(rest):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def dockerfile_invocations() -> list[Invocation]:
    found = []
    for number, (keyword, rest) in enumerate(dockerfile_instructions(), 1):
        where = f"Dockerfile instruction {number} ({keyword})"
        if keyword in {"CMD", "ENTRYPOINT"}:
            found.append(Invocation(where, tuple(exec_form(rest))))
        elif keyword == "HEALTHCHECK" and " CMD " in f" {rest} ":
            found.append(Invocation(where, tuple(exec_form(rest.split("CMD", 1)[1].strip()))))
        elif keyword == "RUN":
            found.extend(Invocation(where, tuple(argv), runtime=False) for argv in shell_commands(rest))
    return found


def readme_invocations() -> list[Invocation]:
    """Python commands in deploy/README.md: lines of code blocks and inline code."""
    text = README.read_text()
    snippets = [line for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    snippets += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = []
    for snippet in snippets:
        if "python" not in snippet:
            continue
        # A systemd line (a drop-in): its value is the command.
        snippet = re.sub(r"^\s*Exec\w*=[-@:+!]*", "", snippet)
        for argv in shell_commands(instance(snippet)):
            for i, token in enumerate(argv):
                if match := PYTHON.search(token):
                    found.append(Invocation(f"README.md: {snippet.strip()}", (match[1], *argv[i + 1:]), runtime=False))
                    break
    return found


def all_invocations() -> list[Invocation]:
    return [
        *compose_invocations(), *k8s_invocations(), *systemd_invocations(),
        *dockerfile_invocations(), *readme_invocations(),
    ]


# -- checking commands ----------------------------------------------------------------------

#: Run in a Django process: for each [command, args], '' when ``manage.py command args``
#: parses with that command's own parser, else why not.
DJANGO_CHECK = r"""
import json, sys
import django
django.setup()
from django.core.management import get_commands, load_command_class
from django.core.management.base import CommandError
commands = get_commands()
results = []
for name, args in json.load(sys.stdin):
    if name not in commands:
        results.append(f"no manage.py command {name!r}")
        continue
    parser = load_command_class(commands[name], name).create_parser("manage.py", name)
    try:
        parser.parse_args(args)
    except CommandError as exc:
        results.append(f"manage.py {name}: {exc}")
    except SystemExit as exc:
        results.append(f"manage.py {name}: the parser exited ({exc.code})")
    else:
        results.append("")
print(json.dumps(results))
"""


def check_manage_calls(calls: list[tuple[str, str, list[str]]], tmp_path: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_"))}
    env["DJANGO_SETTINGS_MODULE"] = "django_app.project.settings"
    env["DJANGO_DB_PATH"] = str(tmp_path / "db.sqlite3")
    result = subprocess.run(
        [sys.executable, "-c", DJANGO_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
        input=json.dumps([[name, args] for _, name, args in calls]), timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    return [f"{where}: {problem}" for (where, _, _), problem in zip(calls, json.loads(result.stdout), strict=True) if problem]


def check_module(where: str, module: str, args: list[str], manage_calls: list[tuple[str, str, list[str]]]) -> list[str]:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return [f"{where}: no module {module!r} for python -m"]
    if spec.submodule_search_locations is not None and importlib.util.find_spec(f"{module}.__main__") is None:
        return [f"{where}: package {module!r} has no __main__ for python -m"]
    if module == "streamcoord":
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                build_parser().parse_args(args)
        except SystemExit:
            return [f"{where}: python -m streamcoord {' '.join(args)}: {stderr.getvalue().strip()}"]
    elif module == "worker":  # the same options as manage.py runworker (README, "Commands")
        manage_calls.append((where, "runworker", args))
    return []


def check_python_code(where: str, code: str) -> list[str]:
    try:
        compile(code, where, "exec")
    except SyntaxError as exc:
        return [f"{where}: python -c does not compile: {exc}"]
    return [
        f"{where}: {path} is not a route the gateway serves ({sorted(GATEWAY_ROUTES)})"
        for path in re.findall(r"https?://[^/\s'\"]+(/[^\s'\"?]*)", code)
        if path not in GATEWAY_ROUTES
    ]


def check_invocations(invocations: list[Invocation], tmp_path: Path) -> list[str]:
    problems: list[str] = []
    manage_calls: list[tuple[str, str, list[str]]] = []
    for inv in invocations:
        for argv in simple_commands(inv.argv):
            program = Path(argv[0]).name
            if PYTHON.search(argv[0]):
                rest = argv[1:]
                if rest and Path(rest[0]).name == "manage.py":
                    if len(rest) < 2:
                        problems.append(f"{inv.where}: manage.py without a command")
                    else:
                        manage_calls.append((inv.where, rest[1], rest[2:]))
                elif len(rest) >= 2 and rest[0] == "-m":
                    problems += check_module(inv.where, rest[1], rest[2:], manage_calls)
                elif len(rest) >= 2 and rest[0] == "-c":
                    problems += check_python_code(inv.where, rest[1])
                else:
                    problems.append(f"{inv.where}: python {' '.join(rest)}: only manage.py, -m and -c are known")
            elif inv.runtime and program not in PROGRAMS:
                problems.append(f"{inv.where}: unknown program {argv[0]!r}")
    return problems + check_manage_calls(manage_calls, tmp_path)


def role(argv: Sequence[str]) -> str | None:
    """'gateway', 'worker' or 'migrate' for a streamcoord command, else None."""
    words = list(argv)
    if "manage.py" in {Path(w).name for w in words}:
        command = words[[Path(w).name for w in words].index("manage.py") + 1]
        return {"runserver_stream": "gateway", "runworker": "worker", "migrate": "migrate"}.get(command)
    if words[1:3] == ["-m", "streamcoord"] and "gateway" in words:
        return "gateway"
    if words[1:3] == ["-m", "worker"]:
        return "worker"
    return None


def option(argv: Sequence[str], name: str) -> str | None:
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def duration(value: str | float) -> float:
    """Seconds in a compose (1m30s) or systemd (1min 30s, 45) duration."""
    if isinstance(value, int | float):
        return float(value)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(us|ms|sec|min|s|m|h)?", value)
    assert parts, f"not a duration: {value!r}"
    return sum(float(number) * units[unit or "s"] for number, unit in parts)


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.system
def test_yamllint_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint.yaml"), "deploy", ".yamllint.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert "No module named yamllint" not in result.stderr, "yamllint is missing: pip install -e '.[dev]'"
    assert result.returncode == 0, f"yamllint:\n{result.stdout}{result.stderr}"


@pytest.mark.system
def test_every_command_and_option_exists(tmp_path: Path) -> None:
    invocations = all_invocations()
    problems = check_invocations(invocations, tmp_path)
    assert not problems, "\n".join(problems)
    # The collectors found what the files run (a collector that finds nothing checks nothing).
    for source, roles in [
        ("compose.yaml", {"gateway", "worker", "migrate"}),
        ("k8s/", {"gateway", "worker", "migrate"}),
        ("systemd/", {"gateway", "worker", "migrate"}),
        ("Dockerfile", {"gateway"}),
        ("README.md", {"gateway", "worker", "migrate"}),
    ]:
        found = {role(inv.argv) for inv in invocations if inv.where.startswith(source)}
        assert roles <= found, f"{source}: expected commands for {roles}, found {found}"


def test_every_setting_named_exists() -> None:
    problems = []
    for path in own_files():
        text = path.read_text()
        name = path.relative_to(DEPLOY)
        problems += [f"{name}: {var} is not a streamcoord setting" for var in set(re.findall(r"STREAMCOORD_[A-Z0-9_]+", text)) - SETTINGS]
        problems += [f"{name}: {var} is not read by the project" for var in set(re.findall(r"\bDJANGO_[A-Z0-9_]+", text)) - DJANGO_VARS]
    # Every environment given to a process: known names, values that parse, a settings module
    # that exists.
    environments: dict[str, Mapping[str, str]] = {"Dockerfile ENV": dockerfile_env()}
    for name, service in load_compose()["services"].items():
        environments[f"compose.yaml services.{name}"] = compose_env(service)
    for path, doc in k8s_documents():
        if doc["kind"] == "ConfigMap":
            environments[f"k8s/{path.name} ConfigMap/{doc['metadata']['name']}"] = doc.get("data", {})
    for where, _doc, _spec, container in k8s_containers():
        environments[where] = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    for path in systemd_files():
        environments[f"systemd/{path.name}"] = unit_env(parse_unit(path))
    for where, env in environments.items():
        for key in env:
            if key not in SETTINGS | DJANGO_VARS | OTHER_VARS:
                problems.append(f"{where}: unknown variable {key}")
        try:
            Settings.from_env({k: v for k, v in env.items() if k.startswith("STREAMCOORD_")})
        except Exception as exc:
            problems.append(f"{where}: {exc}")
        module = env.get("DJANGO_SETTINGS_MODULE")
        if module and importlib.util.find_spec(module) is None:
            problems.append(f"{where}: DJANGO_SETTINGS_MODULE {module} does not exist")
    assert not problems, "\n".join(problems)


def test_probes_hit_the_gateway_routes() -> None:
    assert {"/health", "/ready"} <= GATEWAY_ROUTES
    problems = []
    gateways = 0
    for where, _doc, _spec, container in k8s_containers():
        argv = [*container.get("command", []), *container.get("args", [])]
        if role(argv) != "gateway":
            continue
        gateways += 1
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            http = (container.get(probe) or {}).get("httpGet")
            if not http:
                problems.append(f"{where}: no {probe} httpGet")
                continue
            if http["path"] != path:
                problems.append(f"{where}: {probe} on {http['path']}, expected {path}")
            port = ports.get(http["port"], http["port"])
            if str(port) != option(argv, "--port"):
                problems.append(f"{where}: {probe} on port {http['port']}, the gateway binds {option(argv, '--port')}")
    assert gateways, "no gateway container in k8s/"
    for name, service in load_compose()["services"].items():
        if role(as_argv(service.get("command", []))) != "gateway":
            continue
        port = option(as_argv(service["command"]), "--port")
        test = " ".join((service.get("healthcheck") or {}).get("test", []))
        urls = re.findall(r"https?://[^/\s'\"]+:(\d+)(/[^\s'\"?]*)", test)
        if not urls:
            problems.append(f"compose.yaml services.{name}: no healthcheck on an HTTP route")
        problems += [
            f"compose.yaml services.{name}: healthcheck {path} on port {p} (gateway: {port}; routes {sorted(GATEWAY_ROUTES)})"
            for p, path in urls if p != port or path not in GATEWAY_ROUTES
        ]
    assert not problems, "\n".join(problems)


def test_shutdown_timeouts_cover_the_grace() -> None:
    problems = []
    # compose: stop_grace_period above the process's grace.
    for name, service in load_compose()["services"].items():
        if role(as_argv(service.get("command", []))) not in {"gateway", "worker"}:
            continue
        grace = float(compose_env(service).get(GRACE_VAR) or DEFAULT_GRACE)
        if "stop_grace_period" not in service or duration(service["stop_grace_period"]) < grace + MARGIN:
            problems.append(f"compose.yaml services.{name}: stop_grace_period {service.get('stop_grace_period', '10s')} < {grace} + {MARGIN}")
    # Kubernetes: terminationGracePeriodSeconds above preStop + grace (container env, over the
    # ConfigMaps it reads, over the default).
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for _, doc in k8s_documents() if doc["kind"] == "ConfigMap"}
    for where, _doc, spec, container in k8s_containers():
        kind = role([*container.get("command", []), *container.get("args", [])])
        if kind not in {"gateway", "worker"}:
            continue
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(config_maps.get(source.get("configMapRef", {}).get("name"), {}))
        env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
        grace = float(env.get(GRACE_VAR) or DEFAULT_GRACE)
        pre_stop = (container.get("lifecycle") or {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        if kind == "gateway" and not sleep:
            problems.append(f"{where}: no preStop sleep (the Service must stop routing before SIGTERM)")
        period = spec.get("terminationGracePeriodSeconds", 30)
        if period < sleep + grace + MARGIN:
            problems.append(f"{where}: terminationGracePeriodSeconds {period} < preStop {sleep} + grace {grace} + {MARGIN}")
    # systemd: TimeoutStopSec above the grace the unit sets.
    for path in systemd_files():
        unit = parse_unit(path)
        service = unit.get("Service", {})
        if not any(role(shlex.split(instance(v))) in {"gateway", "worker"} for v in service.get("ExecStart", [])):
            continue
        grace = float(unit_env(unit).get(GRACE_VAR) or DEFAULT_GRACE)
        timeout = duration(service.get("TimeoutStopSec", ["90"])[-1])
        if timeout < grace + MARGIN:
            problems.append(f"systemd/{path.name}: TimeoutStopSec {timeout} < {grace} + {MARGIN}")
        if service.get("KillSignal", ["SIGTERM"])[-1] != "SIGTERM":
            problems.append(f"systemd/{path.name}: KillSignal must be SIGTERM (the graceful shutdown)")
    assert not problems, "\n".join(problems)


def by_role(invocations: list[Invocation]) -> dict[str, set[tuple[str, ...]]]:
    roles: dict[str, set[tuple[str, ...]]] = {}
    for inv in invocations:
        if (kind := role(inv.argv)) is not None:
            roles.setdefault(kind, set()).add(inv.argv)
    return roles


#: The listeners for Prometheus and operators (the admin listener, the worker's metrics): where
#: a supervisor exposes them is its own choice (compose and Kubernetes, for a Prometheus on their
#: network; systemd, by a drop-in: deploy/README.md, "Metrics and alerts").
MONITORING_OPTIONS = ("--admin-port", "--admin-host", "--admin-socket", "--metrics-port", "--metrics-host")


def unbound(commands: set[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Commands without their python path, the values of --host, --port and --socket, and
    the monitoring listeners' options."""
    result = set()
    for argv in commands:
        words = list(argv[1:])
        for name in ("--host", "--port", "--socket"):
            if name in words:
                words[words.index(name) + 1] = "*"
        for name in MONITORING_OPTIONS:
            if name in words:
                del words[words.index(name):words.index(name) + 2]
        result.add(tuple(words))
    return result


def test_the_same_commands_everywhere() -> None:
    """compose and Kubernetes run the very same argv for each role; the systemd units and the
    Dockerfile's CMD the same commands and options (only where they listen differs, and
    whether they serve metrics)."""
    compose, k8s = by_role(compose_invocations()), by_role(k8s_invocations())
    assert compose == k8s, f"compose: {compose}\nk8s: {k8s}"
    systemd = by_role(systemd_invocations())
    assert set(systemd) == set(compose)
    for kind, commands in systemd.items():
        assert unbound(commands) == unbound(compose[kind]), f"{kind}: systemd {commands}, compose {compose[kind]}"
    dockerfile = by_role([inv for inv in dockerfile_invocations() if inv.runtime])
    assert unbound(dockerfile["gateway"]) == unbound(compose["gateway"])


def test_kubernetes_objects_refer_to_each_other() -> None:
    docs = k8s_documents()
    names = {(doc["kind"], doc["metadata"]["name"]) for _, doc in docs}
    problems = []
    for path, doc in docs:
        assert "namespace" not in doc["metadata"], f"k8s/{path.name}: manifests name no namespace"
    workloads = {doc["metadata"]["name"]: doc for _, doc in docs if pod_spec(doc) is not None}
    redis_policies = 0
    for where, _doc, spec, container in k8s_containers():
        for source in container.get("envFrom", []):
            for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if ref in source and not source[ref].get("optional") and (kind, source[ref]["name"]) not in names:
                    problems.append(f"{where}: {kind} {source[ref]['name']} is not defined")
        for volume in spec.get("volumes", []):
            if (claim := volume.get("persistentVolumeClaim")) and ("PersistentVolumeClaim", claim["claimName"]) not in names:
                problems.append(f"{where}: PersistentVolumeClaim {claim['claimName']} is not defined")
    for path, doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Service":
            targets = [w for w in workloads.values() if doc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
            if not targets:
                problems.append(f"k8s/{path.name} Service/{name}: its selector matches no pods")
            for port in doc["spec"]["ports"]:
                named = {p.get("name") for w in targets for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
                numbers = {p["containerPort"] for w in targets for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
                if port.get("targetPort") not in named | numbers:
                    problems.append(f"k8s/{path.name} Service/{name}: targetPort {port.get('targetPort')} is no container port")
        if kind == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            if target["name"] not in workloads:
                problems.append(f"k8s/{path.name} HPA/{name}: no workload {target['name']}")
            else:
                for container in pod_spec(workloads[target["name"]])["containers"]:
                    if "cpu" not in container.get("resources", {}).get("requests", {}):
                        problems.append(f"k8s/{path.name} HPA/{name}: container {container['name']} requests no CPU")
        if kind == "NetworkPolicy" and doc["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "redis"}:
            redis_policies += 1
            # Some rule admits every workload of these manifests to Redis's port. (The other
            # policies, on the metrics ports: tests/test_deploy_metrics.py.)
            admitted_to_redis: set[str] = set()
            for rule in doc["spec"].get("ingress", []):
                if 6379 not in {port.get("port") for port in rule.get("ports", [])}:
                    continue
                for peer in rule.get("from", []):
                    labels = peer.get("podSelector", {}).get("matchLabels", {})
                    admitted_to_redis |= {
                        n for n, w in workloads.items() if labels.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                    }
            if missing := set(workloads) - admitted_to_redis:
                problems.append(f"k8s/{path.name} NetworkPolicy/{name}: does not admit {sorted(missing)} to Redis (6379)")
        if kind == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
            if not any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads.values()):
                problems.append(f"k8s/{path.name} PDB/{name}: its selector matches no pods")
    assert redis_policies == 1, "one NetworkPolicy guards Redis (podSelector app.kubernetes.io/name: redis)"
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    manifests = {p.name for p in k8s_files()} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests, "kustomization.yaml must list every manifest"
    images = {i["name"] for i in kustomization.get("images", [])}
    for where, _doc, _spec, container in k8s_containers():
        if container["image"].split(":")[0] not in images:
            problems.append(f"{where}: image {container['image']} is not in kustomization.yaml's images")
    assert not problems, "\n".join(problems)


def compose_role_urls() -> dict[str, str]:
    """Each compose role's STREAMCOORD_REDIS_URL (with its ``${...}`` uninterpolated); every
    service of one role must have the same."""
    urls: dict[str, set[str]] = {}
    for service in load_compose()["services"].values():
        if (kind := role(as_argv(service.get("command", [])))) is not None:
            urls.setdefault(kind, set()).add(compose_env(service).get("STREAMCOORD_REDIS_URL", ""))
    assert all(len(found) == 1 for found in urls.values()), urls
    return {kind: found.pop() for kind, found in urls.items()}


def password_variable(user: str) -> str:
    """The variable that holds a Redis user's password (compose's .env, the README's script)."""
    return f"REDIS_{user.upper()}_PASSWORD"


def test_each_role_logs_in_to_redis_as_its_own_user() -> None:
    """compose's URLs, the Kubernetes containers' Secret keys, the README's Secret and password
    script, and compose's Redis healthcheck name users of users.acl, each role its own."""
    users = set(acl_users(USERS_ACL.read_text()))
    assert set(REDIS_USERS.values()) <= users
    problems = []
    # compose: a user in every role's URL, its password from a required variable, the host the
    # Redis service, on redis.conf's port.
    compose = load_compose()
    port = re.search(r"^port\s+(\d+)", REDIS_CONF.read_text(), re.M)
    assert port
    for kind, url in compose_role_urls().items():
        user = REDIS_USERS[kind]
        expected = f"redis://{user}:${{{password_variable(user)}:?"
        parts = re.match(r"redis://([^:@]+):(\$\{[^}]+\})@([\w.-]+):(\d+)/\d+$", url)
        if not url.startswith(expected) or not parts:
            problems.append(f"compose.yaml: the {kind} URL {url!r} should be {expected}...}}@<redis service>:<port>/<db>")
        elif parts[3] not in compose["services"] or parts[4] != port[1]:
            problems.append(f"compose.yaml: the {kind} URL names {parts[3]}:{parts[4]}, not the Redis service on port {port[1]}")
    redis_service = next(s for s in compose["services"].values() if "redis-server" in as_argv(s.get("command", [])))
    check = healthcheck_argv(redis_service["healthcheck"]["test"]) or []
    if option(check, "--user") not in users or "-e" not in check:
        problems.append(f"compose.yaml: the Redis healthcheck {check} must log in (--user) and fail on an error (-e)")
    if compose_env(redis_service).get("REDISCLI_AUTH") != f"${{{password_variable(option(check, '--user') or '')}:?set it in deploy/.env}}":
        problems.append("compose.yaml: the Redis healthcheck's password (REDISCLI_AUTH) is not its user's variable")
    for name in {m[0] for m in COMPOSE_VARIABLE.findall(COMPOSE.read_text())} - {"STREAMCOORD_SECRET"}:
        if not any(name == password_variable(user) for user in users):
            problems.append(f"compose.yaml: ${{{name}}} is no user's password variable")
    # Kubernetes: each container's URL from its role's key of the Secret, none in ConfigMaps.
    keys = set()
    for where, _doc, _spec, container in k8s_containers():
        container_role = role([*container.get("command", []), *container.get("args", [])])
        if container_role is None:
            continue
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env.get("STREAMCOORD_REDIS_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        expected_ref = {"name": REDIS_SECRET, "key": f"{REDIS_USERS[container_role]}-url"}
        if ref != expected_ref:
            problems.append(f"{where}: STREAMCOORD_REDIS_URL must come from secretKeyRef {expected_ref}, not {ref}")
        keys.add(expected_ref["key"])
    for path, doc in k8s_documents():
        if doc["kind"] == "ConfigMap" and "STREAMCOORD_REDIS_URL" in doc.get("data", {}):
            problems.append(f"k8s/{path.name}: STREAMCOORD_REDIS_URL belongs in the Secret {REDIS_SECRET}, per role")
    # README: the Secret it creates holds those keys, each a URL with its user.
    text = README.read_text()
    command = re.search(rf"kubectl create secret generic {REDIS_SECRET}((?:[^\n]*\\\n)*[^\n]*)", text)
    literals = dict(re.findall(r"--from-literal=([\w-]+)=(\S+)", command[1])) if command else {}
    if set(literals) != keys:
        problems.append(f"README.md: kubectl create secret {REDIS_SECRET} sets {sorted(literals)}, the manifests read {sorted(keys)}")
    for key, url in literals.items():
        user = key.removesuffix("-url")
        if not url.strip('"').startswith(f"redis://{user}:${password_variable(user)}@"):
            problems.append(f"README.md: {REDIS_SECRET} {key} = {url}: not the {user} user and its password")
    # README: the password script makes one password per user of users.acl (but default).
    script = re.search(r"for user in ([\w ]+); do", text)
    if not script or set(script[1].split()) != users - {"default"}:
        problems.append(f"README.md: the password script's users {script and script[1]} are not users.acl's {sorted(users - {'default'})}")
    assert not problems, "\n".join(problems)


def test_compose_refers_to_files_and_services_that_exist() -> None:
    compose = load_compose()
    services = compose["services"]
    problems = []
    for name, service in services.items():
        if build := service.get("build"):
            context = (DEPLOY / build["context"]).resolve()
            if context != REPO or (context / build["dockerfile"]).resolve() != DOCKERFILE:
                problems.append(f"services.{name}: build must be the repository with deploy/Dockerfile")
        for volume in service.get("volumes", []):
            source, _, target = volume.partition(":")
            if source.startswith("."):
                if not (DEPLOY / source).exists():
                    problems.append(f"services.{name}: {source} does not exist")
                if source == "./redis.conf" and not target.startswith(as_argv(service["command"])[1]):
                    problems.append(f"services.{name}: redis.conf is mounted where redis-server does not read it")
                aclfile = re.search(r"^aclfile\s+(\S+)", REDIS_CONF.read_text(), re.M)
                if source == "./users.acl" and (aclfile is None or not target.startswith(f"{aclfile[1]}:")):
                    problems.append(f"services.{name}: users.acl is mounted at {target}, redis.conf reads {aclfile and aclfile[1]}")
            elif source not in (compose.get("volumes") or {}):
                problems.append(f"services.{name}: volume {source} is not declared")
        for dependency in service.get("depends_on", {}):
            if dependency not in services:
                problems.append(f"services.{name}: depends on {dependency}, which is no service")
    # nginx's upstream names compose's gateways, on the port each binds, and all of them.
    if NGINX_CONF.exists():
        upstream = re.search(r"upstream\s+\S+\s*\{(.*?)\}", NGINX_CONF.read_text(), re.S)
        assert upstream, "nginx/streamcoord.conf: no upstream block"
        lines = [line.split("#")[0] for line in upstream[1].splitlines()]
        servers = set(re.findall(r"^\s*server\s+([\w.-]+):(\d+)", "\n".join(lines), re.M))
        gateways = {
            (name, option(as_argv(s["command"]), "--port")) for name, s in services.items()
            if role(as_argv(s.get("command", []))) == "gateway"
        }
        assert servers == gateways, f"nginx upstream {sorted(servers)} != compose gateways {sorted(gateways)}"
    assert not problems, "\n".join(problems)


def test_dockerfile_runs_manage_py_from_its_workdir() -> None:
    instructions = dockerfile_instructions()
    workdir, copied = "/", None
    for keyword, rest in instructions:
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, rest)
        if keyword == "COPY":
            *sources, dest = [w for w in shlex.split(rest) if not w.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile: COPY {source}: no such file in the build context"
            if sources == ["manage.py"]:
                target = os.path.normpath(os.path.join(workdir, dest))
                copied = os.path.join(target, "manage.py") if dest.endswith("/") or dest in {".", "./"} else target
    assert copied == os.path.join(workdir, "manage.py"), f"manage.py copied to {copied}, commands run in {workdir}"
    keywords = [k for k, _ in instructions]
    assert "ENTRYPOINT" not in keywords, "the image has no entrypoint: the command picks the role"
    users = [rest for k, rest in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image runs as a non-root user"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.system
def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the units, with the venv's python standing in for
    /opt/streamcoord/venv's (verify checks that the executable exists)."""
    for path in systemd_files():
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/streamcoord/venv/bin/python", sys.executable))
    units = [str(tmp_path / (p.name.replace("@.", "@8001.") if "@." in p.name else p.name)) for p in systemd_files()]
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60, check=False)
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if line.strip())
    assert result.returncode == 0 and not output, output


# -- the compose file's commands, run for real ----------------------------------------------


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], log: Path, ready: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def is_ready() -> bool:
            if re.search(ready, log.read_text(errors="replace")):
                return True
            assert process.poll() is None, f"{argv} exited with {process.returncode}:\n{log.read_text()}"
            return False

        wait_for(is_ready, 30, f"{' '.join(argv[1:4])} to be ready")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """A compose value with its ``${...}`` replaced as compose would, from ``variables``."""
    return COMPOSE_VARIABLE.sub(lambda match: variables[match[1]], value)


def on_socket(url: str, sock: Path) -> str:
    """A ``redis://user:password@host:port/db`` URL moved to the unix socket ``sock``."""
    parts = urllib.parse.urlsplit(url)
    assert parts.username and parts.password, f"{url}: no user or password"
    return f"{redis_url(sock, parts.username, parts.password)}?db={parts.path.strip('/') or 0}"


def scrape(url: str, kind: str) -> dict[str, float]:
    """GET ``url`` (a gateway's or worker's /metrics), check it against the contract
    (tests/test_deploy_metrics.py METRICS: every metric of this role, of its type, with its
    labels, and no other streamcoord metric), and return each metric's sum over its samples,
    also per ``outcome`` (``name{outcome="completed"}``)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {name.removesuffix("_total") if m.kind == "counter" else name: (name, m) for name, m in METRICS.items() if m.role == kind}
    # prometheus_client's text format gives each counter and histogram a ``<name>_created``
    # gauge too (its creation time): part of the metric, not another one.
    created = {f"{family}_created" for family, (_, metric) in expected.items() if metric.kind != "gauge"}
    problems = [
        f"{kind} /metrics: {name} is not in the contract" for name in sorted(set(families) - set(expected) - created)
        if name.startswith("streamcoord_")
    ]
    values: dict[str, float] = {}
    for family_name, (name, metric) in expected.items():
        family = families.get(family_name)
        if family is None:
            problems.append(f"{kind} /metrics: no {name}")
            continue
        if family.type != metric.kind:
            problems.append(f"{kind} /metrics: {name} is a {family.type}, the contract says {metric.kind}")
        for sample in family.samples:
            if extra := set(sample.labels) - set(metric.labels) - {"le"}:
                problems.append(f"{kind} /metrics: {sample.name} has labels {sorted(extra)} the contract does not")
            if sample.name == name:
                values[name] = values.get(name, 0.0) + sample.value
                if "outcome" in sample.labels:
                    key = f'{name}{{outcome="{sample.labels["outcome"]}"}}'
                    values[key] = values.get(key, 0.0) + sample.value
    assert not problems, "\n".join(problems)
    return values


@pytest.mark.system
def test_compose_commands_run_against_redis_conf(tmp_path: Path) -> None:
    """redis-server with deploy/redis.conf and users.acl (passwords set; only where it listens,
    writes and finds the ACL changed), then compose's Redis healthcheck and the compose file's
    migrate, gateway (on a port the kernel picks) and worker commands with the compose
    environment, each with its compose URL (moved to the socket): a task runs, a client gets
    its events through the gateway, the gateway's healthcheck command passes, both serve
    /metrics (their admin and metrics listeners moved to the loopback) with every metric of
    the contract and counters that saw the task, and both stop on SIGTERM within their
    stop_grace_period."""
    aclfile, passwords = write_acl(tmp_path)
    variables = {password_variable(user): password for user, password in passwords.items()}
    variables["STREAMCOORD_SECRET"] = secrets.token_hex(32)
    with redis_with_conf(tmp_path, aclfile) as sock:
        with SyncRedis.from_url(redis_url(sock, "admin", passwords["admin"]), decode_responses=True) as admin:
            config = admin.config_get("*")
        assert (config["appendonly"], config["appendfsync"], config["maxmemory-policy"]) == ("yes", "everysec", "noeviction")

        redis_service = next(s for s in load_compose()["services"].values() if "redis-server" in as_argv(s.get("command", [])))
        check = healthcheck_argv(redis_service["healthcheck"]["test"])
        assert check and check[0] == "redis-cli"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDISCLI_")}
        env.update({k: interpolate(v, variables) for k, v in compose_env(redis_service).items()})
        answer = subprocess.run([check[0], "-s", str(sock), *check[1:]], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert (answer.returncode, answer.stdout.strip()) == (0, "PONG"), answer
        env["REDISCLI_AUTH"] = "wrong"
        answer = subprocess.run([check[0], "-s", str(sock), *check[1:]], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert answer.returncode != 0, f"the Redis healthcheck passes with a wrong password: {answer}"
        with SyncRedis.from_url(redis_url(sock, "admin", passwords["admin"])) as admin:
            admin.acl_log_reset()  # that refusal was the test's own

        services = load_compose()["services"]

        def service(kind: str) -> tuple[str, dict[str, Any], list[str], dict[str, str]]:
            name, svc = next((n, s) for n, s in services.items() if role(as_argv(s.get("command", []))) == kind)
            argv = as_argv(svc["command"])
            assert argv[0] == "python"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_"))}
            env.update({k: interpolate(v, variables) for k, v in compose_env(svc).items()})
            env["STREAMCOORD_REDIS_URL"] = on_socket(env["STREAMCOORD_REDIS_URL"], sock)
            env["DJANGO_DB_PATH"] = str(tmp_path / "db.sqlite3")
            env["STREAMCOORD_EMBEDDED_URL_FILE"] = str(tmp_path / "embedded.url")
            return name, svc, [sys.executable, *argv[1:]], env

        _, _, migrate, migrate_env = service("migrate")
        subprocess.run(migrate, cwd=REPO, env=migrate_env, check=True, capture_output=True, timeout=60)

        _, gateway_service, gateway, gateway_env = service("gateway")
        compose_port = option(gateway, "--port")
        gateway[gateway.index("--host") + 1] = "127.0.0.1"
        gateway[gateway.index("--port") + 1] = "0"
        _, worker_service, worker, worker_env = service("worker")
        # The listeners Prometheus scrapes, moved to this machine's loopback.
        assert {"--admin-port", "--admin-host"} <= set(gateway), f"compose's gateway serves no /metrics: {gateway}"
        assert {"--metrics-port", "--metrics-host"} <= set(worker), f"compose's worker serves no /metrics: {worker}"
        gateway[gateway.index("--admin-host") + 1] = "127.0.0.1"
        gateway[gateway.index("--admin-port") + 1] = "0"
        worker[worker.index("--metrics-host") + 1] = "127.0.0.1"
        worker[worker.index("--metrics-port") + 1] = str(worker_metrics_port := free_port())
        with (
            started(gateway, gateway_env, tmp_path / "gateway.log", r"listening on http://\S+") as gw,
            started(worker, worker_env, tmp_path / "worker.log", "started") as wk,
        ):
            match = re.search(r"listening on (http://\S+)", (tmp_path / "gateway.log").read_text())
            assert match
            base = match[1]

            # The healthcheck command itself, pointed at this gateway's port.
            healthcheck = healthcheck_argv(gateway_service["healthcheck"]["test"])
            assert healthcheck and healthcheck[0] == "python"
            command = [sys.executable, *(a.replace(f"127.0.0.1:{compose_port}", base.removeprefix("http://")) for a in healthcheck[1:])]
            assert subprocess.run(command, capture_output=True, timeout=30, check=False).returncode == 0
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as reply:
                assert reply.read() == b"READY"

            # As README.md runs it: in the migrate service, as Django's user.
            created = subprocess.run(
                [sys.executable, "manage.py", "create_task", "ProgressTask", "--set", "steps=3", "--set", "delay=0", "--start"],
                cwd=REPO, env=migrate_env, capture_output=True, text=True, timeout=60, check=True,
            )
            task = json.loads(created.stdout.strip().splitlines()[-1])
            # The token create_task signed with the secret the gateway checks.
            token = urllib.parse.parse_qs(urllib.parse.urlsplit(task["stream_url"]).query)["token"][0]
            events = iter_task_events(base, task["model"], task["id"], max_reconnects=3, token=token)
            types = [event.event for event in events]
            assert types[0] == "start" and types[-1] == "complete" and types.count("progress") == 3, types

            # /metrics of both, held to the contract, counting what happened.
            admin = re.search(r"streamcoord admin on (http://\S+)", (tmp_path / "gateway.log").read_text())
            assert admin, "the gateway announced no admin listener"
            gateway_values = scrape(f"{admin[1].rstrip('/')}/metrics", "gateway")
            assert gateway_values["streamcoord_gateway_connections_total"] >= 1, gateway_values
            assert gateway_values["streamcoord_gateway_deliveries_total"] >= len(types), gateway_values
            assert gateway_values["streamcoord_gateway_reader_up"] == 1, gateway_values
            worker_values = scrape(f"http://127.0.0.1:{worker_metrics_port}/metrics", "worker")
            assert worker_values["streamcoord_worker_tasks_started_total"] >= 1, worker_values
            assert worker_values['streamcoord_worker_tasks_ended_total{outcome="completed"}'] >= 1, worker_values
            assert worker_values["streamcoord_worker_concurrency"] == float(option(worker, "--concurrency") or 0), worker_values

            for process, svc, name in ((wk, worker_service, "worker"), (gw, gateway_service, "gateway")):
                process.send_signal(signal.SIGTERM)
                try:
                    code = process.wait(duration(svc["stop_grace_period"]))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"the {name} did not stop within its stop_grace_period after SIGTERM")
                assert code == 0, f"the {name} exited with {code} on SIGTERM"
        with SyncRedis.from_url(redis_url(sock, "admin", passwords["admin"]), decode_responses=True) as admin:
            assert admin.acl_log() == [], f"Redis refused a compose role a command: {admin.acl_log()}"
