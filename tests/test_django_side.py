"""The Django side's shape: its status names are the core's, and its modules import each other
without cycles (the coordinator imports the models, never the reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from streamcoord.taskstate import State

from .processes import REPO

PACKAGES = ("streamcoord", "django_app", "worker")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every project module ``path`` imports, at any depth of its code (``from . import x``
    counts as importing ``x``, not the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {base}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py") if "migrations" not in p.parts]
    modules = {module_name(p): p for p in files}
    names = set(modules)
    return {name: {m for m in imports_of(path, names) if m in names and m != name} for name, path in modules.items()}


def test_the_project_imports_without_cycles() -> None:
    graph = import_graph()
    assert "django_app.coordinator" in graph["django_app.signals"]  # the walk sees imports
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_core_imports_nothing_of_django_app_or_worker() -> None:
    for module, targets in import_graph().items():
        if module.startswith("streamcoord"):
            assert not {t for t in targets if not t.startswith("streamcoord")}, module


def test_row_statuses_are_the_task_states_but_cancelling() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(INSTALLED_APPS=["django_app"], DATABASES={})
        django.setup()
    from django_app.models import Status

    assert set(Status.values) == {state.value for state in State} - {State.CANCELLING}
