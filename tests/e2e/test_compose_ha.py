"""``deploy/ha/docker-compose.yml`` and its ``haproxy.cfg``, checked without Docker.

The highly available example: HAProxy (PROXY protocol v2, health checks) in front of
two API servers, a Redis master and replica, three sentinels. As for the single-host
``docker-compose.yml`` (tests/e2e/test_compose.py), the command lines are run as they
are written, with only what must differ outside Docker substituted: loopback
addresses, free ports, and a file path of the sentinels' own. Redis, its replica and
the three sentinels are started from their compose command lines; both API servers
from theirs, on the resulting ``redis+sentinel://`` store; HAProxy checks its
configuration (``haproxy -c``) with the servers' names pointing at loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

from tests.real_parts import _command, _info, _Processes, _wait, free_ports, require

from .processes import ROOT, Running, free_port

HA = ROOT / "deploy" / "ha"
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
APIS = ("api-1", "api-2")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((HA / "docker-compose.yml").read_text())


def command(compose: dict, service: str) -> list[str]:
    value = compose["services"][service]["command"]
    return shlex.split(value) if isinstance(value, str) else [str(arg) for arg in value]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_the_api_servers_trust_haproxy_and_use_the_sentinels(compose):
    services = compose["services"]
    haproxy_address = services["haproxy"]["networks"]["ha"]["ipv4_address"]
    subnet = ipaddress.ip_network(compose["networks"]["ha"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(haproxy_address) in subnet
    for api in APIS:
        argv = command(compose, api)
        assert argv[:2] == ["asyncapy", "run"]
        assert services[api]["build"] == "../.."  # the repository's Dockerfile
        assert option(argv, "--host") == "0.0.0.0"
        assert "--proxy-protocol" in argv
        assert option(argv, "--trusted-proxies") == haproxy_address  # HAProxy only
        store = option(argv, "--store")
        assert store == "redis+sentinel://" + ",".join(f"{s}:26379" for s in SENTINELS) + "/mymaster"
        assert int(option(argv, "--workers")) >= 1
    replica = command(compose, "redis-replica")
    assert replica[replica.index("--replicaof") + 1 :] [:2] == ["redis-master", "6379"]
    for sentinel in SENTINELS:
        script = command(compose, sentinel)[-1]
        assert "sentinel monitor mymaster redis-master 6379 2" in script
        assert "down-after-milliseconds mymaster 1000" in script


def test_haproxy_sends_proxy_v2_to_each_server_and_checks_them():
    config = (HA / "haproxy.cfg").read_text()
    assert re.search(r"default-server .*\bsend-proxy-v2\b.*\bcheck\b.*\bcheck-send-proxy\b", config)
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", config, re.M)
    assert [(name, host, port) for name, host, port in servers] == [(api, api, "8081") for api in APIS]
    assert "mode tcp" in config


def test_haproxy_accepts_its_configuration(tmp_path):
    haproxy = require("haproxy")
    config = (HA / "haproxy.cfg").read_text()
    for api in APIS:
        config = config.replace(f"{api}:8081", f"127.0.0.1:{free_port()}")
    config = config.replace("bind :8081", f"bind 127.0.0.1:{free_port()}")
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def ask_from(source: str, address: tuple, payload: dict, timeout: float = 5) -> dict:
    """One JSON request on a fresh connection from ``source`` (a loopback address
    playing another client host) to ``address``; the decoded reply."""
    body = json.dumps(payload).encode()
    with socket.create_connection(address, timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall((len(body) + 2).to_bytes(4, "big") + bytes([22, 0]) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed after {data!r}")
            data += chunk
    return json.loads(data[6:])


def refused_from(source: str, address: tuple, timeout: float = 5) -> bytes:
    """What a request from ``source`` straight to ``address`` gets back before the
    server closes the connection (b"": closed without a reply)."""
    with socket.create_connection(address, timeout=timeout, source_address=(source, 0)) as sock:
        try:
            sock.sendall(b"\x00\x00\x00\x04\x16\x00{}")
            return sock.recv(65536)
        except ConnectionResetError:
            return b""


def haproxy_config_on_loopback(api_ports: dict, front_port: int) -> str:
    """deploy/ha/haproxy.cfg with only what must differ outside Docker changed: the
    servers' names and the frontend's address as loopback ones, no Docker DNS, a
    ``maxconn`` this machine's open-file limit allows (HAProxy needs two descriptors a
    connection), and HAProxy connecting from 127.0.0.2, the address the servers then
    trust (in the compose file, HAProxy's own fixed address)."""
    config = (HA / "haproxy.cfg").read_text()
    config = re.sub(r"(?m)^(\s*maxconn) \d+$", r"\1 1024", config)
    config = re.sub(r"(?ms)^resolvers docker\n.*?\n\n", "", config)
    config = config.replace(" resolvers docker init-addr last,libc,none", "")
    for api, port in api_ports.items():
        config = config.replace(f"{api}:8081", f"127.0.0.1:{port}")
    config = config.replace("bind :8081", f"bind 127.0.0.1:{front_port}")
    return re.sub(r"(?m)^backend servers\n", "backend servers\n    source 127.0.0.2\n", config)


def test_the_whole_deployment_runs_from_its_command_lines(compose):
    """Master, replica and three sentinels from their command lines, then both API
    servers from theirs, on the store they name, and HAProxy from its configuration in
    front of them: clients are served through HAProxy as themselves (the PROXY v2
    header), a client reaching a server directly is refused, and each server stops on
    SIGTERM."""
    require("redis-server")
    haproxy = require("haproxy")
    master_port, replica_port, *sentinel_ports = free_ports(5)
    local = ["--port", None, "--bind", "127.0.0.1", "--protected-mode", "no"]
    with _Processes("asyncapy-compose-ha-") as parts, contextlib.ExitStack() as apis:
        master = command(compose, "redis-master")
        parts.spawn([require("redis-server"), *master[1:], *(a if a else str(master_port) for a in local)], "master.log")
        replica = command(compose, "redis-replica")
        replica = [str(master_port) if a == "6379" else "127.0.0.1" if a == "redis-master" else a for a in replica]
        parts.spawn([require("redis-server"), *replica[1:], *(a if a else str(replica_port) for a in local)], "replica.log")
        _wait("replication", lambda: _info(replica_port, "replication").get("master_link_status") == "up", parts.processes)
        for name, port in zip(SENTINELS, sentinel_ports):
            argv = command(compose, name)
            assert argv[:2] == ["sh", "-c"]
            script = (
                argv[2].replace("port 26379", f"port {port}\\nbind 127.0.0.1\\nprotected-mode no")
                .replace("redis-master 6379", f"127.0.0.1 {master_port}")
                .replace("/tmp/sentinel.conf", f"{parts.directory}/{name}.conf")
                .replace("redis-server", require("redis-server"))
            )
            parts.spawn(["sh", "-c", script], f"{name}.log")
        _wait(
            "sentinels",
            lambda: all(
                "127.0.0.1" in _command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
                for port in sentinel_ports
            ),
            parts.processes,
        )
        runs, ports = {}, {}
        for api in APIS:
            argv = command(compose, api)
            store = option(argv, "--store")
            for name, port in zip(SENTINELS, sentinel_ports):
                store = store.replace(f"{name}:26379", f"127.0.0.1:{port}")
            port = free_port()
            # HAProxy's fixed address in the compose network becomes 127.0.0.2, the
            # address this test's HAProxy connects from.
            substitutes = {"--host": "127.0.0.1", "--port": str(port), "--store": store, "--trusted-proxies": "127.0.0.2"}
            for name, value in substitutes.items():
                argv[argv.index(name) + 1] = value
            assert argv[0] == "asyncapy"
            run = apis.enter_context(Running([sys.executable, "-m", "asyncapy", *argv[1:]]))
            assert run.serving(int(option(argv, "--workers"))) == port
            runs[api], ports[api] = run, port
        front = free_port()
        path = f"{parts.directory}/haproxy.cfg"
        with open(path, "w", encoding="utf-8") as file:
            file.write(haproxy_config_on_loopback(ports, front))
        parts.spawn([haproxy, "-db", "-f", path], "haproxy.log")
        _wait("HAProxy", lambda: ask_from("127.0.0.3", ("127.0.0.1", front), {"hello": 0}) == {"hello": 0}, parts.processes)
        for n in range(6):  # leastconn over idle servers: both get some
            assert ask_from(("127.0.0.3", "127.0.0.4")[n % 2], ("127.0.0.1", front), {"hello": n}) == {"hello": n}
        for api in APIS:
            # Not HAProxy: never believed, closed without a reply.
            assert refused_from("127.0.0.1", ("127.0.0.1", ports[api])) == b""
        for run in runs.values():
            assert run.stop() == 0, run.output
            output = run.output
            assert "redis+sentinel://127.0.0.1:" in output  # where sessions live, no password
            assert "Traceback" not in output
            assert "PROXY protocol on: every connection starts with a PROXY header from a trusted proxy (127.0.0.2)" in output
            # Clients as themselves, HAProxy's health checks (LOCAL) as HAProxy.
            assert re.search(r"Session started for 127\.0\.0\.[34]\b", output), output
            assert "refused a connection from 127.0.0.1, not a trusted proxy" in output
            assert "PROXY protocol: closed a connection" not in output
