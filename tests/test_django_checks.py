"""System checks of streamcoord's settings (``django_app.checks``): a typo in
``settings.STREAMCOORD``, a Redis or gateway URL streamcoord cannot use, token auth without a
secret, and every value ``Settings`` refuses, each an error naming the setting, before anything
starts. The pure function is tested directly; one system test runs ``manage.py check``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings as django_settings
from django.core.checks import CheckMessage
from django.test.utils import override_settings

from .processes import REPO

if not django_settings.configured:
    django_settings.configure(INSTALLED_APPS=["django_app"], DATABASES={})
    django.setup()

# Set up above: the registered check reads Django's settings.
from django_app.checks import check_settings, streamcoord_settings, tokens_unused

SECRET = "s" * 40
PUBLIC = {"STREAM_AUTH": "public"}


def ids(messages: list[CheckMessage]) -> list[str]:
    return [str(m.id) for m in messages]


def only(messages: list[CheckMessage], check_id: str) -> CheckMessage:
    assert ids(messages) == [check_id], [str(m) for m in messages]
    return messages[0]


# -- E001: unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("REDIS_ULR", "'REDIS_URL'"), ("redis_ulr", "'redis_url'"), ("LAZYSTART", "'LAZY_START'"), ("SECRETS", "'SECRET'")],
)
def test_a_typo_in_the_dict_is_an_error_that_names_the_closest_setting(key: str, suggestion: str) -> None:
    error = only(check_settings({key: "x", **PUBLIC}, {}), "streamcoord.E001")
    assert repr(key) in error.msg and error.hint == f"did you mean {suggestion}?"
    assert error.is_serious()


def test_an_unknown_key_with_no_close_name_lists_the_known_ones() -> None:
    messages = check_settings({"COLOUR": "blue", 7: "x"} | PUBLIC, {})
    assert ids(messages) == ["streamcoord.E001", "streamcoord.E001"]
    for error in messages:
        assert error.hint is not None and "REDIS_URL" in error.hint and "LAZY_START" in error.hint


def test_keys_are_read_in_any_case_and_good_settings_say_nothing() -> None:
    assert check_settings({"redis_url": "redis://h:6379/0", "Secret": SECRET, "LAZY_START": False}, {}) == []
    assert check_settings({}, {}) == []


def test_a_streamcoord_that_is_no_dict_is_an_error() -> None:
    only(check_settings(["REDIS_URL"], {}), "streamcoord.E007")


def test_an_environment_variable_that_names_no_setting_is_a_warning() -> None:
    [warning] = check_settings({}, {"STREAMCOORD_LAZYSTART": "0", "STREAMCOORD_LAZY_START": "0", "OTHER": "1"})
    assert warning.id == "streamcoord.W001" and not warning.is_serious()
    assert "STREAMCOORD_LAZYSTART" in warning.msg and warning.hint == "did you mean STREAMCOORD_LAZY_START?"


# -- E002: Redis URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis.example:6379/0", "rediss://user:pw@redis.example:6380/2", "redis://redis.example",
        "unix:///run/redis/redis.sock?db=1", "redis+sentinel://s1:26379,s2:26380/mymaster/0",
        "redis+sentinel://worker:pw@s1:26379/mymaster", "redis+cluster://n1:7000,n2:7001",
    ],
)
def test_every_redis_url_form_streamcoord_reads_passes(url: str) -> None:
    assert check_settings({"REDIS_URL": url, **PUBLIC}, {}) == []
    assert check_settings({}, {"STREAMCOORD_REDIS_URL": url, "STREAMCOORD_STREAM_AUTH": "public"}) == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://redis:6379", "use redis://"),
        ("redis.example:6379", "use redis://"),
        ("redis://redis:port/0", "Port could not be cast"),
        ("redis://redis:70000/0", "Port out of range"),
        ("redis://redis:6379/zero", "the database must be a number"),
        ("unix://", "name the socket's path"),
        ("redis+sentinel://s1:26379", "name the Sentinel service"),
        ("redis+sentinel://s1:26379/mymaster/x", "must be a number"),
        ("redis+cluster://n1:port", "nodes must be host:port"),
        ("redis+cluster://:7000", "every node must be host:port"),
    ],
)
def test_a_redis_url_streamcoord_cannot_use_is_an_error(url: str, problem: str) -> None:
    error = only(check_settings({"REDIS_URL": url, **PUBLIC}, {}), "streamcoord.E002")
    assert 'STREAMCOORD["REDIS_URL"]' in error.msg and problem in error.msg, error.msg
    error = only(check_settings(PUBLIC, {"STREAMCOORD_REDIS_URL": url}), "streamcoord.E002")
    assert error.msg.startswith("STREAMCOORD_REDIS_URL ")


def test_a_refused_redis_url_never_shows_its_password() -> None:
    error = only(check_settings({"REDIS_URL": "redis+sentinel://app:Hunter2-pw@s1:26379", **PUBLIC}, {}), "streamcoord.E002")
    assert "Hunter2-pw" not in str(error) and "app:***@s1" in error.msg


# -- E003: the gateway URL ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://stream.example.com", "http://127.0.0.1:8001/", "https://example.com/sse/v1"])
def test_a_gateway_url_of_scheme_host_port_and_path_passes(url: str) -> None:
    assert check_settings({"GATEWAY_URL": url}, {}) == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("stream.example.com", "http:// or https://"),
        ("ftp://stream.example.com", "http:// or https://"),
        ("https://", "names no host"),
        ("https://stream.example.com:http", "Port could not be cast"),
        ("https://user:pw@stream.example.com", "no user or password"),
        ("https://stream.example.com/?a=1", "no query or fragment"),
        ("https://stream.example.com/#top", "no query or fragment"),
    ],
)
def test_a_gateway_url_that_is_no_base_url_is_an_error_reported_once(url: str, problem: str) -> None:
    error = only(check_settings({}, {"STREAMCOORD_GATEWAY_URL": url}), "streamcoord.E003")
    assert "STREAMCOORD_GATEWAY_URL" in error.msg and problem in error.msg, error.msg


# -- W002, E005: the secret --------------------------------------------------------------------


def test_token_auth_with_a_redis_url_and_no_secret_is_an_error() -> None:
    error = only(check_settings({"REDIS_URL": "redis://h/0"}, {}), "streamcoord.W002")
    assert "STREAMCOORD_SECRET" in error.msg and error.hint and "STREAMCOORD_STREAM_AUTH=public" in error.hint
    only(check_settings({}, {"STREAMCOORD_REDIS_URL": "redis://h/0", "STREAMCOORD_STREAM_AUTH": "token"}), "streamcoord.W002")


@pytest.mark.parametrize(
    ("mapping", "environ"),
    [
        ({}, {}),  # the embedded default makes a secret of its own
        ({"REDIS_URL": "redis://h/0", "STREAM_AUTH": "public"}, {}),
        ({"REDIS_URL": "redis://h/0"}, {"STREAMCOORD_SECRET": SECRET}),
        ({}, {"STREAMCOORD_REDIS_URL": "redis://h/0", "STREAMCOORD_STREAM_AUTH": "public"}),
    ],
)
def test_no_secret_error_without_a_redis_url_in_public_mode_or_with_a_secret(mapping: dict[str, Any], environ: dict[str, str]) -> None:
    assert check_settings(mapping, environ) == []


def test_a_command_that_uses_no_tokens_is_spared_the_missing_secret_but_not_a_short_one() -> None:
    assert check_settings({"REDIS_URL": "redis://h/0"}, {}, tokens_used=False) == []
    only(check_settings({"REDIS_URL": "redis://h/0", "SECRET": "short"}, {}, tokens_used=False), "streamcoord.E005")


def test_a_short_secret_is_an_error_reported_once() -> None:
    error = only(check_settings({}, {"STREAMCOORD_SECRET": "x" * 31}), "streamcoord.E005")
    assert "31 characters" in error.msg and "at least 32" in error.msg and error.hint and "token_urlsafe" in error.hint


# -- E006: whatever else Settings refuses ------------------------------------------------------


@pytest.mark.parametrize(
    ("mapping", "environ", "message"),
    [
        ({"LAZY_START": "0"}, {}, "STREAMCOORD_LAZY_START (lazy_start) must be a bool"),
        ({"BLOCK_MS": 10_000}, {}, "must be below STREAMCOORD_REDIS_SOCKET_TIMEOUT"),
        ({}, {"STREAMCOORD_HEARTBEAT_SECONDS": "soon"}, "STREAMCOORD_HEARTBEAT_SECONDS='soon' is not a valid float"),
        ({"STREAM_AUTH": "everyone"}, {}, "must be one of token, public"),
        ({"CORS_ORIGINS": "*"}, {}, "only with stream_auth=public"),
        ({"KEY_PREFIX": "a:b"}, {}, "without braces, colons or spaces"),
        ({"MAX_CONNECTIONS": 0}, {}, "must be a positive number"),
    ],
)
def test_a_value_settings_refuses_is_an_error_with_its_message(mapping: dict[str, Any], environ: dict[str, str], message: str) -> None:
    error = only(check_settings(mapping, environ), "streamcoord.E006")
    assert message in error.msg, error.msg


def test_every_problem_is_reported_at_once() -> None:
    messages = check_settings(
        {"REDIS_ULR": "x", "REDIS_URL": "http://x", "GATEWAY_URL": "ftp://x", "LAZY_START": "no"},
        {"STREAMCOORD_SECRET": "short"},
    )
    assert sorted(ids(messages)) == ["streamcoord.E001", "streamcoord.E002", "streamcoord.E003", "streamcoord.E005", "streamcoord.E006"]


# -- the registered check ----------------------------------------------------------------------


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [v for v in os.environ if v.startswith("STREAMCOORD_")]:
        monkeypatch.delenv(variable)


@pytest.mark.usefixtures("clean_environ")
def test_the_registered_check_reads_settings_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.checks import registry

    assert streamcoord_settings in registry.registry.get_checks()
    assert "streamcoord" in registry.registry.tags_available()
    with override_settings(STREAMCOORD={"REDIS_URL": "redis://h/0", "LAZYSTART": False}):
        assert ids(streamcoord_settings(None)) == ["streamcoord.E001", "streamcoord.W002"]
        with tokens_unused():
            assert ids(streamcoord_settings(None)) == ["streamcoord.E001"]
        assert ids(streamcoord_settings(None)) == ["streamcoord.E001", "streamcoord.W002"]
    monkeypatch.setenv("STREAMCOORD_SECRET", SECRET)
    with override_settings(STREAMCOORD={"REDIS_URL": "redis://h/0"}):
        assert streamcoord_settings(None) == []


# -- manage.py check on the example project ----------------------------------------------------


@pytest.mark.system
def test_manage_py_check_names_a_typo_in_the_streamcoord_dict(tmp_path: Path) -> None:
    (tmp_path / "typo_settings.py").write_text(
        "from django_app.project.settings import *  # noqa: F403\n"
        # A unix socket in the test's own directory: nothing listens there, and check never connects.
        f'STREAMCOORD = {{"REDIS_ULR": "unix://{tmp_path}/redis.sock", "STREAM_AUTH": "public"}}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMCOORD_", "DJANGO_"))}
    env |= {"DJANGO_DB_PATH": str(tmp_path / "db.sqlite3"), "STREAMCOORD_STREAM_AUTH": "public"}

    def check(settings_module: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", "check"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
            env=env | {"DJANGO_SETTINGS_MODULE": settings_module, "PYTHONPATH": str(tmp_path)},
        )

    clean = check("django_app.project.settings")
    assert clean.returncode == 0 and "no issues" in clean.stdout, (clean.stdout, clean.stderr)
    typo = check("typo_settings")
    assert typo.returncode == 1, (typo.stdout, typo.stderr)
    assert "(streamcoord.E001) unknown setting 'REDIS_ULR' in settings.STREAMCOORD" in typo.stderr, typo.stderr
    assert "HINT: did you mean 'REDIS_URL'?" in typo.stderr and "Traceback" not in typo.stderr
