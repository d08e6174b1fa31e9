"""The AsyncAPY pytest plugin: the ``asyncapy_serve`` fixture.

Installing AsyncAPY registers it with pytest (the ``pytest11`` entry point named
``asyncapy``), so its fixtures are available in every test without an import. The
tests that use them are ``async`` and need a trio runner: ``pytest-trio`` with
``trio_mode = true``, or ``@pytest.mark.trio``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from .serving import open_test_server

__all__ = ["asyncapy_serve"]


@pytest.fixture
def asyncapy_serve() -> Callable[..., Any]:
    """Start servers on a real socket: ``async with asyncapy_serve(server) as (host, port)``.

    The server listens on 127.0.0.1 and a free port, in the test's own trio run, for
    as long as the block lasts; leaving the block shuts it down gracefully and waits
    for it (see :func:`asyncapy.testing.open_test_server`, which this fixture is)::

        from asyncapy.client import AsyncClient

        async def test_hello(asyncapy_serve):
            async with asyncapy_serve(server) as (host, port):
                async with AsyncClient(tls=False) as client:
                    await client.connect(host, port)
                    assert await client.request({"name": "bob"}) == {"greeting": "hello, bob"}

    Pass ``host="::1"`` to listen on IPv6 loopback instead.
    """
    return open_test_server
