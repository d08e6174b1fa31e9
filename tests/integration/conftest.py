"""Fixtures of the Redis integration tests: server processes, and a Redis of one's own."""

from __future__ import annotations

import pytest

from tests.integration.processes import ServerProcess
from tests.redis_server import RedisServer


@pytest.fixture
def spawn(tmp_path):
    """Factory of :class:`ServerProcess` es (``spawn(redis_url, session_limit=3, ...)``),
    all stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(redis_url: str, **settings: object) -> ServerProcess:
        process = ServerProcess(tmp_path, f"server-{len(started)}", redis_url, **settings)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def own_redis():
    """A redis-server of this test's own, to stop and restart at will: the shared
    session-scoped one must stay up for every other test."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
