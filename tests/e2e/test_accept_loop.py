"""The server's own accept loop (``Listening.accept_from``, :mod:`asyncapy.listening`): it retries when the process
runs out of descriptors, lets other errors through, and every accepted connection is
closed however its session ends, even one cancelled before it was admitted."""

from __future__ import annotations

import errno
import logging
import sys

import pytest
import trio

if sys.version_info < (3, 11):  # built in since 3.11; trio depends on the backport before
    from exceptiongroup import ExceptionGroup

from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.domain.ports import SessionRecord
from asyncapy.listening import ACCEPT_RETRY_SECONDS
from tests.conftest import serving

from .wire import Wire


class _FlakyListener(trio.abc.Listener):
    """Fails its first accepts with ``errors``, then hands out ``streams``, then waits."""

    def __init__(self, errors: list, streams: list) -> None:
        self.errors = errors
        self.streams = streams
        self.calls = 0

    async def accept(self):
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        if self.streams:
            return self.streams.pop(0)
        await trio.sleep_forever()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_out_of_descriptors_is_logged_and_retried(make_server, caplog):
    server = make_server()
    served: list = []

    async def fake_handle(stream) -> None:
        served.append(stream)

    server._listening.handle_connection = fake_handle
    ours, theirs = trio.testing.memory_stream_pair()
    listener = _FlakyListener([OSError(errno.EMFILE, "Too many open files")], [ours])
    with caplog.at_level(logging.ERROR, logger="asyncapy.server"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._listening.accept_from, listener, nursery)
            with trio.fail_after(5):
                while not served:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert served == [ours]
    assert listener.calls >= 2
    [record] = [r for r in caplog.records if "accept returned" in r.getMessage()]
    assert "EMFILE" in record.getMessage() and str(ACCEPT_RETRY_SECONDS) in record.getMessage()


async def test_other_accept_errors_are_not_swallowed(make_server):
    server = make_server()
    listener = _FlakyListener([OSError(errno.EINVAL, "Invalid argument")], [])
    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._listening.accept_from, listener, nursery)
    [error] = raised.value.exceptions
    assert isinstance(error, OSError) and error.errno == errno.EINVAL


class _StuckStore(MemorySessionStore):
    """Admission never answers (a store that hangs)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = trio.Event()

    async def admit(self, record: SessionRecord, limit: int) -> bool:
        self.waiting.set()
        await trio.sleep_forever()


async def test_a_connection_cancelled_before_admission_is_still_closed(make_server):
    """A shutdown that cancels a session still waiting for the store closes its
    connection at once (not whenever the garbage collector gets to it): the server's
    socket is closed, and the client sees the end of the stream."""
    store = _StuckStore()
    server = make_server(shutdown_grace=0.1)
    server.store = store
    accepted: list = []
    serve_stream = server._sessions.serve

    async def recording(stream, address, **kwargs):
        accepted.append(stream)  # also keeps the socket from being collected
        await serve_stream(stream, address, **kwargs)

    server._sessions.serve = recording
    async with serving(server) as (host, port):
        wire = await Wire.connect(host, port)
        with trio.fail_after(5):
            await store.waiting.wait()
    [stream] = accepted
    assert stream.socket.fileno() == -1
    with trio.fail_after(5):
        assert await wire.stream.receive_some(100) == b""
    await wire.aclose()
