"""The core never imports Django: Django imports the core, never the reverse."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import streamcoord

from .processes import REPO, RedisServer

pytestmark = pytest.mark.system


def test_importing_every_core_module_and_serving_imports_no_django(redis_server: RedisServer) -> None:
    modules = sorted(f"streamcoord.{m.name}" for m in pkgutil.iter_modules(streamcoord.__path__))
    assert "streamcoord.gateway" in modules and "streamcoord.hub" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    if name != 'streamcoord.__main__':\n"
        "        importlib.import_module(name)\n"
        "from streamcoord.server import gateway_parts\n"
        "from streamcoord.settings import Settings\n"
        "import asyncio\n"
        "async def build():\n"
        f"    async with gateway_parts(Settings(redis_url={redis_server.url!r}, secret='s' * 40)) as gateway:\n"
        "        gateway.asgi()\n"
        "asyncio.run(build())\n"
        "loaded = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
