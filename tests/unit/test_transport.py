"""``asyncapy.transport``'s direct ``os.read``/``os.write`` on a plain TCP connection.

Every test runs over a real, connected loopback TCP connection (what the server gets
from its listener): ``ours`` is the accepted side, the one read and written directly;
``peer`` is the connecting side, playing the client. Small socket buffers make a
multi-MiB write impossible in one system call, so the partial-write path runs.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import ssl
import struct
import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

import pytest
import trio
import trio.testing

from asyncapy import transport

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="direct I/O is POSIX only (os.read/os.write on sockets)")

MiB = 1 << 20
SMALL_BUFFER = 4096
"""Asked of SO_SNDBUF/SO_RCVBUF (Linux doubles it, and has a floor): a few KiB."""



async def read(sock, max_bytes: int) -> bytes:
    """A read as the server's session loop makes it: a checkpoint, then
    :func:`~asyncapy.transport.read_now`, and only if nothing has arrived,
    :func:`~asyncapy.transport.receive_waiting`."""
    await trio.lowlevel.checkpoint()
    data = transport.read_now(sock, max_bytes)
    if data is None:
        data = await transport.receive_waiting(sock, max_bytes)
    return data


async def write(sock, data) -> None:
    """A write as :class:`~asyncapy.transport.Channel` makes it:
    :func:`~asyncapy.transport.write_now`, then
    :func:`~asyncapy.transport.write_rest` for what the kernel did not take."""
    sent = transport.write_now(sock, data)
    if sent < len(data):
        await transport.write_rest(sock, data, sent)

@asynccontextmanager
async def tcp_pair(
    *, ours_sndbuf: Optional[int] = None, peer_rcvbuf: Optional[int] = None
) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """``(ours, peer)``: the two ends of a fresh loopback TCP connection.

    The peer's receive buffer is set before it connects (the window is negotiated in
    the handshake); our send buffer after the accept.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        listener = listeners[0]
        port = listener.socket.getsockname()[1]
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if peer_rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
        await sock.connect(("127.0.0.1", port))
        peer = trio.SocketStream(sock)
        ours = await listener.accept()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
    if ours_sndbuf is not None:
        ours.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ours_sndbuf)
    try:
        yield ours, peer
    finally:
        await trio.aclose_forcefully(ours)
        await trio.aclose_forcefully(peer)


def reset_by(stream: trio.SocketStream) -> None:
    """Close ``stream`` with a TCP reset (SO_LINGER on, zero seconds)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def read_available(stream: trio.SocketStream, wait: float = 0.2) -> bytes:
    """Whatever ``stream`` can read until nothing more comes for ``wait`` seconds."""
    got = bytearray()
    while True:
        with trio.move_on_after(wait):
            data = await stream.receive_some(MiB)
            if not data:
                return bytes(got)
            got += data
            continue
        return bytes(got)


# -- raw_socket_of ----------------------------------------------------------------------
async def test_raw_socket_of_a_plain_socket_stream_is_its_socket():
    async with tcp_pair() as (ours, peer):
        assert transport.raw_socket_of(ours) is ours.socket
        assert transport.raw_socket_of(peer) is peer.socket


async def test_raw_socket_of_tls_and_in_memory_streams_is_none():
    left, right = trio.testing.memory_stream_pair()
    assert transport.raw_socket_of(left) is None
    assert transport.raw_socket_of(right) is None
    async with tcp_pair() as (ours, _peer):
        # Built, never handshaken: what the server's SSLListener hands out.
        tls = trio.SSLStream(ours, ssl.create_default_context(), server_hostname="localhost")
        assert transport.raw_socket_of(tls) is None


# -- reading ----------------------------------------------------------------------------
async def test_receive_returns_what_the_peer_sent_at_most_max_bytes_at_a_time():
    async with tcp_pair() as (ours, peer):
        await peer.send_all(b"0123456789")
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(ours.socket)
            assert await read(ours.socket, 4) == b"0123"
            assert await read(ours.socket, 100) == b"456789"


async def test_receive_waits_for_data_that_is_not_there_yet():
    async with tcp_pair() as (ours, peer):
        got = []

        async def reader():
            got.append(await read(ours.socket, 100))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []  # blocked: nothing to read
                await peer.send_all(b"late")
        assert got == [b"late"]


async def test_receive_returns_empty_bytes_at_end_of_stream():
    async with tcp_pair() as (ours, peer):
        await peer.send_all(b"last")
        await peer.send_eof()
        with trio.fail_after(10):
            received = b""
            while True:
                data = await read(ours.socket, 100)
                if not data:
                    break
                received += data
            assert received == b"last"
            assert await read(ours.socket, 100) == b""  # and stays at the end


async def test_receive_is_a_checkpoint_even_when_data_is_already_waiting():
    async with tcp_pair() as (ours, peer):
        await peer.send_all(b"ready")
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(ours.socket)
        with trio.testing.assert_checkpoints():
            assert await read(ours.socket, 100) == b"ready"
        # At end of stream too.
        await peer.send_eof()
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(ours.socket)
        with trio.testing.assert_checkpoints():
            assert await read(ours.socket, 100) == b""


async def test_a_cancelled_receive_consumes_nothing():
    async with tcp_pair() as (ours, peer):
        await peer.send_all(b"keep")
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(ours.socket)
        with trio.CancelScope() as scope:
            scope.cancel()
            await read(ours.socket, 100)
        assert scope.cancelled_caught
        assert await read(ours.socket, 100) == b"keep"


# -- send -------------------------------------------------------------------------------
async def test_send_the_kernel_takes_whole_is_not_a_checkpoint():
    async with tcp_pair() as (ours, peer):
        data = b"reply" * 200
        with trio.testing.assert_no_checkpoints():
            await write(ours.socket, data)
            await write(ours.socket, b"")  # nothing to write: nothing done
        with trio.fail_after(10):
            received = b""
            while len(received) < len(data):
                received += await peer.receive_some(65536)
        assert received == data


async def test_send_of_many_times_the_socket_buffers_to_a_slow_reader_arrives_whole_and_in_order(
    writable_waits,
):
    payload = random.Random(22).randbytes(4 * MiB)
    async with tcp_pair(ours_sndbuf=SMALL_BUFFER, peer_rcvbuf=SMALL_BUFFER) as (ours, peer):
        received = bytearray()

        async def slow_reader():
            reads = 0
            while len(received) < len(payload):
                data = await peer.receive_some(16384)
                assert data, "connection closed early"
                received.extend(data)
                reads += 1
                if reads % 64 == 0:
                    await trio.sleep(0.002)  # lag behind the writer now and then

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                with trio.testing.assert_checkpoints():  # it had to wait: it yielded
                    await write(ours.socket, payload)
        assert len(received) == len(payload)
        assert bytes(received) == payload
        assert writable_waits, "the payload went out in one write: the test proves nothing"
        assert all(fd == ours.socket.fileno() for fd in writable_waits)


async def test_send_accepts_a_bytearray_and_a_memoryview():
    async with tcp_pair() as (ours, peer):
        await write(ours.socket, bytearray(b"ab"))
        await write(ours.socket, memoryview(b"xcdx")[1:3])
        with trio.fail_after(10):
            received = b""
            while len(received) < 4:
                received += await peer.receive_some(100)
        assert received == b"abcd"


async def test_cancelled_while_waiting_for_room_propagates_and_leaves_a_prefix_on_the_wire():
    payload = random.Random(5).randbytes(8 * MiB)
    async with tcp_pair(ours_sndbuf=SMALL_BUFFER, peer_rcvbuf=SMALL_BUFFER) as (ours, peer):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def writer():
                    with scope:
                        await write(ours.socket, payload)

                nursery.start_soon(writer)
                await trio.testing.wait_all_tasks_blocked()  # the peer reads nothing
                scope.cancel()
            assert scope.cancelled_caught
            written = await read_available(peer)
        assert 0 < len(written) < len(payload)
        assert written == payload[: len(written)]


async def test_a_bad_descriptor_is_a_closed_resource():
    """``EBADF`` from the system call (a descriptor closed behind trio's back) is
    ``ClosedResourceError``, as ``SocketStream`` raises for a closed socket."""

    class Gone:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(trio.ClosedResourceError) as caught:
        await write(Gone(fd), b"x")
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EBADF


# -- closed sockets ---------------------------------------------------------------------
async def test_send_and_receive_on_a_socket_closed_before_the_call_raise_closed():
    async with tcp_pair() as (ours, peer):
        sock = ours.socket
        await ours.aclose()
        assert sock.fileno() == -1
        with pytest.raises(trio.ClosedResourceError):
            await write(sock, b"x")
        with pytest.raises(trio.ClosedResourceError):
            await read(sock, 100)
        with trio.fail_after(10):
            assert await peer.receive_some(100) == b""  # nothing was written


async def test_a_send_waiting_for_room_is_woken_closed_when_another_task_closes_the_socket():
    payload = b"x" * (8 * MiB)
    async with tcp_pair(ours_sndbuf=SMALL_BUFFER, peer_rcvbuf=SMALL_BUFFER) as (ours, _peer):
        outcome = []

        async def writer():
            with pytest.raises(trio.ClosedResourceError):
                await write(ours.socket, payload)
            outcome.append("closed")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.testing.wait_all_tasks_blocked()  # blocked: the peer reads nothing
                assert outcome == []
                await ours.aclose()
        assert outcome == ["closed"]


async def test_a_receive_waiting_for_data_is_woken_closed_when_another_task_closes_the_socket():
    async with tcp_pair() as (ours, _peer):
        outcome = []

        async def reader():
            with pytest.raises(trio.ClosedResourceError):
                await read(ours.socket, 100)
            outcome.append("closed")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert outcome == []
                await ours.aclose()
        assert outcome == ["closed"]


async def test_an_old_socket_never_touches_a_new_connection_that_reuses_its_descriptor():
    """Once trio closed a socket, its descriptor number may be the kernel's answer to
    the next ``socket()`` or ``accept()``. A task still holding the old socket object
    must get ``ClosedResourceError``, never read from or write to the new connection."""
    async with tcp_pair() as (old_ours, old_peer):
        old = old_ours.socket
        old_fd = old.fileno()
        # Used as a session uses it, both ways, before it is closed.
        await write(old, b"ping")
        await old_peer.send_all(b"pong")
        with trio.fail_after(10):
            assert await old_peer.receive_some(100) == b"ping"
            assert await read(old, 100) == b"pong"
        await old_ours.aclose()
        async with tcp_pair() as (ours, peer):
            dup = None
            holders = [s for s in (ours, peer) if s.socket.fileno() == old_fd]
            if holders:
                reused, partner = holders[0], (peer if holders[0] is ours else ours)
            else:
                # Not reused by chance: make it so by duplicating the new connection's
                # descriptor onto old_fd, which must be free (never clobber another).
                with pytest.raises(OSError):
                    os.fstat(old_fd)
                dup = os.dup2(ours.socket.fileno(), old_fd)
                reused, partner = ours, peer
            try:
                # Something for whoever reads old_fd to steal, and a channel to spy on.
                await partner.send_all(b"for the new connection")
                with trio.fail_after(10):
                    await trio.lowlevel.wait_readable(reused.socket)
                with pytest.raises(trio.ClosedResourceError):
                    await read(old, 100)
                with pytest.raises(trio.ClosedResourceError):
                    await write(old, b"stale bytes")
            finally:
                if dup is not None:
                    os.close(dup)
            with trio.fail_after(10):
                assert await reused.receive_some(100) == b"for the new connection"
            assert await read_available(partner) == b""  # no stale bytes arrived


# -- a peer that resets the connection -------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="the errno a reset gives is Linux's here")
async def test_receive_after_a_peer_reset_raises_broken():
    async with tcp_pair() as (ours, peer):
        reset_by(peer)
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(ours.socket)  # the reset has arrived
            with pytest.raises(trio.BrokenResourceError) as caught:
                await read(ours.socket, 100)
        assert isinstance(caught.value.__cause__, ConnectionResetError)


@pytest.mark.skipif(sys.platform != "linux", reason="the errno a reset gives is Linux's here")
async def test_data_sent_before_a_reset_is_read_then_the_reset_is_broken():
    async with tcp_pair() as (ours, peer):
        await peer.send_all(b"before")
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(ours.socket)
        reset_by(peer)
        with trio.fail_after(10):
            assert await read(ours.socket, 100) == b"before"
            with pytest.raises(trio.BrokenResourceError):
                await read(ours.socket, 100)


@pytest.mark.skipif(sys.platform != "linux", reason="the errno a reset gives is Linux's here")
async def test_send_after_a_peer_reset_raises_broken_every_time():
    async with tcp_pair() as (ours, peer):
        reset_by(peer)
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(ours.socket)  # the reset has arrived
        causes = []
        for _ in range(3):
            with pytest.raises(trio.BrokenResourceError) as caught:
                await write(ours.socket, b"x" * 1000)
            causes.append(caught.value.__cause__.errno)
        # The reset itself first, then a pipe broken for good: never "closed", since
        # the socket is still open on our side.
        assert causes[0] in (errno.ECONNRESET, errno.EPIPE)
        assert set(causes[1:]) <= {errno.ECONNRESET, errno.EPIPE}


async def test_a_reset_while_send_waits_for_room_raises_broken():
    payload = b"y" * (8 * MiB)
    async with tcp_pair(ours_sndbuf=SMALL_BUFFER, peer_rcvbuf=SMALL_BUFFER) as (ours, peer):
        outcome = []

        async def writer():
            with pytest.raises(trio.BrokenResourceError):
                await write(ours.socket, payload)
            outcome.append("broken")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.testing.wait_all_tasks_blocked()
                assert outcome == []
                reset_by(peer)
        assert outcome == ["broken"]
