"""Fair share per client: what one client address cannot take from the others.

Each test is an attack from docs/security.md made again on loopback, against a real
server: one address (127.0.0.1) attacks, another (127.0.0.2) must still be served.
"""

from __future__ import annotations

import logging
import ssl

import trio

from asyncapy.session_state import SESSION_LINES_PER_SECOND, SHARED_LINES_PER_SECOND

from ..conftest import serving
from .wire import Wire, settle


async def served_over_tls(host: str, port: int, cafile: str, source: str = "127.0.0.2") -> bool:
    context = ssl.create_default_context(cafile=cafile)
    try:
        with trio.fail_after(5):
            wire = await Wire.connect_from(source, host, port)
            tls = Wire(trio.SSLStream(wire.stream, context, server_hostname="127.0.0.1"))
            try:
                return await tls.request({"served": True}) == {"served": True}
            finally:
                await tls.aclose()
    except (trio.TooSlowError, trio.BrokenResourceError, OSError):
        return False


async def stall(host: str, port: int, count: int) -> list[Wire]:
    """``count`` TCP connections from 127.0.0.1 that never send a ClientHello."""
    return [await Wire.connect(host, port) for _ in range(count)]


async def test_handshakes_that_never_start_leave_other_addresses_served(make_echo, tls_files):
    """200 connections from one address that never send a ClientHello, against
    max_connections=200 and session_limit=2: before, every slot was taken until
    `timeout` and another address was served 0 of 16 times."""
    server = make_echo(
        certfile=tls_files["certfile"], keyfile=tls_files["keyfile"], session_limit=2, max_connections=200
    )
    async with serving(server) as (host, port):
        stalled = await stall(host, port, 200)
        await settle()
        assert server._listening.handshaking == {"127.0.0.1": 2}
        assert server._listening.connections <= 2  # the refused gave their slots back
        results = [await served_over_tls(host, port, tls_files["cafile"]) for _ in range(16)]
        assert results == [True] * 16
        for wire in stalled:
            await wire.aclose()


async def test_without_a_session_limit_handshake_limit_is_the_share(make_echo, tls_files):
    server = make_echo(
        certfile=tls_files["certfile"], keyfile=tls_files["keyfile"], max_connections=64, handshake_limit=4,
        metrics_port=0,
    )
    async with serving(server) as (host, port):
        stalled = await stall(host, port, 64)
        await settle()
        assert server._listening.handshaking == {"127.0.0.1": 4}
        assert all([await served_over_tls(host, port, tls_files["cafile"]) for _ in range(16)])
        assert server.metrics_recorder.snapshot().connections["refused_handshakes"] >= 60 - 4
        for wire in stalled:
            await wire.aclose()


async def test_a_handshake_has_a_deadline_shorter_than_timeout(make_echo, tls_files, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_echo(certfile=tls_files["certfile"], keyfile=tls_files["keyfile"], timeout=60, handshake_timeout=0.3)
    async with serving(server) as (host, port):
        [wire] = await stall(host, port, 1)
        started = trio.current_time()
        await wire.read_eof(timeout=5)
        assert trio.current_time() - started < 3  # not timeout's 60 s
        await wire.aclose()
    assert any("not finished within handshake_timeout (0.3s)" in r.getMessage() for r in caplog.records)


class Measure(logging.Handler):
    """The bytes the server's log lines take, formatted as the console handler would."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("[%(levelname)s] %(asctime)s %(message)s"))
        self.size = 0
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.size += len(self.format(record)) + 1
        self.lines += 1


async def test_connections_with_bad_headers_cannot_flood_the_log(make_echo):
    """One client opening connection after connection, each with a bad header: before,
    2.6-3.1 MiB of log in 5 s. The limits all sessions share bound it: the
    session lines at SESSION_LINES_PER_SECOND each, the warnings at
    SHARED_LINES_PER_SECOND, whatever the connection rate."""
    measure = Measure()
    logging.getLogger("asyncapy").addHandler(measure)
    logging.getLogger("asyncapy").setLevel(logging.INFO)
    seconds = 2.0
    try:
        server = make_echo()
        async with serving(server) as (host, port):
            bad = b"\x00\x00\x00\x05\x15\x00abc"  # protocol version 21
            connections = 0
            with trio.move_on_after(seconds):
                while True:
                    wire = await Wire.connect(host, port)
                    await wire.send(bad)
                    await wire.read_packet()
                    await wire.aclose()
                    connections += 1
            async with await Wire.connect_from("127.0.0.2", host, port) as other:
                assert await other.request({"still": "served"}) == {"still": "served"}
    finally:
        logging.getLogger("asyncapy").removeHandler(measure)
    # Three lines a connection without the limits; the bound holds however fast the
    # connections came (each window of a second lets its share through, plus the
    # counts' lines and the start and stop lines).
    windows = seconds + 2
    bound_lines = windows * (2 * SESSION_LINES_PER_SECOND + 3 * SHARED_LINES_PER_SECOND) + 20
    assert measure.lines <= bound_lines, (measure.lines, connections)
    assert measure.size <= 100 * bound_lines
    assert connections > 50  # the attack did run
    print(f"{connections} connections in {seconds}s: {measure.lines} lines, {measure.size} bytes of log")


# -- the packet memory budget: charged as bytes arrive, shared per address ---------------------
MiB = 1 << 20


def json_frame(obj: dict) -> bytes:
    from .wire import json_packet

    return json_packet(obj)


async def served_100kb_packets(host: str, port: int, count: int = 20) -> int:
    """How many of ``count`` 100 KB packets from 127.0.0.2 came back whole."""
    packet = json_frame({"pad": "z" * 100_000})
    served = 0
    for _ in range(count):
        wire = await Wire.connect_from("127.0.0.2", host, port)
        try:
            await wire.send(packet)
            if await wire.read_packet() == packet:
                served += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, AssertionError):
            pass
        finally:
            await wire.aclose()
    return served


async def test_headers_alone_cannot_drain_the_packet_memory_budget(make_echo):
    """Before: 53 connections each sending the 6 bytes of a header declaring a 1 MiB
    packet reserved 255.9 MiB of the 256 MiB budget, and another address's 100 KB
    packets were refused 20 of 20 times."""
    server = make_echo(buf=65536)
    memory = server._sessions.packet_memory
    header = json_frame({"blob": "x" * (MiB - 20)})[:6]
    async with serving(server) as (host, port):
        attackers = [await Wire.connect(host, port) for _ in range(60)]
        for wire in attackers:
            await wire.send(header)
        await settle()
        assert memory.used < MiB  # six bytes each, not 5 MiB each
        assert await served_100kb_packets(host, port) == 20
        for wire in attackers:
            await wire.aclose()


async def test_half_sent_large_packets_hold_at_most_their_addresss_share(make_echo):
    """An address sending half of each of 100 one-MiB packets and stalling keeps a
    quarter of the budget; another address's 100 KB packets are served."""
    server = make_echo(buf=65536)
    memory = server._sessions.packet_memory
    half = json_frame({"blob": "x" * (MiB - 20)})[: MiB // 2]
    async with serving(server) as (host, port):
        attackers = [await Wire.connect(host, port) for _ in range(100)]
        for wire in attackers:
            with trio.move_on_after(2):  # a refused one is closed: its send may fail
                try:
                    await wire.send(half)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        await settle()
        assert memory.used <= memory.limit * memory.share
        assert memory.owner_refusals > 0
        assert await served_100kb_packets(host, port) >= 18  # at least 90%
        for wire in attackers:
            await wire.aclose()


async def test_a_large_packets_body_has_a_deadline_of_its_own(make_echo):
    """A large packet charged to the budget must arrive whole within
    large_packet_timeout of its first bytes, whatever the session's timeout: a stalled
    body gives back what it holds in seconds, not minutes."""
    server = make_echo(buf=65536, timeout=60, large_packet_timeout=0.5)
    memory = server._sessions.packet_memory
    packet = json_frame({"pad": "z" * 100_000})
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(packet[: len(packet) // 2])
            await settle()
            assert memory.used > 0
            started = trio.current_time()
            assert await wire.read_json(timeout=5) == {"status": "failure", "error": "ERR_TIMED_OUT"}
            assert trio.current_time() - started < 3
        await settle()
        assert memory.used == 0
        async with await Wire.connect(host, port) as small:  # small packets: timeout only
            await small.send(json_frame({"a": 1})[:5])
            await small.assert_silent(1.0)
            await small.send(json_frame({"a": 1})[5:])
            assert await small.read_json() == {"a": 1}
        async with await Wire.connect(host, port) as whole:  # a large packet in time: served
            await whole.send(packet)
            assert await whole.read_packet() == packet
