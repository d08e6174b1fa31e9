"""Fixtures of the end-to-end tests: echo servers and throwaway TLS certificates."""

from __future__ import annotations

import pytest
import trustme

import asyncapy.reactor
import asyncapy.sessions
from asyncapy import Client, Packet

BOTH_PATHS = frozenset({
    "test_accept_loop", "test_backpressure", "test_client", "test_direct_io", "test_dispatch_e2e",
    "test_fair_share", "test_garbage", "test_handlers_isolation", "test_hostile_policy",
    "test_protocol_errors", "test_proxy_protocol", "test_rate_limits", "test_reply_deadline",
    "test_session_ended", "test_sessions", "test_slowloris", "test_smoke", "test_reactor",
})
"""Modules whose tests run twice, once over each serving path of an in-process server:
the reactor (the default on Linux) and a task per session (``reactor=False``, and
where epoll is missing). Servers in child processes serve with the default."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        "serving_path" in metafunc.fixturenames
        and metafunc.module.__name__.rpartition(".")[2] in BOTH_PATHS
        and not metafunc.definition.get_closest_marker("keep_join_after")  # the reactor's own
    ):
        metafunc.parametrize("serving_path", ["reactor", "task"], indirect=True)


@pytest.fixture(autouse=True)
def serving_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The serving path of this test's in-process servers: ``reactor`` (the default), or
    ``task`` in the second run of a :data:`BOTH_PATHS` module's tests, where the
    reactor is unavailable, as where epoll is missing.

    On the reactor path, sessions join the reactor's set at once
    (``asyncapy.reactor.JOIN_AFTER`` is 0): by default a session's own task answers its
    first requests, and tests that make a request or two would never see the
    reactor's passes. ``tests/e2e/test_reactor.py`` tests the default as it is."""
    path: str = getattr(request, "param", "reactor")
    if path == "task":
        monkeypatch.setattr(asyncapy.sessions, "available", lambda: False)
    elif "keep_join_after" not in request.keywords:
        monkeypatch.setattr(asyncapy.reactor, "JOIN_AFTER", 0)
    return path


@pytest.fixture
def make_echo(make_server):
    """Factory of servers that echo every packet back (in the session's encoding)."""

    def make(**kwargs):
        server = make_server(**kwargs)

        @server.add_handler()
        async def echo(client: Client, packet: Packet) -> None:
            await client.send(packet)

        return server

    return make


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path):
    """PEM files on disk: the CA, and a server certificate for 127.0.0.1 with its key
    in a separate file."""
    server_cert = ca.issue_cert("127.0.0.1")
    paths = {
        "cafile": tmp_path / "ca.pem",
        "certfile": tmp_path / "server.pem",
        "keyfile": tmp_path / "server.key",
    }
    ca.cert_pem.write_to_path(str(paths["cafile"]))
    server_cert.cert_chain_pems[0].write_to_path(str(paths["certfile"]))
    for pem in server_cert.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["certfile"]), append=True)
    server_cert.private_key_pem.write_to_path(str(paths["keyfile"]))
    return {name: str(path) for name, path in paths.items()}
