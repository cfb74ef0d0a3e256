"""Issue 11's hardening: what the gateway, its socket, the demo and the embedded default refuse.

Each test here failed on the code before the fix it guards.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streamcoord.errors import ConfigurationError
from streamcoord.server import bind

from .processes import REPO, Project

pytestmark = pytest.mark.system

# -- a. --socket PATH removes only a stale unix socket ----------------------------------------


def test_bind_refuses_a_regular_file_and_leaves_it_alone(tmp_path: Path) -> None:
    precious = tmp_path / "settings.py"
    precious.write_text("keep me\n")
    with pytest.raises(ConfigurationError, match="not a unix socket"):
        bind(None, None, str(precious))
    assert precious.read_text() == "keep me\n"


def test_bind_refuses_a_directory_and_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("dir", "link"):
        with pytest.raises(ConfigurationError, match="not a unix socket"):
            bind(None, None, str(tmp_path / name))
    assert (tmp_path / "dir").is_dir() and (tmp_path / "target").read_text() == "x"


def test_bind_replaces_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    path = str(tmp_path / "gw.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a server that died
    sock = bind(None, None, path)
    try:
        with pytest.raises(ConfigurationError, match="another server is listening"):
            bind(None, None, path)  # sock listens there now
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)  # still the first one's
    finally:
        sock.close()


def test_gateway_command_refuses_a_file_at_its_socket_path(tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me\n")
    result = subprocess.run(
        [sys.executable, "-m", "streamcoord", "gateway", "--socket", str(precious)],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "STREAMCOORD_REDIS_URL": "redis://127.0.0.1:1/0"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "not a unix socket" in result.stderr and "Traceback" not in result.stderr
    assert precious.read_text() == "keep me\n"


def test_runserver_stream_refuses_a_file_at_its_socket_path(project: Project) -> None:
    precious = project.directory / "notes.txt"
    precious.write_text("keep me\n")
    result = subprocess.run(
        [sys.executable, "manage.py", "runserver_stream", "--socket", str(precious)],
        cwd=REPO, env=project.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "not a unix socket" in result.stderr
    assert precious.read_text() == "keep me\n"
