"""The bundled clients against a real server.

The blocking :class:`asyncapy.client.Client` runs in a worker thread
(``trio.to_thread.run_sync``) while the server runs in the test's trio loop; the
:class:`asyncapy.client.AsyncClient` runs in the loop itself.
"""

from __future__ import annotations

import socket

import pytest
import trio

from asyncapy import Filters
from asyncapy.client import AsyncClient, Client, ProtocolViolation
from tests.conftest import serving

from .wire import frame, json_bytes, json_error, json_packet, zi_packet


def in_thread(function):
    return trio.to_thread.run_sync(function)


@pytest.fixture
def closing_echo(make_server):
    """An echo server that closes the session after answering ``{"bye": ...}``."""

    def make(**kwargs):
        server = make_server(**kwargs)

        @server.add_handler(Filters.Fields(bye=None))
        async def bye(client, packet):
            await client.send(packet, close=True)

        @server.add_handler(Filters.Fields(silent=None))
        async def silent(client, packet):
            pass

        @server.add_handler()
        async def echo(client, packet):
            await client.send(packet)

        return server

    return make


# -- the blocking client --------------------------------------------------------------------
async def test_blocking_client_send_receive_request(closing_echo):
    async with serving(closing_echo()) as (host, port):

        def talk():
            with Client(tls=False, timeout=5) as client:
                client.connect(host, port)
                assert isinstance(client.sock, socket.socket)
                client.send({"as": "dict"})
                assert client.receive() == {"as": "dict"}
                client.send('{"as": "json string"}')
                assert client.receive() == {"as": "json string"}
                assert client.request({"n": 1, "list": [1, 2.5, None, True]}) == {
                    "n": 1,
                    "list": [1, 2.5, None, True],
                }
                for n in range(20):  # one session, many packets
                    assert client.request({"n": n}) == {"n": n}
                sock = client.sock
            assert client.sock is None  # the context manager disconnected
            assert sock.fileno() == -1

        await in_thread(talk)


async def test_blocking_client_receive_raw_and_split_packet(closing_echo):
    async with serving(closing_echo()) as (host, port):

        def talk():
            with Client(tls=False, timeout=5) as client:
                client.connect(host, port)
                client.send({"raw": "bytes"})
                raw = client.receive_raw()
                assert raw == json_packet({"raw": "bytes"})
                payload = json_bytes({"raw": "bytes"})
                assert client._split_packet(raw) == (len(payload) + 2, 22, 0, payload)

                client.send({"bye": 1})
                assert client.receive_raw() == json_packet({"bye": 1})
                assert client.receive_raw() == b""  # the server closed
                with pytest.raises(ConnectionError):
                    client.receive()

        await in_thread(talk)


async def test_blocking_client_receives_error_replies(closing_echo):
    async with serving(closing_echo()) as (host, port):

        def talk():
            with Client(tls=False, timeout=5) as client:
                client.connect(host, port)
                client.sock.sendall(frame(b"{oops", 0))
                assert client.receive_raw() == json_error("ERR_REQUEST_MALFORMED")
                client.sock.sendall(frame(b"{}", 5))
                assert client.receive() == {"status": "failure", "error": "ERR_HEADER_INVALID"}
                assert client.request({"after": "errors"}) == {"after": "errors"}

        await in_thread(talk)


async def test_blocking_client_in_ziproto(closing_echo):
    async with serving(closing_echo()) as (host, port):

        def talk():
            with Client(tls=False, encoding="ziproto", timeout=5) as client:
                client.connect(host, port)
                client.send({"zi": "proto", "n": 300})
                raw = client.receive_raw()
                assert raw == zi_packet({"zi": "proto", "n": 300})
                assert client._split_packet(raw)[1:3] == (22, 1)
                assert client.request({"b": -1}) == {"b": -1}

        await in_thread(talk)


async def test_blocking_client_read_timeout(closing_echo):
    async with serving(closing_echo()) as (host, port):

        def talk():
            with Client(tls=False, timeout=0.3) as client:
                client.connect(host, port)
                client.send({"silent": 1})
                with pytest.raises(TimeoutError):
                    client.receive()

        await in_thread(talk)


async def test_blocking_client_refuses_bad_payloads_and_use_before_connect():
    client = Client(tls=False)
    with pytest.raises(ConnectionError):
        client.send({"a": 1})
    with pytest.raises(ValueError):
        client._packet("[1, 2]")
    with pytest.raises(ValueError):
        client._packet("{not json")
    with pytest.raises(ValueError):
        client.connect("127.0.0.1", 0)


@pytest.mark.parametrize(
    "header_size, byteorder",
    [(2, "big"), (2, "little"), (4, "little"), (8, "big"), (8, "little")],
)
async def test_blocking_client_header_layouts(closing_echo, header_size, byteorder):
    server = closing_echo(header_size=header_size, byteorder=byteorder)
    layout = dict(header_size=header_size, byteorder=byteorder)
    async with serving(server) as (host, port):

        def talk():
            with Client(tls=False, timeout=5, **layout) as client:
                client.connect(host, port)
                client.send({"layout": byteorder})
                raw = client.receive_raw()
                assert raw == json_packet({"layout": byteorder}, **layout)
                payload = json_bytes({"layout": byteorder})
                assert raw[:header_size] == (len(payload) + 2).to_bytes(header_size, byteorder)
                assert client._split_packet(raw) == (len(payload) + 2, 22, 0, payload)
                assert client.request({"n": 2}) == {"n": 2}
                # Errors are framed in the same layout.
                client.sock.sendall(frame(b"{}", 9, **layout))
                assert client.receive_raw() == json_error("ERR_HEADER_INVALID", **layout)

        await in_thread(talk)


# -- the async client -----------------------------------------------------------------------
async def test_async_client_send_receive_request(closing_echo):
    async with serving(closing_echo()) as (host, port):
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            await client.send({"as": "dict"})
            assert await client.receive() == {"as": "dict"}
            await client.send('{"as": "json string"}')
            assert await client.receive() == {"as": "json string"}
            for n in range(20):
                assert await client.request({"n": n}) == {"n": n}
            assert client.stream is not None
        assert client.stream is None


async def test_async_client_receive_raw_until_the_server_closes(closing_echo):
    async with serving(closing_echo()) as (host, port):
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            await client.send({"bye": "now"})
            raw = await client.receive_raw()
            assert raw == json_packet({"bye": "now"})
            payload = json_bytes({"bye": "now"})
            assert client._split_packet(raw) == (len(payload) + 2, 22, 0, payload)
            assert await client.receive_raw() == b""
            with pytest.raises(ConnectionError):
                await client.receive()


@pytest.mark.parametrize("header_size, byteorder", [(2, "little"), (8, "little"), (8, "big")])
async def test_async_client_header_layouts(closing_echo, header_size, byteorder):
    layout = dict(header_size=header_size, byteorder=byteorder)
    async with serving(closing_echo(**layout)) as (host, port):
        async with AsyncClient(tls=False, timeout=5, encoding="ziproto", **layout) as client:
            await client.connect(host, port)
            await client.send({"layout": byteorder})
            assert await client.receive_raw() == zi_packet({"layout": byteorder}, **layout)
            assert await client.request({"n": 8}) == {"n": 8}


async def test_async_client_read_timeout(closing_echo):
    async with serving(closing_echo()) as (host, port):
        async with AsyncClient(tls=False, timeout=0.3) as client:
            await client.connect(host, port)
            await client.send({"silent": 1})
            with pytest.raises(TimeoutError):
                await client.receive()


async def test_mismatched_layout_is_refused_not_misread(closing_echo):
    """A client speaking 8-byte headers to a 4-byte server gets an error, not an echo."""
    async with serving(closing_echo(max_packet_size=1024)) as (host, port):
        async with AsyncClient(tls=False, timeout=5, header_size=8) as client:
            await client.connect(host, port)
            await client.send({"a": 1})
            # The server reads the first 4 bytes (zeros) as Content-Length 0.
            # The client reads the 4-byte reply as an 8-byte Content-Length: unframeable.
            with pytest.raises(ProtocolViolation, match="Content-Length"):
                await client.receive()


async def test_tls_against_a_plain_server_says_to_pass_tls_false(closing_echo):
    """The clients' default (TLS) against a plain-TCP server: still an ``ssl.SSLError``
    (code that catches it keeps working), but one that says what to do."""
    import ssl

    def blocking(port):
        with Client(timeout=5) as client:
            client.connect("127.0.0.1", port)

    async with serving(closing_echo()) as (host, port):
        with pytest.raises(ssl.SSLError) as blocking_error:
            await in_thread(lambda: blocking(port))
        with pytest.raises(ssl.SSLError) as async_error:
            async with AsyncClient(timeout=5) as client:
                await client.connect(host, port)
    for error in (blocking_error.value, async_error.value):
        message = str(error)
        assert f"TLS handshake with 127.0.0.1:{port} failed" in message, message
        assert "pass tls=False" in message, message
        assert error.reason in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", None), error.reason
