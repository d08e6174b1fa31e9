"""``open_test_server``: a real server on a free loopback port, inside the current trio run.

For tests that need a socket (a real client, TLS, the command line's client...);
:func:`asyncapy.testing.open_test_client` tests handlers without one. The pytest
plugin (:mod:`asyncapy.testing.plugin`) hands this function out as the
``asyncapy_serve`` fixture. It needs trio, never pytest.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator, Optional

import trio

if TYPE_CHECKING:  # pragma: no cover
    from ..server import Server

__all__ = ["open_test_server"]


@asynccontextmanager
async def open_test_server(server: "Server", *, host: str = "127.0.0.1") -> AsyncIterator[tuple[str, int]]:
    """Run ``server`` in the background on ``host`` and a free port; yield ``(host, port)``.

    The server runs as :meth:`~asyncapy.server.Server.serve` runs it, so its
    :meth:`~asyncapy.server.Server.setup` runs before the block and its
    :meth:`~asyncapy.server.Server.shutdown` after. Leaving the block shuts it down
    gracefully, as SIGTERM does (in-flight handlers get ``shutdown_grace`` seconds),
    and waits for it; the server's ``addr`` and ``port`` are then restored. An
    exception raised in the block propagates as itself, not inside an
    :class:`ExceptionGroup`; so does one raised while the server starts (a
    ``ConfigError``, an ``OSError``...).

    :param host: the address to listen on: ``'127.0.0.1'``, or ``'::1'`` for IPv6.
    """
    saved = server.addr, server.port
    server.addr, server.port = host, 0
    failure: Optional[Exception] = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                addresses = await nursery.start(server.serve)
            except Exception as exc:
                failure = exc
            else:
                try:
                    yield addresses[0][0], addresses[0][1]
                except Exception as exc:
                    # Re-raised below, outside the nursery, so not wrapped in an
                    # ExceptionGroup: ``pytest.raises`` around the block keeps working.
                    failure = exc
                finally:
                    server.request_shutdown()
    finally:
        server.addr, server.port = saved
    if failure is not None:
        raise failure
