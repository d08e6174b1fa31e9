"""Real Redis Sentinel, Redis Cluster and HAProxy processes on free loopback ports.

What users run in front of and behind several AsyncAPY servers, started by the tests
themselves the way :mod:`tests.redis_server` starts one ``redis-server``: each helper
writes its configuration to a temporary directory, starts the processes, waits until
they are really ready (a Sentinel set that knows its replica and all its sentinels, a
Cluster whose every node says ``cluster_state:ok``, an HAProxy whose admin socket
answers), and kills them all on :meth:`stop` (or leaving its ``with`` block).

Never skipped: a machine without a program fails the test with the command that
installs it (``make test`` and ``.ci/run`` install them themselves on Debian). Sentinel
needs no package of its own: ``redis-server --sentinel`` is Sentinel.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Optional, Sequence

import pytest

from tests.redis_server import INSTALL_HINT as REDIS_INSTALL_HINT

__all__ = ["SentinelSet", "RedisCluster", "HAProxy", "TLSFiles", "free_ports", "require"]

INSTALL_HINTS = {
    "redis-server": REDIS_INSTALL_HINT,
    "redis-cli": (
        "redis-cli is not installed; the Redis Cluster tests create their cluster with it. "
        "Install it with `apt-get install redis-tools` (Debian/Ubuntu) or run `make test`."
    ),
    "haproxy": (
        "haproxy is not installed; the PROXY protocol tests put a real one in front of the "
        "servers. Install it with `apt-get install haproxy` (Debian/Ubuntu) or run `make test`, "
        "which installs it."
    ),
}

READY_SECONDS = 30.0
"""How long a helper waits for its processes to be ready before it gives up."""


def require(program: str) -> str:
    """The path of ``program``; fails the test (never skips) with how to install it."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(INSTALL_HINTS[program], pytrace=False)
    return path


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, bus_offset: int = 0) -> list[int]:
    """``count`` distinct TCP ports that nothing listens on now, on 127.0.0.1; with
    ``bus_offset``, each ``port + bus_offset`` is free too (a cluster node's bus)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 65536 - bus_offset)
        if port in ports or (port + bus_offset) in ports or port - bus_offset in ports:
            continue
        if _bindable(port) and (not bus_offset or _bindable(port + bus_offset)):
            ports.append(port)
    return ports


_TLS_PORTS: dict[int, ssl.SSLContext] = {}
"""Ports of nodes started with TLS only, and the context :func:`_command` speaks to them with."""


class TLSFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with
    trustme and written as PEM files to ``directory``: what ``rediss+...`` tests give
    the Redis processes (``--tls-*``) and the store URL (``ssl_ca_certs``...)."""

    def __init__(self, directory: str) -> None:
        import trustme

        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("asyncapy-client@example.org")
        self.ca = os.path.join(directory, "ca.pem")
        self.server_cert = os.path.join(directory, "server.pem")
        self.server_key = os.path.join(directory, "server.key")
        self.client_cert = os.path.join(directory, "client.pem")
        self.client_key = os.path.join(directory, "client.key")
        ca.cert_pem.write_to_path(self.ca)
        server.cert_chain_pems[0].write_to_path(self.server_cert)
        server.private_key_pem.write_to_path(self.server_key)
        client.cert_chain_pems[0].write_to_path(self.client_cert)
        client.private_key_pem.write_to_path(self.client_key)

    def server_args(self, *, auth_clients: str = "yes") -> list[str]:
        """``redis-server`` arguments of a TLS-only node; ``auth_clients`` is Redis's
        ``tls-auth-clients`` (``yes``: a client certificate is required)."""
        return [
            "--tls-cert-file", self.server_cert, "--tls-key-file", self.server_key,
            "--tls-ca-cert-file", self.ca, "--tls-auth-clients", auth_clients,
        ]

    def query(self) -> str:
        """The TLS options of a store URL: the CA and the client certificate."""
        return f"ssl_ca_certs={self.ca}&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"

    def context(self) -> ssl.SSLContext:
        """A client context trusting the CA and presenting the client certificate."""
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.client_cert, self.client_key)
        return context


def _command(port: int, *args: str, timeout: float = 2.0) -> str:
    """Send one command to the Redis (or Sentinel) on ``port``; its reply, decoded.

    A tiny RESP client, so that the helpers do not depend on the library under test's
    own Redis client. Bulk strings, integers, statuses and errors are returned as text;
    arrays as text lines (nested ones flattened), which is all the readiness checks
    read.
    """
    request = f"*{len(args)}\r\n" + "".join(f"${len(arg.encode())}\r\n{arg}\r\n" for arg in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain:
        context = _TLS_PORTS.get(port)
        with context.wrap_socket(plain, server_hostname="127.0.0.1") if context else plain as sock:
            sock.sendall(request.encode())
            reader = sock.makefile("rb")
            return "\n".join(_read_reply(reader))


def _read_reply(reader) -> list[str]:
    line = reader.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2].decode()
    if kind in (b"+", b":"):
        return [rest]
    if kind == b"-":
        raise RuntimeError(rest)
    if kind == b"$":
        if int(rest) < 0:
            return []
        data = reader.read(int(rest) + 2)[:-2]
        return [data.decode()]
    if kind == b"*":
        items: list[str] = []
        for _ in range(max(0, int(rest))):
            items += _read_reply(reader)
        return items
    raise RuntimeError(f"unexpected reply {line!r}")


def _info(port: int, section: str) -> dict:
    text = _command(port, "INFO", section)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def _wait(what: str, check, processes: Sequence[subprocess.Popen], seconds: float = READY_SECONDS):
    """Poll ``check()`` until it returns something true; fail with ``what`` if a process
    died or the time ran out."""
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{what}: {process.args[0]} exited with {process.returncode}")
        try:
            result = check()
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {seconds:.0f} s (last error: {last!r})")


class _Processes:
    """Processes started in a temporary directory, all killed by :meth:`stop`."""

    def __init__(self, prefix: str) -> None:
        self.directory = tempfile.mkdtemp(prefix=prefix)
        self.processes: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(os.path.join(self.directory, log), "ab") as output:
            process = subprocess.Popen(args, cwd=self.directory, stdout=output, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def ports_used(self) -> list[int]:
        """The ports this set listens on (forgotten as TLS ports when it stops)."""
        return []

    def log(self, name: str) -> str:
        """The output of one process so far (for failure messages)."""
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8", errors="replace") as file:
                return file.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill every process (idempotent) and remove the directory."""
        for port in self.ports_used():
            _TLS_PORTS.pop(port, None)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        self.processes = []
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _redis_args(binary: str, port: int, *extra: str, tls: Optional[TLSFiles] = None) -> list[str]:
    """A ``redis-server`` command line on ``port``: plain TCP, or with ``tls`` TLS only
    (``--port 0 --tls-port PORT``, replication and the cluster bus over TLS too)."""
    if tls is None:
        listen = ["--port", str(port)]
    else:
        _TLS_PORTS[port] = tls.context()
        listen = ["--port", "0", "--tls-port", str(port), *tls.server_args(), "--tls-replication", "yes"]
        if "--cluster-enabled" in extra:
            listen += ["--tls-cluster", "yes"]
    return [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "no", *extra]


# -- Sentinel ------------------------------------------------------------------------------------
class SentinelSet(_Processes):
    """A master, a replica and three sentinels watching them (quorum 2), on loopback.

    ``down-after-milliseconds`` is 1000, so the sentinels agree that a killed master is
    down about 1 s after it dies and promote the replica a second or two later.
    :attr:`url` is the ``redis+sentinel://`` store URL of the set.
    """

    def __init__(self, service: str = "mymaster", down_after_ms: int = 1000, *, tls: bool = False) -> None:
        super().__init__("asyncapy-sentinel-")
        self.tls: Optional[TLSFiles] = TLSFiles(self.directory) if tls else None
        """With ``tls=True``: every node and sentinel speaks TLS only (client
        certificates required); :attr:`url` is then ``rediss+sentinel://``."""
        self.binary = require("redis-server")
        self.service = service
        self.down_after_ms = down_after_ms
        ports = free_ports(5)
        self.master_port, self.replica_port = ports[0], ports[1]
        self.sentinel_ports = ports[2:]
        self.data_processes: dict[int, subprocess.Popen] = {}

    def ports_used(self) -> list[int]:
        return [self.master_port, self.replica_port, *self.sentinel_ports]

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", port), ...]`` of the three sentinels (redis-py's form)."""
        return [("127.0.0.1", port) for port in self.sentinel_ports]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/<service>``."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        if self.tls is not None:
            return f"rediss+sentinel://{hosts}/{self.service}?{self.tls.query()}"
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> "SentinelSet":
        """Start all five processes; return once replication is up and every sentinel
        knows the replica and the two other sentinels (else a failover could not get
        its votes)."""
        try:
            self.data_processes[self.master_port] = self.spawn(
                _redis_args(self.binary, self.master_port, tls=self.tls), f"redis-{self.master_port}.log"
            )
            self.data_processes[self.replica_port] = self.spawn(
                _redis_args(
                    self.binary, self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port), tls=self.tls
                ),
                f"redis-{self.replica_port}.log",
            )
            _wait(
                "Sentinel set: replication",
                lambda: _info(self.replica_port, "replication").get("master_link_status") == "up",
                self.processes,
            )
            for port in self.sentinel_ports:
                config = os.path.join(self.directory, f"sentinel-{port}.conf")
                if self.tls is None:
                    listen = f"port {port}\n"
                else:
                    _TLS_PORTS[port] = self.tls.context()
                    listen = (
                        f"port 0\ntls-port {port}\ntls-cert-file {self.tls.server_cert}\n"
                        f"tls-key-file {self.tls.server_key}\ntls-ca-cert-file {self.tls.ca}\n"
                        "tls-auth-clients yes\ntls-replication yes\n"
                    )
                with open(config, "w", encoding="utf-8") as file:
                    file.write(
                        f"{listen}bind 127.0.0.1\nprotected-mode no\ndir {self.directory}\n"
                        f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 2\n"
                        f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {self.service} 10000\n"
                        f"sentinel parallel-syncs {self.service} 1\n"
                    )
                self.spawn([self.binary, config, "--sentinel"], f"sentinel-{port}.log")
            for port in self.sentinel_ports:
                _wait(f"Sentinel on port {port}", lambda port=port: self._knows_everyone(port), self.processes)
        except BaseException:
            self.stop()
            raise
        return self

    def _knows_everyone(self, port: int) -> bool:
        replicas = _command(port, "SENTINEL", "REPLICAS", self.service)
        sentinels = _command(port, "SENTINEL", "SENTINELS", self.service)
        known = sum(1 for other in self.sentinel_ports if other != port and f"\n{other}\n" in f"\n{sentinels}\n")
        return f"\n{self.replica_port}\n" in f"\n{replicas}\n" and known == 2

    def master_address(self, sentinel_port: Optional[int] = None) -> tuple[str, int]:
        """Where a sentinel (the first by default) says the master is now."""
        reply = _command(sentinel_port or self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        host, port = reply.splitlines()
        return host, int(port)

    def kill(self, port: int) -> None:
        """SIGKILL the data node on ``port`` (the master or the replica): no goodbye, as
        when its machine dies."""
        process = self.data_processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def kill_master(self) -> int:
        """SIGKILL the current master; its port."""
        port = self.master_address()[1]
        self.kill(port)
        return port

    def flush(self) -> None:
        """Delete every key on the master (the replica follows)."""
        _command(self.master_address()[1], "FLUSHALL")


# -- Cluster -------------------------------------------------------------------------------------
class RedisCluster(_Processes):
    """A Redis Cluster of ``masters`` masters (no replicas), created with
    ``redis-cli --cluster create``; :attr:`url` is its ``redis+cluster://`` store URL."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 2000, *, tls: bool = False, replicas: int = 0) -> None:
        super().__init__("asyncapy-cluster-")
        self.replicas = replicas
        """Replicas per master (``--cluster-replicas``): a killed master's replica takes
        over its slots (:meth:`kill`)."""
        self.node_processes: dict[int, subprocess.Popen] = {}
        self.tls: Optional[TLSFiles] = TLSFiles(self.directory) if tls else None
        """With ``tls=True``: every node speaks TLS only (clients and the cluster bus,
        client certificates required); :attr:`url` is then ``rediss+cluster://``."""
        self.binary = require("redis-server")
        self.cli = require("redis-cli")
        self.node_timeout_ms = node_timeout_ms
        self.ports = free_ports(masters * (1 + replicas), bus_offset=10000)  # each node's bus: port + 10000

    def ports_used(self) -> list[int]:
        return list(self.ports)

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", port), ...]`` of every node."""
        return [("127.0.0.1", port) for port in self.ports]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...``."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        if self.tls is not None:
            return f"rediss+cluster://{hosts}?{self.tls.query()}"
        return "redis+cluster://" + hosts

    def start(self) -> "RedisCluster":
        """Start the nodes, assign every slot, and wait until each node says
        ``cluster_state:ok``."""
        try:
            for port in self.ports:
                self.node_processes[port] = self.spawn(
                    _redis_args(
                        self.binary, port, "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", str(self.node_timeout_ms), tls=self.tls,
                    ),
                    f"redis-{port}.log",
                )
            for port in self.ports:
                _wait(f"cluster node {port}", lambda port=port: _command(port, "PING") == "PONG", self.processes)
            tls = [] if self.tls is None else [
                "--tls", "--cacert", self.tls.ca, "--cert", self.tls.client_cert, "--key", self.tls.client_key,
            ]
            created = subprocess.run(
                [self.cli, *tls, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                cwd=self.directory, capture_output=True, text=True, timeout=60,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
            for port in self.ports:
                _wait(f"cluster node {port}", lambda port=port: self.info(port)["cluster_state"] == "ok", self.processes)
        except BaseException:
            self.stop()
            raise
        return self

    def flush(self) -> None:
        """Delete every key on every master (replicas follow)."""
        for port in self._masters():
            _command(port, "FLUSHALL")

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``: no goodbye, as when its machine dies."""
        process = self.node_processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def replicated(self) -> bool:
        """Whether every replica's link to its master is up."""
        masters = self._masters()
        if len(masters) * (1 + self.replicas) != len(self.ports):
            return False  # the replicas are still joining
        return all(
            _info(port, "replication").get("master_link_status") == "up" for port in self.ports if port not in masters
        )

    def _masters(self) -> dict[int, tuple[str, list[tuple[int, int]]]]:
        """``{port: (node id, [(first slot, last slot), ...])}`` of every master, from
        ``CLUSTER NODES`` (a bulk text: one line per node)."""
        masters = {}
        alive = next(p for p in self.ports if p not in self.node_processes or self.node_processes[p].poll() is None)
        for line in _command(alive, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2].split(",") or "fail" in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            ranges = []
            for text in fields[8:]:
                if text.startswith("["):
                    continue  # a slot being migrated
                first, _, last = text.partition("-")
                ranges.append((int(first), int(last or first)))
            masters[port] = (fields[0], ranges)
        return masters

    def owner(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        for port, (_, ranges) in self._masters().items():
            if any(first <= slot <= last for first, last in ranges):
                return port
        raise RuntimeError(f"no master serves slot {slot}")

    def move_slot(self, slot: int, to_port: int) -> None:
        """Move ``slot`` and its keys to the master on ``to_port`` (a resharding of one
        slot, the steps ``redis-cli --cluster reshard`` takes), and wait until every
        node agrees."""
        source = self.owner(slot)
        if source == to_port:
            return
        self.begin_migration(slot, to_port)
        while self.migrate_keys(slot, to_port, 100):
            pass
        self.finish_migration(slot, to_port)

    def begin_migration(self, slot: int, to_port: int) -> int:
        """Open the migration of ``slot`` to the master on ``to_port``: the target
        ``IMPORTING``, then the source ``MIGRATING`` (redis-cli's order); the source's
        port. Keys stay where they are until :meth:`migrate_keys`."""
        masters = self._masters()
        source = self.owner(slot)
        _command(to_port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", masters[source][0])
        _command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", masters[to_port][0])
        return source

    def migrate_keys(self, slot: int, to_port: int, count: int) -> int:
        """``MIGRATE`` up to ``count`` keys of ``slot`` from its owner to ``to_port``;
        how many were moved (0: none left)."""
        source = self.owner(slot)
        keys = [k for k in _command(source, "CLUSTER", "GETKEYSINSLOT", str(slot), str(count)).splitlines() if k]
        if keys:
            _command(source, "MIGRATE", "127.0.0.1", str(to_port), "", "0", "5000", "KEYS", *keys)
        return len(keys)

    def finish_migration(self, slot: int, to_port: int) -> None:
        """Give ``slot`` to ``to_port`` on every node (``SETSLOT ... NODE``, the target
        first), after the keys left (:meth:`migrate_keys`), and wait until all agree."""
        target_id = self._masters()[to_port][0]
        source = self.owner(slot)
        for port in [to_port, source] + [p for p in self.ports if p not in (to_port, source)]:
            _command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        _wait(
            f"slot {slot} on {to_port}",
            lambda: all(self._owner_seen_by(port, slot) == to_port for port in self.ports),
            self.processes,
        )

    def _owner_seen_by(self, port: int, slot: int) -> int:
        for line in _command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) >= 8 and "master" in fields[2]:
                for text in fields[8:]:
                    first, _, last = text.partition("-")
                    if not text.startswith("[") and int(first) <= slot <= int(last or first):
                        return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        return 0

    def info(self, port: Optional[int] = None) -> dict:
        """``CLUSTER INFO`` of one node (the first by default), as a dict."""
        text = _command(port or self.ports[0], "CLUSTER", "INFO")
        return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)


# -- HAProxy -------------------------------------------------------------------------------------
class HAProxy(_Processes):
    """HAProxy in TCP mode on a free loopback port, round-robin over ``backends``, with
    a PROXY header (``send-proxy-v2`` or, with ``proxy_version=1``, ``send-proxy``) on
    every connection it opens to them. ``proxy_version=0`` sends none.

    No health checks unless ``check`` (they would open connections the backends'
    tests did not ask for). :attr:`address` is where clients connect.
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        proxy_version: int = 2,
        check: bool = False,
        timeout_s: int = 30,
    ) -> None:
        if proxy_version not in (0, 1, 2):
            raise ValueError(f"proxy_version must be 0, 1 or 2, not {proxy_version!r}")
        if not backends:
            raise ValueError("HAProxy needs at least one backend")
        super().__init__("asyncapy-haproxy-")
        self.binary = require("haproxy")
        self.backends = list(backends)
        self.proxy_version = proxy_version
        self.check = check
        self.timeout_s = timeout_s
        self.port = free_ports(1)[0]
        self.admin_socket = os.path.join(self.directory, "admin.sock")

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)`` of the frontend."""
        return ("127.0.0.1", self.port)

    def config(self) -> str:
        """The configuration file's text."""
        send = {0: "", 1: " send-proxy", 2: " send-proxy-v2"}[self.proxy_version]
        check = " check inter 500" if self.check else ""
        servers = "".join(
            f"    server s{n} {host}:{port}{send}{check}\n" for n, (host, port) in enumerate(self.backends)
        )
        return (
            "global\n"
            f"    stats socket {self.admin_socket} mode 600 level admin\n"
            "    maxconn 1024\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 2s\n"
            f"    timeout client {self.timeout_s}s\n"
            f"    timeout server {self.timeout_s}s\n"
            "frontend api\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend servers\n"
            "backend servers\n"
            "    balance roundrobin\n"
            f"{servers}"
        )

    def start(self) -> "HAProxy":
        """Check the configuration, start HAProxy in the foreground, and wait until its
        admin socket answers (probing the frontend would open a backend connection)."""
        path = os.path.join(self.directory, "haproxy.cfg")
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.config())
        checked = subprocess.run([self.binary, "-c", "-q", "-f", path], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise RuntimeError(f"haproxy refused its configuration:\n{checked.stdout}{checked.stderr}")
        try:
            self.spawn([self.binary, "-db", "-f", path], "haproxy.log")
            _wait("HAProxy", lambda: "Name: HAProxy" in self.admin("show info"), self.processes)
        except BaseException:
            log = self.log("haproxy.log")
            self.stop()
            raise RuntimeError(f"HAProxy did not start:\n{log}") from None
        return self

    def admin(self, command: str) -> str:
        """One command on the admin socket (``show stat``, ``disable server servers/s0``...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(self.admin_socket)
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
