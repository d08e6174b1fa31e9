"""Every row of the protocol's error table, over a real socket.

Each test writes raw bytes, asserts the exact bytes of the error reply (payload and
encoding) and whether the session then goes on (a valid packet is still echoed) or is
closed (EOF). The encoding rule is checked too: the offending packet's declared encoding
when it is valid, else the session's, else JSON (or the server's ``encoding`` setting).
"""

from __future__ import annotations

import logging
import socket

import pytest
import trio

from asyncapy import Filter
from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.errors import StoreUnavailable
from tests.conftest import serving

from .wire import (
    JSON_CODE,
    ZIPROTO_CODE,
    Wire,
    frame,
    json_error,
    json_packet,
    settle,
    zi_error,
    zi_packet,
)

MALFORMED = "ERR_REQUEST_MALFORMED"
HEADER = "ERR_HEADER_INVALID"


async def assert_still_serving(wire: Wire, encoding: str = "json") -> None:
    """The session goes on: a valid JSON packet is echoed (in the session's encoding)."""
    await wire.send(json_packet({"still": "here"}))
    expected = json_packet if encoding == "json" else zi_packet
    assert await wire.read_packet() == expected({"still": "here"})


async def start_ziproto_session(wire: Wire) -> None:
    await wire.send(zi_packet({"first": 1}))
    assert await wire.read_packet() == zi_packet({"first": 1})


# -- ERR_REQUEST_MALFORMED: session continues -------------------------------------------
@pytest.mark.parametrize(
    "packet, reply",
    [
        pytest.param(frame(b'{"a": ', JSON_CODE), json_error(MALFORMED), id="undecodable-json"),
        pytest.param(frame(b'{"a": "\xff"}', JSON_CODE), json_error(MALFORMED), id="json-not-utf8"),
        pytest.param(frame(b"\xc1", ZIPROTO_CODE), zi_error(MALFORMED), id="undecodable-ziproto"),
        pytest.param(frame(b"\x81\xa1a", ZIPROTO_CODE), zi_error(MALFORMED), id="truncated-ziproto"),
        pytest.param(frame(b"[1, 2]", JSON_CODE), json_error(MALFORMED), id="json-array"),
        pytest.param(frame(b'"text"', JSON_CODE), json_error(MALFORMED), id="json-string"),
        pytest.param(frame(b"\x92\x01\x02", ZIPROTO_CODE), zi_error(MALFORMED), id="ziproto-array"),
        pytest.param(frame(b"\x2a", ZIPROTO_CODE), zi_error(MALFORMED), id="ziproto-int"),
        pytest.param(frame(b"", JSON_CODE), json_error(MALFORMED), id="empty-json"),
        pytest.param(frame(b"", ZIPROTO_CODE), zi_error(MALFORMED), id="empty-ziproto"),
    ],
)
async def test_malformed_payload_is_answered_and_session_continues(make_echo, packet, reply):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(packet)
            assert await wire.read_packet() == reply
            # An invalid packet does not fix the session's encoding: JSON stays JSON.
            await assert_still_serving(wire, "json")


async def test_malformed_reply_uses_the_declared_encoding_not_the_sessions(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await start_ziproto_session(wire)
            await wire.send(frame(b"{nope", JSON_CODE))
            assert await wire.read_packet() == json_error(MALFORMED)
            await wire.send(frame(b"", JSON_CODE))
            assert await wire.read_packet() == json_error(MALFORMED)
            await assert_still_serving(wire, "ziproto")


# -- ERR_HEADER_INVALID: session continues ----------------------------------------------
@pytest.mark.parametrize(
    "packet, reply",
    [
        pytest.param(frame(b'{"a": 1}', JSON_CODE, 21), json_error(HEADER), id="version-21-json"),
        pytest.param(frame(b"\x80", ZIPROTO_CODE, 23), zi_error(HEADER), id="version-23-ziproto"),
        pytest.param(frame(b'{"a": 1}', JSON_CODE, 0), json_error(HEADER), id="version-0"),
        pytest.param(frame(b'{"a": 1}', 7), json_error(HEADER), id="encoding-7"),
        pytest.param(frame(b"\x80", 2, 0), json_error(HEADER), id="both-invalid"),
    ],
)
async def test_invalid_header_is_answered_and_session_continues(make_echo, packet, reply):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(packet)
            assert await wire.read_packet() == reply
            await assert_still_serving(wire, "json")


async def test_invalid_encoding_is_answered_in_the_sessions_encoding(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await start_ziproto_session(wire)
            await wire.send(frame(b'{"a": 1}', 7))
            assert await wire.read_packet() == zi_error(HEADER)
            await wire.send(frame(b'{"a": 1}', 255, 99))
            assert await wire.read_packet() == zi_error(HEADER)
            await assert_still_serving(wire, "ziproto")


async def test_invalid_encoding_before_any_valid_packet_uses_the_encoding_setting(make_echo):
    async with serving(make_echo(encoding="ziproto")) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(frame(b'{"a": 1}', 7))
            assert await wire.read_packet() == zi_error(HEADER)
            # The setting is only a fallback for replies: the first valid packet, JSON,
            # still fixes the session's encoding.
            await wire.send(json_packet({"a": 1}))
            assert await wire.read_packet() == json_packet({"a": 1})
            await wire.send(frame(b'{"a": 1}', 7))
            assert await wire.read_packet() == json_error(HEADER)


async def test_invalid_packets_do_not_fix_the_session_encoding(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(frame(b"\xc1", ZIPROTO_CODE))  # malformed, declared ZiProto
            assert await wire.read_packet() == zi_error(MALFORMED)
            await wire.send(frame(b"{}", 9))  # no encoding known yet: JSON
            assert await wire.read_packet() == json_error(HEADER)
            await start_ziproto_session(wire)
            await wire.send(frame(b"{}", 9))
            assert await wire.read_packet() == zi_error(HEADER)


# -- ERR_TIMED_OUT: session closed --------------------------------------------------------
async def test_idle_session_is_timed_out_then_closed(make_echo):
    async with serving(make_echo(timeout=0.5)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.read_packet() == json_error("ERR_TIMED_OUT")
            await wire.read_eof()


async def test_timeout_reply_is_in_the_sessions_encoding(make_echo):
    async with serving(make_echo(timeout=0.5)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await start_ziproto_session(wire)
            assert await wire.read_packet() == zi_error("ERR_TIMED_OUT")
            await wire.read_eof()


async def test_timeout_reply_before_any_packet_uses_the_encoding_setting(make_echo):
    async with serving(make_echo(timeout=0.5, encoding="ziproto")) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.read_packet() == zi_error("ERR_TIMED_OUT")
            await wire.read_eof()


async def test_complete_packets_keep_the_session_alive(make_echo):
    async with serving(make_echo(timeout=0.5)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            for n in range(5):  # 5 x 0.2 s > timeout, each gap < timeout
                await trio.sleep(0.2)
                await wire.send(json_packet({"n": n}))
                assert await wire.read_packet() == json_packet({"n": n})
            assert await wire.read_packet() == json_error("ERR_TIMED_OUT")
            await wire.read_eof()


async def test_trickled_bytes_of_an_unfinished_packet_do_not_keep_the_session_alive(make_echo):
    """A byte every 50 ms for up to 4 s: the 0.5 s timeout must strike while trickling."""
    async with serving(make_echo(timeout=0.5)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            never_complete = json_packet({"x": "y" * 200})
            replied = trio.Event()
            sent = 0

            async def trickle() -> None:
                nonlocal sent
                for byte in never_complete[:80]:
                    if replied.is_set():
                        return
                    try:
                        await wire.send(bytes([byte]))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    sent += 1
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                reply = await wire.read_packet(timeout=10)
                replied.set()
            assert reply == json_error("ERR_TIMED_OUT")
            assert sent < 80, "the session outlived the whole trickle: partial bytes kept it alive"
            await wire.read_eof()


async def test_a_slow_handler_does_not_eat_the_next_idle_period(make_server):
    """The idle clock restarts once a packet has been handled: a handler slower than
    ``timeout`` must not make the very next read time out at once."""
    server = make_server(timeout=0.5)

    @server.add_handler()
    async def slow(client, packet):
        await trio.sleep(0.7)
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"n": 1}))
            assert await wire.read_packet() == json_packet({"n": 1})
            await trio.sleep(0.1)
            await wire.send(json_packet({"n": 2}))
            assert await wire.read_packet() == json_packet({"n": 2})


# -- ERR_SESSION_LIMIT_REACHED: closed, lingering -------------------------------------------
async def test_session_limit_refuses_the_third_connection(make_echo):
    async with serving(make_echo(session_limit=2)) as (host, port):
        first = await Wire.connect(host, port)
        second = await Wire.connect(host, port)
        assert await first.request({"n": 1}) == {"n": 1}
        assert await second.request({"n": 2}) == {"n": 2}

        async with await Wire.connect(host, port) as third:
            assert await third.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
            await third.read_eof()

        # The two admitted sessions are untouched.
        assert await first.request({"n": 3}) == {"n": 3}
        assert await second.request({"n": 4}) == {"n": 4}

        # Once one of them ends, a new connection is admitted.
        await first.aclose()
        await settle()
        async with await Wire.connect(host, port) as fourth:
            assert await fourth.request({"n": 5}) == {"n": 5}
        await second.aclose()


async def test_session_limit_reply_reaches_a_client_that_already_wrote(make_echo):
    """Lingering close: the refused client's request is drained, not answered by a
    reset that would destroy the reply. The reply is JSON even for a ZiProto request."""
    async with serving(make_echo(session_limit=1)) as (host, port):
        async with await Wire.connect(host, port) as first:
            assert await first.request({"n": 1}) == {"n": 1}
            # A blocking connect and write, without yielding to trio: the request is in
            # the server's socket buffer before the server even accepts the connection.
            raw = socket.create_connection((host, port))
            raw.sendall(zi_packet({"please": "serve me"}) * 50)
            async with Wire(trio.SocketStream(trio.socket.from_stdlib_socket(raw))) as refused:
                # Give the server every chance to reply and close before we read.
                await settle()
                await trio.sleep(0.1)
                assert await refused.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
                await refused.read_eof()
            assert await first.request({"n": 2}) == {"n": 2}


# -- ERR_UNAVAILABLE: closed, lingering --------------------------------------------------
class FlakyStore(MemorySessionStore):
    """A session store whose backend is down for the first ``failures`` admissions."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def admit(self, record, limit):
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("backend down")
        return await super().admit(record, limit)


async def test_unreachable_store_refuses_the_session_in_json(make_echo, caplog):
    store = FlakyStore(failures=1)
    async with serving(make_echo(store=store, encoding="ziproto")) as (host, port):
        raw = socket.create_connection((host, port))
        raw.sendall(zi_packet({"a": 1}) * 20)  # written before the server even accepts
        async with Wire(trio.SocketStream(trio.socket.from_stdlib_socket(raw))) as refused:
            await settle()
            assert await refused.read_packet() == json_error("ERR_UNAVAILABLE")
            await refused.read_eof()
        # The store is back: the next connection is served.
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"b": 2}) == {"b": 2}
    assert any(r.levelno >= logging.ERROR and "unavailable" in r.getMessage() for r in caplog.records)


# -- ERR_PACKET_TOO_LARGE: closed ---------------------------------------------------------
async def test_packet_too_large_is_refused_from_the_header_then_closed(make_echo):
    async with serving(make_echo(max_packet_size=64)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            fits = json_packet({"x": "y" * 53})
            assert len(fits) - 4 == 64
            await wire.send(fits)
            assert await wire.read_packet() == fits
            # Only the header of the large packet is sent: the reply needs no payload.
            await wire.send((65).to_bytes(4, "big"))
            assert await wire.read_packet() == json_error("ERR_PACKET_TOO_LARGE")
            await wire.read_eof()


async def test_packet_too_large_reply_reaches_a_client_that_sent_the_body(make_echo):
    """Lingering close after a framing error: the body the client already wrote is
    drained, so the reply is not destroyed by a connection reset."""
    async with serving(make_echo(max_packet_size=64)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"x": "y" * 200_000}))
            await settle()
            await trio.sleep(0.1)
            assert await wire.read_packet() == json_error("ERR_PACKET_TOO_LARGE")
            await wire.read_eof()


async def test_packet_too_large_reply_is_in_the_sessions_encoding(make_echo):
    async with serving(make_echo(max_packet_size=64)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await start_ziproto_session(wire)
            await wire.send((2**32 - 1).to_bytes(4, "big"))
            assert await wire.read_packet() == zi_error("ERR_PACKET_TOO_LARGE")
            await wire.read_eof()


# -- Content-Length below 2: ERR_REQUEST_MALFORMED, closed ---------------------------------
@pytest.mark.parametrize("length", [0, 1])
async def test_content_length_below_two_is_malformed_then_closed(make_echo, length):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(length.to_bytes(4, "big") + b"\x16"[:length])
            assert await wire.read_packet() == json_error(MALFORMED)
            await wire.read_eof()


async def test_content_length_below_two_reply_is_in_the_sessions_encoding(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await start_ziproto_session(wire)
            await wire.send(b"\x00\x00\x00\x01\x16")
            assert await wire.read_packet() == zi_error(MALFORMED)
            await wire.read_eof()


# -- ERR_INTERNAL: session continues, no later group, traceback in the log ----------------
@pytest.mark.parametrize("encoding", ["json", "ziproto"])
async def test_handler_error_is_internal_and_stops_the_packet(make_server, caplog, encoding):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_server()
    later: list = []
    session_ids: list = []

    @server.add_handler(group=0)
    async def explode(client, packet):
        session_ids.append(client.session.session_id)
        if "boom" in packet:
            raise RuntimeError("kaboom-secret-detail")

    @server.add_handler(group=1)
    async def record(client, packet):
        later.append(dict(packet))
        await client.send(packet)

    encode = json_packet if encoding == "json" else zi_packet
    error = json_error if encoding == "json" else zi_error
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(encode({"boom": 1}))
            reply = await wire.read_packet()
            assert reply == error("ERR_INTERNAL")
            assert b"kaboom" not in reply
            await wire.send(encode({"calm": 1}))
            assert await wire.read_packet() == encode({"calm": 1})
    assert later == [{"calm": 1}]

    session_id = str(session_ids[0])
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1
    record_ = failures[0]
    assert session_id in record_.getMessage()
    assert "explode" in record_.getMessage()
    assert record_.exc_info is not None
    assert isinstance(record_.exc_info[1], RuntimeError)
    assert "kaboom-secret-detail" in caplog.text  # the traceback is in the log


async def test_filter_error_is_internal_and_session_continues(make_server):
    class Broken(Filter):
        def check(self, client, packet):
            if "boom" in packet:
                raise ValueError("broken filter")
            return True

    server = make_server()

    @server.add_handler(Broken())
    async def echo(client, packet):
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"boom": 1}))
            assert await wire.read_packet() == json_error("ERR_INTERNAL")
            await assert_still_serving(wire)


# -- one client's errors do not disturb another -------------------------------------------
async def test_malformed_client_does_not_disturb_a_concurrent_one(make_echo):
    async with serving(make_echo(max_packet_size=1000)) as (host, port):
        async with await Wire.connect(host, port) as good, await Wire.connect(host, port) as bad:
            assert await good.request({"n": 1}) == {"n": 1}
            half = json_packet({"n": 2})
            await good.send(half[:7])  # a packet in flight, header split

            await bad.send(frame(b"garbage", JSON_CODE) + frame(b"{}", 7) + frame(b"", ZIPROTO_CODE))
            assert await bad.read_packet() == json_error(MALFORMED)
            assert await bad.read_packet() == json_error(HEADER)
            assert await bad.read_packet() == zi_error(MALFORMED)
            await bad.send((5000).to_bytes(4, "big"))
            assert await bad.read_packet() == json_error("ERR_PACKET_TOO_LARGE")
            await bad.read_eof()

            await good.send(half[7:])
            assert await good.read_packet() == half
            assert await good.request({"n": 3}) == {"n": 3}


async def test_replies_held_for_a_pipelined_batch_survive_a_framing_error(make_echo):
    """The echo of the first packet is held while the batch is handled; the framing
    error that ends the batch must not swallow it."""
    async with serving(make_echo(max_packet_size=64)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            first, second = json_packet({"n": 1}), json_packet({"n": 2})
            await wire.send(first + second + (65).to_bytes(4, "big"))
            assert await wire.read_packet() == first
            assert await wire.read_packet() == second
            assert await wire.read_packet() == json_error("ERR_PACKET_TOO_LARGE")
            await wire.read_eof()
