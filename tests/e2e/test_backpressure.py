"""Backpressure: a client that pipelines requests and never reads costs bounded memory.

The server reads a connection only when the replies to what it read are written: a
reply that cannot be written (the client's window is full) blocks the session before
it reads more. So a client pushing 200 MiB of pipelined requests without reading a
byte soon finds its own sends blocked, and the server's memory grows by what one
packet, one read and one batch of held replies (``HOLD_LIMIT``) take, whatever the
client sends. That server is a subprocess here, so its resident memory (``VmRSS``)
is measured as the operating system sees it. Other clients are served meanwhile.

Such a session never waits for bytes, so the idle timeout alone would never end it;
the reaper also closes a session whose reply made no progress for ``timeout``
seconds: a client that stops reading cannot hold its connection forever.
"""

from __future__ import annotations

import logging

import pytest
import trio

from asyncapy.transport import HOLD_LIMIT

from ..conftest import serving
from .hostile_app import launch, rss_bytes
from .wire import Wire, json_packet

MiB = 1 << 20
TOTAL = 200 * MiB
"""What the hog tries to send."""
STALL = 1.0
"""Seconds a send must stay blocked to count as the server no longer reading."""


def chunk_of(packet_size: int) -> bytes:
    """About 64 KiB of pipelined JSON packets of about ``packet_size`` bytes each."""
    packet = json_packet({"d": "x" * (packet_size - 14)})
    return packet * max(1, 65536 // len(packet))


async def push_until_blocked(stream: trio.SocketStream, chunk: bytes) -> int:
    """Send ``chunk`` again and again, reading nothing, until :data:`TOTAL` bytes are
    sent or a send stays blocked :data:`STALL` seconds; the bytes sent."""
    sent = 0
    while sent < TOTAL:
        with trio.move_on_after(STALL) as blocked:
            await stream.send_all(chunk)
        if blocked.cancelled_caught:
            break
        sent += len(chunk)
    return sent


@pytest.mark.parametrize("packet_size", [64 * 1024, 256], ids=["64KiB-packets", "256B-packets"])
async def test_a_client_that_never_reads_cannot_grow_the_server_and_others_are_served(packet_size):
    with trio.fail_after(30):
        running, port = launch(timeout=30, buf=65536)
        with running:
            async with await Wire.connect("127.0.0.1", port) as normal:
                assert await normal.request({"warm": "up"}) == {"warm": "up"}
                before = rss_bytes(running.process.pid)
                hog = await trio.open_tcp_stream("127.0.0.1", port)
                try:
                    sent = await push_until_blocked(hog, chunk_of(packet_size))
                    # The server stopped reading long before the 200 MiB: what went
                    # through fits in the kernel's socket buffers and the server's
                    # bounded ones.
                    assert sent < TOTAL // 2, f"{sent / MiB:.0f} MiB sent: the server kept reading"
                    await trio.sleep(0.3)  # let it settle where it is blocked
                    growth = rss_bytes(running.process.pid) - before
                    assert growth < 64 * MiB, f"server RSS grew {growth / MiB:.1f} MiB"
                    # Another client, meanwhile: answered within a second.
                    asked = trio.current_time()
                    assert await normal.request({"still": "served"}) == {"still": "served"}
                    assert trio.current_time() - asked < 1.0
                finally:
                    await trio.aclose_forcefully(hog)
                assert await normal.request({"after": "hog"}) == {"after": "hog"}
            assert running.stop() == 0, running.output
    assert "Traceback" not in running.output


async def test_the_session_of_a_client_that_never_reads_pauses_with_bounded_buffers(make_echo):
    """Seen from inside: the blocked session is writing, not reading; its held replies
    stay under HOLD_LIMIT and its unparsed input under one read plus one packet."""
    server = make_echo(timeout=30, buf=65536)
    packet = json_packet({"d": "x" * 200})
    async with serving(server) as (host, port):
        hog = await trio.open_tcp_stream(host, port)
        try:
            sent = await push_until_blocked(hog, packet * (65536 // len(packet)))
            assert sent < TOTAL // 2
            [session] = server._sessions.live.values()
            channel = session.client._channel
            assert channel.writing  # paused on a write...
            assert not server._sessions.states[str(session.session_id)].waiting  # ...not reading
            assert len(channel._pending) < HOLD_LIMIT
            assert session.client._connection.framer.buffered <= server.buf + len(packet)
        finally:
            await trio.aclose_forcefully(hog)


async def test_a_client_that_stops_reading_is_closed_after_timeout(make_echo, caplog):
    """Its session never waits for bytes, so only the write side can time it out."""
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_echo(timeout=1, buf=65536)
    async with serving(server) as (host, port):
        hog = await trio.open_tcp_stream(host, port)
        try:
            started = trio.current_time()
            with trio.fail_after(5):
                with pytest.raises(trio.BrokenResourceError):
                    while True:  # blocked, until the server closes the connection
                        await hog.send_all(chunk_of(64 * 1024))
            assert trio.current_time() - started > 1  # not before the timeout
        finally:
            await trio.aclose_forcefully(hog)
        async with await Wire.connect(host, port) as normal:
            assert await normal.request({"n": 1}) == {"n": 1}
        with trio.fail_after(2):
            while server._sessions.live:
                await trio.sleep(0.05)
    assert any("read no reply for 1s" in r.getMessage() for r in caplog.records)
