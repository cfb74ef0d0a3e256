"""What the benchmark ran on: cores, memory, Python, Redis and the libraries that matter."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

LIBRARIES = ("redis", "hiredis", "uvicorn", "uvloop", "httptools", "asgineer", "matplotlib")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def redis_server_version() -> str:
    """``redis-server --version``'s ``v=`` field (or why it is unknown)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return "not installed"
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for field in out.split():
        if field.startswith("v="):
            return field[2:]
    return out.strip() or "unknown"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_info() -> dict[str, Any]:
    """The machine and software a run measured (the host may be shared: see ``loadavg``)."""
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gb": _memory_gb(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "redis_server": redis_server_version(),
        "libraries": library_versions(),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def describe(machine: dict[str, Any]) -> str:
    """One line for the Markdown report."""
    libs = machine["libraries"]
    return (
        f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gb']} GB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, redis-server "
        f"{machine['redis_server']}, redis-py {libs['redis']}, hiredis {libs['hiredis']}, "
        f"uvicorn {libs['uvicorn']}, uvloop {libs['uvloop']}, httptools {libs['httptools']}; "
        f"load average at start {machine['loadavg_at_start']}"
    )
