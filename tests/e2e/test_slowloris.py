"""Slowloris: connections that start a packet and stall cannot starve anyone.

200 connections send the first two bytes of a header and stop (a few more trickle one
byte at a time, which must not keep them alive either). Beside them a normal client is
answered within a second (a correctness bound, generous, not a benchmark), and the
stalled ones are answered ``ERR_TIMED_OUT`` and closed by the idle timeout (``timeout=1``).
"""

from __future__ import annotations

import trio

from ..conftest import serving
from .wire import Wire, json_error, json_packet

STALLED = 200
TRICKLING = 10
TIMED_OUT = json_error("ERR_TIMED_OUT")


async def test_stalled_headers_do_not_slow_a_normal_client_and_are_timed_out(make_echo):
    server = make_echo(timeout=1)
    async with serving(server) as (host, port):
        stalled: list[Wire] = []
        try:
            for _ in range(STALLED):
                wire = await Wire.connect(host, port)
                await wire.send(b"\x00\x00")  # half a Content-Length, then nothing
                stalled.append(wire)
            opened = trio.current_time()

            async def trickle(wire: Wire) -> None:
                # A whole packet's worth of bytes, one every 0.2 s: 2 s in all, well past
                # the timeout; an incomplete packet never counts as activity.
                for byte in json_packet({"slow": "loris"}):
                    try:
                        await wire.send(bytes([byte]))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # timed out and closed: what we expect
                    await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                tricklers = [await Wire.connect(host, port) for _ in range(TRICKLING)]
                stalled.extend(tricklers)
                for wire in tricklers:
                    nursery.start_soon(trickle, wire)

                # A normal client, beside them all: answered at once, three times.
                async with await Wire.connect(host, port) as normal:
                    for n in range(3):
                        asked = trio.current_time()
                        assert await normal.request({"n": n}) == {"n": n}
                        assert trio.current_time() - asked < 1.0
                assert len(server._sessions.live) >= STALLED  # they were all still there

                # Every stalled connection is timed out: the error reply, then EOF. The
                # tricklers' too, though they keep sending: the server's close lingers,
                # so their bytes do not turn it into a reset that destroys the reply.
                async def timed_out(wire: Wire) -> None:
                    assert await wire.read_packet(timeout=4) == TIMED_OUT
                    await wire.read_eof(timeout=2)
                    await wire.aclose()

                async with trio.open_nursery() as readers:
                    for wire in stalled:
                        readers.start_soon(timed_out, wire)
                assert trio.current_time() - opened < 4
                nursery.cancel_scope.cancel()
            with trio.fail_after(2):
                while server._sessions.live:
                    await trio.sleep(0.05)
        finally:
            for wire in stalled:
                await wire.aclose()
