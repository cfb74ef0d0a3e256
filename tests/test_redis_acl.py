"""deploy/users.acl: one Redis user per role, allowed what that role's processes do and no more.

- The shipped file keeps Redis from starting until every placeholder password hash in it is
  replaced: a deploy can go live neither with a known password nor with none.
- redis-server with deploy/redis.conf and the ACL (passwords the test made) starts in
  protected mode, with the default user off.
- The real roles run against it, each as its own user: Django creates, starts and cancels
  tasks and cleans old ones up, workers run them (and take one over from a worker that stopped),
  gateways (``manage.py runserver_stream`` and ``python -m streamcoord gateway``) stream them and
  start a created task on first connect. Redis refused none of their commands (``ACL LOG``).
- Each role is refused what it must not do, by Redis, whatever the client sends; a script it
  loads runs with its permissions, not more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import hashlib
import inspect
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from streamcoord.keys import KeySpace, TaskRef
from streamcoord.settings import Settings

from .processes import REPO, Gateway, Project, redis_answers, start_gateway, stop_process, wait_for

DEPLOY = REPO / "deploy"
USERS_ACL = DEPLOY / "users.acl"
REDIS_CONF = DEPLOY / "redis.conf"
README = DEPLOY / "README.md"
#: A user's password as shipped: the name of the hash a deploy puts in its place. Not 64 hex
#: digits, so redis-server refuses the file until it is replaced.
PLACEHOLDER = re.compile(r"#([A-Z]+)_PASSWORD_SHA256\b")
#: The users streamcoord's processes log in as, one per role (deploy/README.md, "Redis access
#: per role"); the others are for people (admin) and probes (healthcheck).
ROLE_USERS = ("gateway", "worker", "django")


# -- reading the ACL --------------------------------------------------------------------------


def acl_users(text: str) -> dict[str, list[str]]:
    """The users of an ACL file: name -> its rules, in order."""
    users = {}
    for line in text.splitlines():
        if line.strip():
            keyword, name, *rules = line.split()
            assert keyword == "user", f"users.acl: {line!r} is not a user line"
            users[name] = rules
    return users


def with_passwords(text: str, passwords: dict[str, str]) -> str:
    """The ACL with each placeholder replaced by the SHA-256 of that user's password."""

    def digest(match: re.Match[str]) -> str:
        return "#" + hashlib.sha256(passwords[match[1].lower()].encode()).hexdigest()

    return PLACEHOLDER.sub(digest, text)


def write_acl(directory: Path) -> tuple[Path, dict[str, str]]:
    """deploy/users.acl with a new random password for every user, in ``directory``."""
    text = USERS_ACL.read_text()
    passwords = {name.lower(): secrets.token_hex(16) for name in PLACEHOLDER.findall(text)}
    path = directory / "users.acl"
    path.write_text(with_passwords(text, passwords))
    return path, passwords


def redis_url(sock: Path, user: str, password: str) -> str:
    """A role's URL on a unix socket: ``unix://user:password@/path/to/redis.sock``."""
    return f"unix://{user}:{password}@{sock}"


@contextlib.contextmanager
def redis_with_conf(directory: Path, aclfile: Path) -> Iterator[Path]:
    """redis-server with deploy/redis.conf, changed only in where it listens (a unix socket in
    ``directory``, no TCP port), writes (``directory``) and finds its ACL; its socket."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run the tests with ./run test")
    sock, log = directory / "redis.sock", directory / "redis.log"
    process = subprocess.Popen(
        [binary, str(REDIS_CONF), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--dir", str(directory), "--logfile", str(log), "--aclfile", str(aclfile)],
    )
    try:
        def started() -> bool:
            if process.poll() is not None:
                text = log.read_text() if log.exists() else ""
                raise AssertionError(f"redis-server exited with {process.returncode}:\n{text}")
            return redis_answers(sock)

        wait_for(started, 10, "redis-server with deploy/redis.conf and the ACL to answer")
        yield sock
    finally:
        stop_process(process)


# -- the shipped file -------------------------------------------------------------------------


def test_the_shipped_acl_has_no_usable_password() -> None:
    """Every user but ``default`` has exactly one password, a placeholder; none is ``nopass``
    or has a plain-text password; ``default`` is off and has none."""
    users = acl_users(USERS_ACL.read_text())
    assert users.get("default", [])[:2] == ["off", "resetpass"], users.get("default")
    assert set(ROLE_USERS) <= set(users)
    for name, rules in users.items():
        assert "nopass" not in rules, f"{name}: nopass"
        assert not [r for r in rules if r.startswith((">", "<", "!"))], f"{name}: a plain-text password"
        hashes = [r for r in rules if r.startswith("#")]
        if name == "default":
            assert not hashes, "the default user has a password"
        else:
            assert [m[1].lower() if (m := PLACEHOLDER.fullmatch(h)) else h for h in hashes] == [name], (
                f"{name}: expected one placeholder #{name.upper()}_PASSWORD_SHA256, got {hashes}"
            )


def test_the_acl_covers_the_key_prefix_and_every_key() -> None:
    """The ACL is written for the default prefix, and every key streamcoord builds
    (streamcoord/keys.py) is within some role's key patterns, every channel within its channel
    patterns: a new key needs a decision here."""
    prefix = Settings().key_prefix
    users = acl_users(USERS_ACL.read_text())
    patterns = {
        rule.lstrip("(").rstrip(")").split("~", 1)[1]
        for name in ROLE_USERS for rule in users[name] if "~" in rule
    }
    assert all(p.startswith(f"{prefix}:") for p in patterns), sorted(patterns)
    channel_patterns = {rule[1:] for name in ROLE_USERS for rule in users[name] if rule.startswith("&")}
    assert channel_patterns == {f"{prefix}:*"}, channel_patterns
    keys, ref = KeySpace(prefix), TaskRef("examples", "ProgressTask", "7")
    samples = {"ref": ref, "gateway_id": "0123456789ab", "worker_id": "host-1-abc"}
    built = [
        getattr(keys, name)(**{p: samples[p] for p in inspect.signature(getattr(keys, name)).parameters})
        for name, member in vars(KeySpace).items()
        if inspect.isfunction(member) and not name.startswith("_") and name != "live"
    ]
    assert len(built) >= 8, built
    assert fnmatch.fnmatchcase(keys.live(ref), f"{prefix}:*")  # the one channel
    # Redis's glob and fnmatch agree on what the ACL uses: literal text (braces included) and '*'.
    assert not [key for key in built if not any(fnmatch.fnmatchcase(key, p) for p in patterns)]


def test_the_scaling_guide_documents_every_user() -> None:
    """deploy/README.md's table of users names exactly the users of users.acl."""
    text = README.read_text()
    section = re.split(r"\n#{2,3} ", text.split("### Redis access per role", 1)[1], maxsplit=1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert documented == set(acl_users(USERS_ACL.read_text())), documented


@pytest.mark.system
def test_redis_refuses_to_start_with_the_placeholders(tmp_path: Path) -> None:
    """A deploy that forgot to set the passwords gets no Redis at all, with a message that
    names the file and line, rather than one that anyone who has read this file can use."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run the tests with ./run test")
    result = subprocess.run(
        [binary, str(REDIS_CONF), "--port", "0", "--unixsocket", str(tmp_path / "redis.sock"),
         "--dir", str(tmp_path), "--logfile", "", "--aclfile", str(USERS_ACL)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode != 0, result.stdout
    assert re.search(rf"{re.escape(str(USERS_ACL))}:\d+: The password hash", result.stdout), result.stdout


@pytest.mark.system
def test_redis_conf_runs_protected_with_the_default_user_off(tmp_path: Path) -> None:
    aclfile, passwords = write_acl(tmp_path)
    with redis_with_conf(tmp_path, aclfile) as sock:
        with SyncRedis(unix_socket_path=str(sock), username="admin", password=passwords["admin"], decode_responses=True) as admin:
            config = admin.config_get("*")
            assert config["protected-mode"] == "yes"
            assert config["aclfile"] == str(aclfile)
            assert (config["appendonly"], config["maxmemory-policy"]) == ("yes", "noeviction")
            default = admin.acl_getuser("default")
            assert "off" in default["flags"] and "nopass" not in default["flags"] and not default["passwords"], default
            assert set(admin.acl_users()) == set(passwords) | {"default"}
        # Nobody gets in without a user and its password.
        with SyncRedis(unix_socket_path=str(sock)) as anonymous, pytest.raises(AuthenticationError):
            anonymous.ping()
        for user, password in [("default", ""), ("default", "x"), ("gateway", passwords["worker"])]:
            with SyncRedis(unix_socket_path=str(sock), username=user, password=password) as client, pytest.raises(AuthenticationError):
                client.ping()
        for user, password in passwords.items():
            with SyncRedis.from_url(redis_url(sock, user, password)) as client:
                assert client.ping() is True


# -- the roles at work ------------------------------------------------------------------------


@dataclasses.dataclass
class Deployment:
    """Redis as deploy/ configures it, the example project's database, and the gateways."""

    sock: Path
    passwords: dict[str, str]
    admin: SyncRedis
    #: ``manage.py`` commands as the Django role (create_task, cancel_task, cleanup, shell).
    django: Project
    #: ``manage.py runworker`` as the worker role.
    workers: Project
    #: The compose/Kubernetes gateway (``manage.py runserver_stream``) as the gateway role.
    gateway: Gateway
    #: ``python -m streamcoord gateway`` as the gateway role.
    core_gateway: Gateway

    def url(self, user: str) -> str:
        return redis_url(self.sock, user, self.passwords[user])

    def client(self, user: str) -> SyncRedis:
        return SyncRedis.from_url(self.url(user), decode_responses=True)

    def refused(self) -> list[dict[str, Any]]:
        """What Redis refused anyone since the last ``forget_refusals`` (ACL LOG)."""
        entries: Any = self.admin.acl_log()
        return list(entries)

    def forget_refusals(self) -> None:
        self.admin.acl_log_reset()

    def dead_letters(self) -> list[str]:
        """The tasks listed in ``sc:dead``."""
        entries: Any = self.admin.xrange("sc:dead")
        return [fields["task"] for _, fields in entries]

    def state(self, model: str, pk: int) -> dict[str, str]:
        return self.admin.hgetall(KeySpace().state(TaskRef("examples", model, str(pk))))  # type: ignore[return-value]

    def wait_state(self, model: str, pk: int, states: set[str], timeout: float) -> None:
        wait_for(lambda: self.state(model, pk).get("state") in states, timeout, f"{model} {pk} to be {states}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("acl")
    aclfile, passwords = write_acl(directory)
    with redis_with_conf(directory, aclfile) as sock:
        urls = {user: redis_url(sock, user, passwords[user]) for user in ROLE_USERS}
        django = Project(directory, urls["django"])
        django.manage("migrate", "--noinput", "-v", "0")
        gateways = Project(directory, urls["gateway"])
        workers = Project(directory, urls["worker"])
        admin = SyncRedis(unix_socket_path=str(sock), username="admin", password=passwords["admin"], decode_responses=True)
        core_gateway = None
        try:
            gateway = gateways.gateway("gw-django")
            core_gateway = start_gateway(directory, urls["gateway"], "gw-core")
            # Migrating, starting (runserver_stream registers the models) and connecting.
            assert admin.acl_log() == [], logs(gateway, core_gateway)
            yield Deployment(sock, passwords, admin, django, workers, gateway, core_gateway)
        finally:
            for project in (workers, gateways, django):
                project.stop_all()
            if core_gateway is not None:
                core_gateway.stop()
            admin.close()


def shell(project: Project, code: str) -> str:
    """What ``code`` printed last, run by ``manage.py shell`` (which may print a banner first)."""
    return project.manage("shell", "-c", code).strip().splitlines()[-1]


def logs(*processes: Gateway) -> str:
    return "\n".join(f"--- {p.log.name}\n{p.log_text()[-3000:]}" for p in processes)


@pytest.mark.system
async def test_a_task_started_by_django_runs_on_a_worker_and_streams_through_both_gateways(
    deployment: Deployment, sse: Any
) -> None:
    d = deployment
    d.forget_refusals()
    worker = d.workers.worker("worker-run")
    try:
        created = d.django.create_task("ProgressTask", "steps=3", "delay=0.2", start=True)
        assert created["started"] is True
        for gateway in (d.gateway, d.core_gateway):
            client = await sse(gateway.socket, created["stream"])
            assert client.status == 200, (client.status, logs(gateway))
            events = await asyncio.wait_for(client.events_until_end(), 20)
            assert [e.event for e in events] == ["start", "progress", "progress", "progress", "complete"], logs(gateway, worker)
        assert d.state("ProgressTask", created["id"])["state"] == "completed"
    finally:
        worker.stop()
    assert d.refused() == []


@pytest.mark.system
async def test_a_gateway_starts_a_created_task_on_first_connect(deployment: Deployment, sse: Any) -> None:
    d = deployment
    d.forget_refusals()
    worker = d.workers.worker("worker-lazy")
    try:
        created = d.django.create_task("ProgressTask", "steps=2", "delay=0.1")  # not started
        assert d.state("ProgressTask", created["id"])["state"] == "pending"
        client = await sse(d.core_gateway.socket, created["stream"])
        events = await asyncio.wait_for(client.events_until_end(), 20)
        assert [e.event for e in events] == ["start", "progress", "progress", "complete"], logs(d.core_gateway, worker)
    finally:
        worker.stop()
    assert d.refused() == []


@pytest.mark.system
async def test_django_asks_and_cancels_pending_and_running_tasks(deployment: Deployment, sse: Any) -> None:
    d = deployment
    d.forget_refusals()
    # A pending task: Django ends it itself (its `cancelled` event goes through append.lua).
    pending = d.django.create_task("ProgressTask", "steps=2", "delay=0")
    said = d.django.manage("cancel_task", "ProgressTask", str(pending["id"])).strip()
    assert said == "cancelled before it started", said
    assert d.state("ProgressTask", pending["id"])["state"] == "cancelled"

    # A running task: the request goes to its worker through the worker's control stream.
    worker = d.workers.worker("worker-cancel", lease_seconds=1.5)
    try:
        running = d.django.create_task("ContinueTask", start=True)
        client = await sse(d.gateway.socket, running["stream"])
        first = await asyncio.wait_for(client.next_event(), 20)
        assert first is not None and first.event == "started", logs(worker)
        is_running = "from django_app.coordinator import coordinator\nprint(coordinator.is_task_running({!r}, {}))"
        assert shell(d.django, is_running.format("ContinueTask", running["id"])) == "True"
        await asyncio.sleep(1.2)  # the worker renews its lease (every 0.5 s) meanwhile
        said = d.django.manage("cancel_task", "ContinueTask", str(running["id"])).strip()
        assert said.startswith("cancellation sent to worker"), said
        rest = await asyncio.wait_for(client.events_until_end(), 20)
        assert [e.event for e in rest] == ["cancelled"], logs(worker)
        assert shell(d.django, is_running.format("ContinueTask", running["id"])) == "False"
    finally:
        worker.stop()
    assert d.refused() == []


@pytest.mark.system
async def test_a_worker_takes_over_what_a_stopping_worker_hands_back(deployment: Deployment, sse: Any) -> None:
    """SIGTERM to a worker with a task running: it hands the task back (hand_back.lua, XCLAIM),
    another worker claims it (XAUTOCLAIM, recover.lua) and, the task having no attempt left,
    ends it with WorkerLost and lists it in the dead letters."""
    d = deployment
    d.forget_refusals()
    first = d.workers.worker("worker-leaving", lease_seconds=1.5, shutdown_grace_seconds=0.2)
    second = None
    try:
        task = d.django.create_task("ContinueTask", start=True)
        d.wait_state("ContinueTask", task["id"], {"running"}, 20)
        second = d.workers.worker("worker-staying", lease_seconds=1.5)
        client = await sse(d.gateway.socket, task["stream"])
        assert first.stop(signal.SIGTERM, timeout=20) == 0, logs(first)
        events = await asyncio.wait_for(client.events_until_end(), 20)
        assert [e.event for e in events] == ["started", "error"], logs(first, second)
        assert events[-1].json()["error_type"] == "WorkerLost"
        label = f"examples.ContinueTask:{task['id']}"
        # Listed after the event went out (and the row was written): wait for it.
        wait_for(lambda: label in d.dead_letters(), 10, "the dead letter")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert d.refused() == []


@pytest.mark.system
def test_cleanup_old_tasks_deletes_keys_as_django(deployment: Deployment) -> None:
    d = deployment
    d.forget_refusals()
    task = d.django.create_task("ProgressTask", "steps=1", "delay=0")
    d.django.manage("cancel_task", "ProgressTask", str(task["id"]))
    ref = TaskRef("examples", "ProgressTask", str(task["id"]))
    assert d.admin.exists(KeySpace().state(ref), KeySpace().events(ref)) == 2
    out = d.django.manage("cleanup_old_tasks", "--hours", "0")
    assert "deleted" in out, out
    assert d.admin.exists(KeySpace().state(ref), KeySpace().events(ref)) == 0
    assert d.refused() == []


# -- what each role is refused -----------------------------------------------------------------

EVENTS = "sc:{examples.ProgressTask:1}:events"
STATE = "sc:{examples.ProgressTask:1}:state"
#: For each user, commands it must be refused, each as Redis would get it.
REFUSED: dict[str, list[tuple[str, ...]]] = {
    "gateway": [
        ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0"),
        ("ACL", "LIST"), ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", "1"),
        ("GET", "other"), ("HGETALL", "other:key"), ("XRANGE", "other:{x}:events", "-", "+"),
        ("XADD", EVENTS, "*", "type", "forged"),  # a task's events are written by its run
        ("HSET", "sc:workers", "w", "{}"), ("DEL", "sc:jobs"), ("XDEL", "sc:jobs", "1-0"),
        ("XRANGE", "sc:jobs", "-", "+"), ("XREADGROUP", "GROUP", "workers", "gw", "STREAMS", "sc:jobs", ">"),
        ("XADD", "sc:worker:w:control", "*", "cancel", "x"), ("XADD", "sc:dead", "*", "task", "x"),
        ("DEL", EVENTS), ("DEL", STATE), ("EXPIRE", STATE, "1"), ("EVAL", "return 1", "0"),
        ("HSET", "sc:gateway:x:wake", "a", "b"), ("SPUBLISH", "sc:x", "hi"),
        # Tracking would tell key names outside the role's patterns (BCAST invalidations).
        ("CLIENT", "TRACKING", "on", "BCAST"), ("CLIENT", "CACHING", "yes"),
    ],
    "worker": [
        ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"), ("SCAN", "0"),
        ("ACL", "SETUSER", "worker", "+@all"), ("CLIENT", "LIST"), ("SHUTDOWN", "NOSAVE"), ("MONITOR",),
        ("GET", "other"), ("HGETALL", "other:key"), ("DEL", "other"), ("XADD", "other", "*", "a", "b"),
        ("XREAD", "STREAMS", "sc:gateway:x:wake", "0"), ("EVAL", "return 1", "0"),
        ("XGROUP", "DESTROY", "sc:jobs", "workers"), ("RENAME", EVENTS, "other"),
        # Tracking would tell key names outside the role's patterns (BCAST invalidations).
        ("CLIENT", "TRACKING", "on", "BCAST"), ("CLIENT", "CACHING", "yes"),
    ],
    "django": [
        ("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0"), ("CLIENT", "LIST"),
        ("GET", "other"), ("HGETALL", "other:key"),
        ("XREADGROUP", "GROUP", "workers", "dj", "STREAMS", "sc:jobs", ">"), ("XACK", "sc:jobs", "workers", "1-0"),
        ("XRANGE", "sc:jobs", "-", "+"), ("DEL", "sc:jobs"), ("XADD", "sc:dead", "*", "task", "x"),
        ("HSET", "sc:workers", "w", "{}"), ("SADD", "sc:worker:w:running", "x"),
        ("XREAD", "STREAMS", "sc:worker:w:control", "0"), ("EVAL", "return 1", "0"),
        # Tracking would tell key names outside the role's patterns (BCAST invalidations).
        ("CLIENT", "TRACKING", "on", "BCAST"), ("CLIENT", "CACHING", "yes"),
    ],
    "healthcheck": [("GET", "x"), ("HGETALL", STATE), ("INFO",), ("CLIENT", "LIST")],
}


@pytest.mark.system
@pytest.mark.parametrize("user", sorted(REFUSED))
def test_each_role_is_refused_what_it_must_not_do(deployment: Deployment, user: str) -> None:
    """Each command is sent for real (``ACL DRYRUN`` only where running it would stop the test:
    SHUTDOWN, MONITOR); Redis must answer NOPERM and change nothing."""
    d = deployment
    with d.client(user) as client:
        keys_before = sorted(d.admin.keys("*"))
        allowed = []
        for command in REFUSED[user]:
            if command[0] in {"SHUTDOWN", "MONITOR"}:
                verdict = d.admin.execute_command("ACL", "DRYRUN", user, *command)
                if verdict == "OK":
                    allowed.append(command)
                continue
            try:
                client.execute_command(*command)
            except NoPermissionError:
                continue
            allowed.append(command)
        assert not allowed, f"{user} may run {allowed}"
        assert sorted(d.admin.keys("*")) == keys_before


@pytest.mark.system
def test_channels_are_the_prefix_s_only(deployment: Deployment) -> None:
    """Issue 12's sharded pub/sub: gateways may subscribe, workers and Django publish, under the
    prefix only."""
    d = deployment
    dryrun = lambda user, *command: d.admin.execute_command("ACL", "DRYRUN", user, *command)  # noqa: E731
    assert dryrun("gateway", "SSUBSCRIBE", "sc:{examples.ProgressTask:1}") == "OK"
    assert dryrun("worker", "SPUBLISH", "sc:{examples.ProgressTask:1}", "x") == "OK"
    assert dryrun("django", "SPUBLISH", "sc:{examples.ProgressTask:1}", "x") == "OK"
    assert dryrun("gateway", "SSUBSCRIBE", "other") != "OK"
    assert dryrun("worker", "SPUBLISH", "other", "x") != "OK"
    assert dryrun("worker", "SSUBSCRIBE", "sc:x") != "OK"
    assert dryrun("gateway", "SUBSCRIBE", "sc:x") != "OK"


@pytest.mark.system
@pytest.mark.parametrize(("body", "keys"), [
    ("return redis.call('FLUSHALL')", []),
    ("return redis.call('HSET', 'sc:workers', 'w', '{}')", []),
    ("return redis.call('XADD', KEYS[1], '*', 'type', 'forged')", [EVENTS]),
])
def test_a_script_runs_with_its_caller_s_permissions(deployment: Deployment, body: str, keys: list[str]) -> None:
    """The gateway may load and run scripts (the lazy start's), but a script is refused keys its
    caller may not write, and every command in it is checked against the caller's permissions."""
    d = deployment
    with d.client("gateway") as gateway:
        keys_before = sorted(d.admin.keys("*"))
        sha = gateway.script_load(body)
        with pytest.raises(ResponseError, match=r"no permissions|can't run|can't access"):
            gateway.evalsha(sha, len(keys), *keys)
        assert sorted(d.admin.keys("*")) == keys_before
