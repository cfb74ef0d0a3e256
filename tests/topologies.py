"""Redis topologies of a test's own, on TCP ports the kernel picked: a Redis Cluster of N
masters, and a Sentinel group (a master, a replica and three sentinels).

The machine is shared: no fixed port. A port comes from binding port 0 on 127.0.0.1 (for a
cluster node its bus port, port + 10000, must be free too); a server that still loses the race
for its port exits, and is started again on another. Every node has a directory of its own, no
persistence, and is stopped by the pid we started.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from .processes import stop_process, wait_for

HOST = "127.0.0.1"
BUS_OFFSET = 10000


class PortTaken(RuntimeError):
    """A server exited at start, most likely because another process took its port first."""


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, bus: bool = False) -> int:
    """A TCP port on 127.0.0.1 the kernel just handed out (with ``bus``: port + 10000 free too)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if not bus:
            return port
        if port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def cli(port: int, *args: str, timeout: float = 15) -> str:
    """``redis-cli -h 127.0.0.1 -p <port> <args>``: its stdout (raises with the output on failure)."""
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli is not installed: run the tests with ./run test")
    result = subprocess.run(
        [binary, "-h", HOST, "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def info_fields(text: str) -> dict[str, str]:
    """``INFO`` / ``CLUSTER INFO`` output as a dict."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and not key.startswith("#"):
            fields[key] = value
    return fields


@dataclass
class Node:
    """One redis-server (or sentinel) on a TCP port of 127.0.0.1."""

    directory: Path
    args: list[str] = field(default_factory=list)
    sentinel_conf: str = ""  # a sentinel's configuration (``port``/``dir`` lines are added)
    bus: bool = False  # a cluster node: its bus port must be free too
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, attempts: int = 5) -> Node:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run the tests with ./run test")
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self.port = free_port(bus=self.bus)
            if self.sentinel_conf:
                # Sentinels rewrite their configuration file: each gets its own.
                conf = self.directory / "sentinel.conf"
                conf.write_text(
                    f"port {self.port}\nbind {HOST}\ndir {self.directory}\n"
                    f"logfile {self.log}\n{self.sentinel_conf}"
                )
                command = [binary, str(conf), "--sentinel"]
            else:
                command = [
                    binary, "--port", str(self.port), "--bind", HOST, "--dir", str(self.directory),
                    "--save", "", "--appendonly", "no", "--logfile", str(self.log), *self.args,
                ]
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self._wait_up()
                return self
            except PortTaken:
                self.process.wait(5)
                if attempt == attempts - 1:
                    raise
        return self

    def _wait_up(self) -> None:
        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PortTaken(f"redis-server on port {self.port} exited with {self.process.returncode}:\n{self.log_text()[-2000:]}")
            return _ping(self.port)

        wait_for(up, 15, f"redis-server on port {self.port} to answer PING")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def cli(self, *args: str, timeout: float = 15) -> str:
        return cli(self.port, *args, timeout=timeout)

    def client(self) -> redis.Redis:
        """A plain (sync) client of this one server, for checks; use it in a ``with``."""
        return redis.Redis(HOST, self.port, socket_timeout=5, decode_responses=True)

    def info(self, section: str = "") -> dict[str, str]:
        with self.client() as client:
            fields = client.info(section) if section else client.info()
        return {key: str(value) for key, value in fields.items()}


# -- a Redis Cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    """``masters`` cluster-enabled redis-servers joined by ``redis-cli --cluster create``."""

    directory: Path
    masters: int = 3
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL, naming two startup nodes (the client learns the rest)."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[:2])

    def start(self) -> Cluster:
        try:
            for n in range(self.masters):
                node = Node(self.directory / f"node{n}", bus=True)
                node.args = [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node.directory / "nodes.conf"),
                    "--cluster-node-timeout", "5000",
                ]
                self.nodes.append(node.start())
            out = subprocess.run(
                [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                 *(n.address for n in self.nodes), "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            self.wait_ok(30)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, within: float) -> None:
        """Until every node says ``cluster_state:ok`` with all 16384 slots assigned and agrees on
        who serves them."""
        def ok() -> bool:
            for node in self.nodes:
                info = info_fields(node.cli("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                    return False
                if int(info.get("cluster_known_nodes", "0")) != len(self.nodes):
                    return False
            return self._agree()

        wait_for(ok, within, "the cluster to reach cluster_state:ok", interval=0.2)

    def _agree(self) -> bool:
        views = [self._owners_seen_by(node) for node in self.nodes]
        return all(view == views[0] for view in views)

    def node_ids(self) -> dict[int, str]:
        """Port to cluster node id."""
        return {n.port: n.cli("CLUSTER", "MYID").strip() for n in self.nodes}

    def _owners_seen_by(self, node: Node) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, port)`` ranges, as ``CLUSTER NODES`` on ``node`` says."""
        ranges = []
        for line in node.cli("CLUSTER", "NODES").splitlines():
            parts = line.split()
            if len(parts) < 8 or "master" not in parts[2]:
                continue
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            for spec in parts[8:]:
                if spec.startswith("["):
                    continue  # a slot being migrated/imported
                first, _, last = spec.partition("-")
                ranges.append((int(first), int(last or first), port))
        return sorted(ranges)

    def slot_owners(self, node: Node | None = None) -> dict[int, int]:
        """Slot number to the port of the master serving it (as one node sees it)."""
        owners: dict[int, int] = {}
        for first, last, port in self._owners_seen_by(node or self.nodes[0]):
            for slot in range(first, last + 1):
                owners[slot] = port
        return owners

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# -- a Sentinel group ----------------------------------------------------------------------------

SERVICE = "mymaster"


@dataclass
class SentinelGroup:
    """A master, a replica of it (``--replicaof``) and three sentinels watching them."""

    directory: Path
    service: str = SERVICE
    master: Node | None = None
    replica: Node | None = None
    sentinels: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + f"/{self.service}/0"

    @property
    def servers(self) -> list[Node]:
        return [n for n in (self.master, self.replica) if n is not None]

    def start(self) -> SentinelGroup:
        try:
            self.master = Node(self.directory / "master").start()
            self.replica = Node(self.directory / "replica", args=["--replicaof", HOST, str(self.master.port)]).start()
            replica = self.replica
            wait_for(lambda: replica.info("replication").get("master_link_status") == "up", 20,
                     "the replica to sync with the master", interval=0.1)
            conf = (
                f"sentinel monitor {self.service} {HOST} {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            for n in range(3):
                self.sentinels.append(Node(self.directory / f"sentinel{n}", sentinel_conf=conf).start())
            self.wait_watching(30)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_watching(self, within: float) -> None:
        """Until every sentinel knows the replica (up) and the two other sentinels."""
        assert self.replica is not None
        replica_port = self.replica.port

        def watching() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    replicas = client.sentinel_slaves(self.service)
                    others = client.sentinel_sentinels(self.service)
                if not any(r["port"] == replica_port and r["flags"] == "slave" for r in replicas):
                    return False
                if len(others) != len(self.sentinels) - 1:
                    return False
            return True

        wait_for(watching, within, "the sentinels to see the replica and each other", interval=0.2)

    def master_port(self, sentinel: Node | None = None) -> int:
        """The master's port, as a sentinel tells it."""
        with (sentinel or self.sentinels[0]).client() as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.service)
        return int(port)

    @staticmethod
    def role(node: Node) -> str:
        """``master`` or ``slave``, as the server itself says."""
        return node.info("replication").get("role", "")

    def failover(self) -> str:
        """``SENTINEL FAILOVER`` (no agreement needed); what the sentinel answered."""
        return self.sentinels[0].cli("SENTINEL", "FAILOVER", self.service).strip()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.servers]:
            node.stop()
