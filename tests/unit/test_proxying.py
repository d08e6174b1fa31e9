"""asyncapy.proxying: the PROXY header read byte-exactly off a socket (MSG_PEEK), its
deadline, and the gate's trust and logging, over a real socket pair.

The header is read byte-exactly so that what follows it (a request, a TLS
ClientHello) is still in the socket for the session's direct reads or the TLS layer:
each test checks the bytes after the header are read, whole and in order, from the
socket itself.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.lowlevel

from asyncapy.domain.proxy import DEFAULT_MAX_LENGTH, ProxyError, ProxyHeader, TrustedProxies
from asyncapy.proxying import GONE, PROXY_HEADER_SECONDS, ProxyGate, header_deadline, read_proxy_header
from tests.unit.test_proxy import inet, v2

V1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 8081\r\n"
V2 = v2(block=inet("2001:db8::7", "::1", 40000, 8081), family=2)
STREAM = b"\x00\x00\x00\x10\x16\x00" + b'{"foo": "bar"}'


async def rest_of(sock: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await sock.recv(size - len(data))
        assert chunk
        data += chunk
    return data


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
async def test_the_header_is_consumed_and_nothing_else_at_every_split(header):
    data = header + STREAM
    for cut in range(1, len(header) + 1):
        a, b = trio.socket.socketpair()
        with a, b:
            await b.send(data[:cut])

            async def rest():
                await trio.sleep(0.001)
                await b.send(data[cut:])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(rest)
                event = await read_proxy_header(a)
            assert type(event) is ProxyHeader, (cut, event)
            assert event.source in ("198.51.100.7", "2001:db8::7") and event.source_port == 40000
            assert event.leftover == b""
            assert await rest_of(a, len(STREAM)) == STREAM  # untouched, in the socket


async def test_a_header_trickled_byte_by_byte_then_the_stream():
    a, b = trio.socket.socketpair()
    with a, b:

        async def trickle():
            for byte in V2:
                await b.send(bytes([byte]))
                await trio.lowlevel.checkpoint()
            await b.send(STREAM)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            event = await read_proxy_header(a)
        assert type(event) is ProxyHeader and event.source == "2001:db8::7"
        assert await rest_of(a, len(STREAM)) == STREAM


async def test_no_header_a_bad_one_and_a_cut_one_are_errors():
    cases = [
        (STREAM, False, "does not start with a PROXY header"),
        (b"PROXY TCP4 1.2.3 127.0.0.1 1 2\r\n", False, "not a valid IPv4 address"),
        (V2[:20], True, "closed the connection after 20 bytes"),
        (b"", True, "before sending anything"),
    ]
    for data, close, reason in cases:
        a, b = trio.socket.socketpair()
        with a:
            if data:
                await b.send(data)
            if close:
                b.close()
            event = await read_proxy_header(a)
            b.close()
        assert type(event) is ProxyError and reason in event.reason, (data, event)


async def test_an_oversized_header_is_refused_from_its_length_without_reading_it():
    a, b = trio.socket.socketpair()
    with a, b:
        huge = v2(block=inet("198.51.100.7", "127.0.0.1", 1, 2) + b"\x00" * 60000)
        await b.send(huge[:4000])
        event = await read_proxy_header(a)
        assert type(event) is ProxyError and f"at most {DEFAULT_MAX_LENGTH}" in event.reason


def test_the_header_deadline_is_short_and_within_timeout():
    assert header_deadline(60) == PROXY_HEADER_SECONDS == 5.0
    assert header_deadline(0.5) == 0.5


async def test_the_gate_logs_untrusted_peers_once_a_second_with_the_count(caplog):
    gate = ProxyGate(TrustedProxies("127.0.0.2, 10.0.0.0/8"), 60)
    caplog.set_level(logging.WARNING, "asyncapy.server")
    assert gate.trusts("127.0.0.2") and gate.trusts("10.1.2.3")
    assert not caplog.records
    for _ in range(5):
        assert not gate.trusts("127.0.0.3")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "refused a connection from 127.0.0.3, not a trusted proxy (trusted_proxies: 127.0.0.2, 10.0.0.0/8)" in lines[0]
    gate.report()
    assert "4 more connection(s) from untrusted peers refused" in caplog.records[-1].getMessage()


async def test_the_gate_gives_the_headers_client_or_unknown_for_local():
    gate = ProxyGate(TrustedProxies("127.0.0.2"), 60)
    cases = [
        (V1, "198.51.100.7"),
        (V2, "2001:db8::7"),
        (v2(block=inet("::ffff:198.51.100.8", "::1", 1, 2), family=2), "198.51.100.8"),  # mapped: as IPv4
        (v2(command=0, family=0, transport=0), "unknown"),  # LOCAL: no client, not the proxy
        (b"PROXY UNKNOWN\r\n", "unknown"),
        (b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n", None),
    ]
    for data, expected in cases:
        a, b = trio.socket.socketpair()
        with a, b:
            await b.send(data + STREAM)
            assert await gate.client_address(trio.SocketStream(a), "127.0.0.2") == expected, data


async def test_a_trickling_header_is_given_up_at_the_deadline(autojump_clock, caplog):
    gate = ProxyGate(TrustedProxies("127.0.0.2"), 2)
    a, b = trio.socket.socketpair()
    with a, b:
        await b.send(V1[:10])
        start = trio.current_time()
        assert await gate.client_address(trio.SocketStream(a), "127.0.0.2") is None
        assert trio.current_time() - start == pytest.approx(2)
    assert "closed a connection from proxy 127.0.0.2: no complete PROXY header within 2s" in caplog.text


async def test_a_connection_closed_before_its_first_byte_is_gone_quietly(caplog):
    caplog.set_level(logging.DEBUG, "asyncapy.server")
    gate = ProxyGate(TrustedProxies("127.0.0.2"), 60)
    a, b = trio.socket.socketpair()
    with a:
        b.close()
        assert await read_proxy_header(a) is GONE
    a, b = trio.socket.socketpair()
    with a:
        b.close()
        assert await gate.client_address(trio.SocketStream(a), "127.0.0.2") is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "127.0.0.2 closed the connection before sending anything" in caplog.text
