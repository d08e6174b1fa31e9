"""Shared fixtures: a real server on a free loopback port, inside the test's trio run."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from asyncapy.server import Server


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[tuple[str, int]]:
    """Run ``server`` (bound to 127.0.0.1, port 0) in the background; yield (host, port).

    On exit the server is shut down gracefully, as on SIGTERM, and waited for.
    """
    server.addr = "127.0.0.1"
    server.port = 0
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.serve)
        host, port = addresses[0][:2]
        try:
            yield host, port
        finally:
            server.request_shutdown()


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
