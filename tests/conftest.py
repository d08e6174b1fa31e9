"""Shared fixtures: a real server on a free loopback port, inside the test's trio run."""

from __future__ import annotations

import pytest

from asyncapy import transport
from asyncapy.server import Server
from asyncapy.testing.serving import open_test_server

serving = open_test_server
"""``async with serving(server) as (host, port)``: ``server`` on 127.0.0.1 and a free port,
in the test's trio run, shut down gracefully (as on SIGTERM) and waited for on exit. The
pytest plugin's implementation (the ``asyncapy_serve`` fixture), under its old name here."""


@pytest.fixture
def make_server():
    """Factory for servers with test-friendly defaults (loopback, free port)."""

    def make(**kwargs) -> Server:
        kwargs.setdefault("timeout", 5)
        return Server(addr="127.0.0.1", port=0, **kwargs)

    return make


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server for the whole test session (see tests/redis_server.py)."""
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The URL of the session's redis-server, emptied before the test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster():
    """A real three-master Redis Cluster for the whole test session (tests/real_parts.py)."""
    from tests.real_parts import RedisCluster

    with RedisCluster().start() as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster) -> str:
    """The ``redis+cluster://`` URL of the session's cluster, every master emptied."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(scope="session")
def sentinel_set():
    """A real Sentinel set (master, replica, three sentinels) for the session; tests that
    kill its master start their own (:class:`tests.real_parts.SentinelSet`)."""
    from tests.real_parts import SentinelSet

    with SentinelSet().start() as sentinels:
        yield sentinels


@pytest.fixture
def sentinel_url(sentinel_set) -> str:
    """The ``redis+sentinel://`` URL of the session's set, its master emptied."""
    sentinel_set.flush()
    return sentinel_set.url


@pytest.fixture
def writable_waits(monkeypatch) -> list:
    """The descriptors (numbers) of the sockets direct writes (``asyncapy.transport``)
    waited on for room, once per wait: proof that a test made a write partial."""
    waits: list = []
    real = transport.wait_writable

    async def counting(sock):
        waits.append(sock.fileno())
        await real(sock)

    monkeypatch.setattr(transport, "wait_writable", counting)
    return waits
