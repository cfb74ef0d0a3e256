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
- The compose file's own migrate, gateway and worker commands, with its environment, run a
  task end to end against a redis-server started with deploy/redis.conf, pass the compose
  healthcheck, and stop on SIGTERM within their stop_grace_period.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from streamcoord.cli import build_parser
from streamcoord.client import iter_task_events
from streamcoord.settings import Settings

from .processes import REPO, wait_for

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
OTHER_VARS = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}
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


def unbound(commands: set[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Commands without their python path and the values of --host, --port and --socket."""
    result = set()
    for argv in commands:
        words = list(argv[1:])
        for name in ("--host", "--port", "--socket"):
            if name in words:
                words[words.index(name) + 1] = "*"
        result.add(tuple(words))
    return result


def test_the_same_commands_everywhere() -> None:
    """compose and Kubernetes run the very same argv for each role; the systemd units and the
    Dockerfile's CMD the same commands and options (only where they listen differs)."""
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
        if kind == "NetworkPolicy":
            for rule in doc["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    labels = peer.get("podSelector", {}).get("matchLabels", {})
                    admitted = [n for n, w in workloads.items() if labels.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
                    if {"gateway", "worker"} - {n.split("-")[-1] for n in admitted}:
                        problems.append(f"k8s/{path.name} NetworkPolicy/{name}: does not admit both gateways and workers ({admitted})")
        if kind == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
            if not any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads.values()):
                problems.append(f"k8s/{path.name} PDB/{name}: its selector matches no pods")
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    manifests = {p.name for p in k8s_files()} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests, "kustomization.yaml must list every manifest"
    images = {i["name"] for i in kustomization.get("images", [])}
    for where, _doc, _spec, container in k8s_containers():
        if container["image"].split(":")[0] not in images:
            problems.append(f"{where}: image {container['image']} is not in kustomization.yaml's images")
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


@pytest.mark.system
def test_compose_commands_run_against_redis_conf(tmp_path: Path) -> None:
    """redis-server with deploy/redis.conf (only where it listens and writes changed), then the
    compose file's migrate, gateway (on a port the kernel picks) and worker commands with the
    compose environment: a task runs, a client gets its events through the gateway, the
    gateway's healthcheck command passes, and both stop on SIGTERM within their
    stop_grace_period."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run the tests with ./run test")
    sock = tmp_path / "redis.sock"
    redis = subprocess.Popen(
        [binary, str(REDIS_CONF), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--dir", str(tmp_path), "--logfile", str(tmp_path / "redis.log")],
    )
    try:
        with SyncRedis(unix_socket_path=str(sock), decode_responses=True) as client:
            def answers() -> bool:
                try:
                    return bool(client.ping())
                except RedisError:
                    return False

            wait_for(answers, 10, "redis-server with deploy/redis.conf to answer PING")
            config = client.config_get("*")
        assert (config["appendonly"], config["appendfsync"], config["maxmemory-policy"]) == ("yes", "everysec", "noeviction")

        services = load_compose()["services"]

        def service(kind: str) -> tuple[str, dict[str, Any], list[str], dict[str, str]]:
            name, svc = next((n, s) for n, s in services.items() if role(as_argv(s.get("command", []))) == kind)
            argv = as_argv(svc["command"])
            assert argv[0] == "python"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_"))}
            env.update(compose_env(svc))
            env["STREAMCOORD_REDIS_URL"] = f"unix://{sock}"
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

            created = subprocess.run(
                [sys.executable, "manage.py", "create_task", "ProgressTask", "--set", "steps=3", "--set", "delay=0", "--start"],
                cwd=REPO, env=worker_env, capture_output=True, text=True, timeout=60, check=True,
            )
            task = json.loads(created.stdout.strip().splitlines()[-1])
            types = [event.event for event in iter_task_events(base, task["model"], task["id"], max_reconnects=3)]
            assert types[0] == "start" and types[-1] == "complete" and types.count("progress") == 3, types

            for process, svc, name in ((wk, worker_service, "worker"), (gw, gateway_service, "gateway")):
                process.send_signal(signal.SIGTERM)
                try:
                    code = process.wait(duration(svc["stop_grace_period"]))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"the {name} did not stop within its stop_grace_period after SIGTERM")
                assert code == 0, f"the {name} exited with {code} on SIGTERM"
    finally:
        redis.terminate()
        try:
            redis.wait(10)
        except subprocess.TimeoutExpired:
            redis.kill()
            redis.wait(5)
