"""Garbage over the wire: the server never dies, never logs a traceback for a client's
mistake, answers every bad packet as ``protocol.md`` says, and keeps serving the others.

Every case runs over a real socket while a well-behaved client keeps requesting on its
own connection, before, during and after the garbage. For each case the log must hold
no record with a traceback (``exc_info``) and nothing at ERROR, and exactly one WARNING
naming the offending session per bad packet. Expected replies are spelled out byte by
byte with the helpers of :mod:`tests.e2e.wire`, which build packets from the contract,
not with the server's own framer or codecs.

The last test sends arbitrary byte strings (Hypothesis) to one long-running server and
checks each reply against a reading of the contract, then that a fresh connection is
still served.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from contextlib import asynccontextmanager
from typing import Any, Optional

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asyncapy.session_state import SharedLogs
from tests.conftest import serving

from .wire import (
    JSON_CODE,
    ZIPROTO_CODE,
    Wire,
    frame,
    json_error,
    json_packet,
    zi_error,
    zi_packet,
)

MALFORMED = "ERR_REQUEST_MALFORMED"
HEADER = "ERR_HEADER_INVALID"
TOO_LARGE = "ERR_PACKET_TOO_LARGE"

STARTED = re.compile(r"^\(([0-9a-f-]{36})\) Session started")

# -- the cases ------------------------------------------------------------------------------
# Each case: bytes to send, the exact replies, how many of its packets are bad (one
# WARNING each), and what then: the session "continues" (a valid packet is echoed),
# "closes" (EOF after the replies), or ends "silently" once the client half-closes
# (an unfinished packet at the end of the stream is no error and gets no reply).
CONTINUES, CLOSES, SILENT = "continues", "closes", "silently"


def case(id: str, send: bytes, replies: list, bad: int, then: str, **server: Any):
    return pytest.param(send, replies, bad, then, server, id=id)


def deep_json(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def deep_ziproto(depth: int, opener: bytes = b"\x91", leaf: bytes = b"\x90") -> bytes:
    return b"\x81\xa1a" + opener * depth + leaf


CASES = [
    # Another protocol, or noise, on the port: the first four bytes read as a length.
    case("http-request", b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", [json_error(TOO_LARGE)], 1, CLOSES),
    case("tls-client-hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32), [json_error(TOO_LARGE)], 1, CLOSES),
    case("all-byte-values", bytes(range(256)), [json_error(TOO_LARGE)], 1, CLOSES, max_packet_size=1024),
    case("all-byte-values-unfinished", bytes(range(256)), [], 0, SILENT),  # Content-Length 66051
    # Truncated headers and packets: silence, then a quiet close when the client leaves.
    case("truncated-header", b"\x00\x00\x00", [], 0, SILENT),
    case("truncated-payload", json_packet({"a": 1})[:-3], [], 0, SILENT),
    case("truncated-after-a-good-packet", json_packet({"a": 1}) + b"\x00\x00", [json_packet({"a": 1})], 0, SILENT),
    case("header-split-from-version", b"\x00\x00\x00\x0a", [], 0, SILENT),
    # Absurd lengths.
    case("length-u32-max", b"\xff\xff\xff\xff", [json_error(TOO_LARGE)], 1, CLOSES),
    case("length-one-over-the-limit", (1025).to_bytes(4, "big") + b"\x16\x00{", [json_error(TOO_LARGE)], 1, CLOSES, max_packet_size=1024),
    case("length-0", b"\x00\x00\x00\x00", [json_error(MALFORMED)], 1, CLOSES),
    case("length-1", b"\x00\x00\x00\x01\x16", [json_error(MALFORMED)], 1, CLOSES),
    case(
        "length-u64-max-8-byte-header",
        b"\xff" * 8,
        [json_error(TOO_LARGE, header_size=8)],
        1,
        CLOSES,
        header_size=8,
    ),
    case(
        "length-huge-little-endian",
        b"\x00\x00\x00\x80",
        [json_error(TOO_LARGE, byteorder="little")],
        1,
        CLOSES,
        byteorder="little",
    ),
    case(
        "length-too-short-for-its-payload",  # then the payload's tail reads as a header
        frame(b'{"a": 1}', length=4),
        [json_error(MALFORMED), json_error(TOO_LARGE)],
        2,
        CLOSES,
    ),
    case(
        "good-packets-then-length-0",
        json_packet({"n": 1}) + zi_packet({"n": 2}) + b"\x00\x00\x00\x00",
        [json_packet({"n": 1}), json_packet({"n": 2}), json_error(MALFORMED)],
        1,
        CLOSES,
    ),
    # Wrong versions and encodings: answered, and the session goes on.
    case(
        "wrong-versions",
        b"".join(frame(b'{"a": 1}', JSON_CODE, version) for version in (0, 1, 21, 23, 0x7F, 0xFF)),
        [json_error(HEADER)] * 6,
        6,
        CONTINUES,
    ),
    case(
        "wrong-encodings",
        b"".join(frame(b'{"a": 1}', encoding) for encoding in (2, 0x16, 0x80, 0xFF)),
        [json_error(HEADER)] * 4,
        4,
        CONTINUES,
    ),
    case("wrong-version-in-ziproto", frame(b"\xc1\xc1", ZIPROTO_CODE, 99), [zi_error(HEADER)], 1, CONTINUES),
    # Invalid UTF-8.
    case(
        "json-invalid-utf8",
        b"".join(
            frame(payload)
            for payload in (
                b'{"a": "\xff"}',
                b'{"\xc0\xaf": 1}',  # overlong
                b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate
                b'{"a": "\xe6\x97"}',  # a truncated sequence
                b"\xef\xbb\xbf{}",  # a byte-order mark
                b'{"a": NaN, "b": "\xff"}',  # past the fast parser, into the fallback
            )
        ),
        [json_error(MALFORMED)] * 6,
        6,
        CONTINUES,
    ),
    case(
        "ziproto-invalid-utf8",
        frame(b"\x81\xa1s\xa2\xff\xfe", ZIPROTO_CODE) + frame(b"\x81\xa1\xff\x01", ZIPROTO_CODE),
        [zi_error(MALFORMED)] * 2,
        2,
        CONTINUES,
    ),
    # Nesting beyond 1,000 levels: a clean ERR_REQUEST_MALFORMED, never a RecursionError.
    case("json-arrays-1001-deep", frame(deep_json(1001)), [json_error(MALFORMED)], 1, CONTINUES),
    case("json-arrays-100000-deep", frame(deep_json(100_000)), [json_error(MALFORMED)], 1, CONTINUES),
    case("json-objects-5000-deep", frame(b'{"a": ' * 5000 + b"1" + b"}" * 5000), [json_error(MALFORMED)], 1, CONTINUES),
    case("json-unterminated-100000-deep", frame(b'{"a": ' + b"[" * 100_000), [json_error(MALFORMED)], 1, CONTINUES),
    case("json-deep-in-the-fallback-parser", frame(b'{"x": NaN, "a": ' + b"[" * 5000 + b"]" * 5000 + b"}"), [json_error(MALFORMED)], 1, CONTINUES),
    case("ziproto-arrays-1001-deep", frame(deep_ziproto(1001), ZIPROTO_CODE), [zi_error(MALFORMED)], 1, CONTINUES),
    case("ziproto-arrays-100000-deep", frame(deep_ziproto(100_000), ZIPROTO_CODE), [zi_error(MALFORMED)], 1, CONTINUES),
    case("ziproto-maps-5000-deep", frame(deep_ziproto(5000, b"\x81\xa1a", b"\x80"), ZIPROTO_CODE), [zi_error(MALFORMED)], 1, CONTINUES),
    # Huge integers: exact when the encoding carries them, refused when it cannot.
    case("json-10**400", json_packet({"n": 10**400}), [json_packet({"n": 10**400})], 0, CONTINUES),
    case("json-minus-10**400", json_packet({"n": -(10**400)}), [json_packet({"n": -(10**400)})], 0, CONTINUES),
    case("json-1e400-is-infinity", frame(b'{"n": 1e400}'), [json_packet({"n": float("inf")})], 0, CONTINUES),
    case("json-5000-digits", frame(b'{"n": 1' + b"0" * 5000 + b"}"), [json_error(MALFORMED)], 1, CONTINUES),
    case("ziproto-uint64-max", frame(b"\x81\xa1n\xcf" + b"\xff" * 8, ZIPROTO_CODE), [zi_packet({"n": 2**64 - 1})], 0, CONTINUES),
    case("ziproto-int64-min", frame(b"\x81\xa1n\xd3\x80" + bytes(7), ZIPROTO_CODE), [zi_packet({"n": -(2**63)})], 0, CONTINUES),
    case(
        "ziproto-beyond-range",
        b"".join(
            frame(payload, ZIPROTO_CODE)
            for payload in (
                b"\x81\xa1n\xcf\xff\xff\xff",  # uint64 cut short
                b"\x81\xa1n\xd3\x80",  # int64 cut short
                b"\x81\xa1a\xdd\xff\xff\xff\xff",  # an array of 2**32 - 1 items
                b"\xdf\xff\xff\xff\xff",  # a map of 2**32 - 1 entries
                b"\x81\xa1a\xdb\xff\xff\xff\xff",  # a str of 4 GiB
                b"\x81\xa1a\xc6\xff\xff\xff\xff",  # a bin of 4 GiB
                b"\x81\xa1a\xc1",  # the never-used type byte
                b"\x81\xa1a\xd4\x05\x00",  # an extension type
                b"\x81\xa1n\xcf" + b"\xff" * 8 + b"\x00",  # trailing bytes
            )
        ),
        [zi_error(MALFORMED)] * 9,
        9,
        CONTINUES,
    ),
    # Duplicate keys: the last one wins, in both encodings.
    case("json-duplicate-keys", frame(b'{"a": 1, "b": 2, "a": 3}'), [json_packet({"a": 3, "b": 2})], 0, CONTINUES),
    case(
        "ziproto-duplicate-keys",
        frame(b"\x83\xa1a\x01\xa1b\x02\xa1a\x03", ZIPROTO_CODE),
        [zi_packet({"a": 3, "b": 2})],
        0,
        CONTINUES,
    ),
]


# -- helpers ----------------------------------------------------------------------------------
def started_sessions(records: list) -> list[str]:
    """Session ids, in the order the server started them, from its INFO records."""
    return [m.group(1) for r in records if (m := STARTED.match(r.getMessage()))]


async def new_session_id(caplog, known: set) -> str:
    """The id of the session the server starts next (polling its log)."""
    with trio.fail_after(3):
        while True:
            fresh = [s for s in started_sessions(caplog.records) if s not in known]
            if fresh:
                (session_id,) = fresh
                return session_id
            await trio.sleep(0.002)


def assert_no_traceback(records: list) -> None:
    for record in records:
        assert record.exc_info is None and record.exc_text is None, (
            f"a traceback was logged: {record.getMessage()}"
        )
        assert record.levelno < logging.ERROR, f"logged at {record.levelname}: {record.getMessage()}"
        assert "Traceback" not in record.getMessage() and "RecursionError" not in record.getMessage()


class Progress:
    served = 0

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(5):
            while self.served < count:
                await trio.sleep(0.002)


@asynccontextmanager
async def well_behaved_client(host: str, port: int, **layout: Any):
    """A client requesting on its own connection all along; on exit, it must have been
    served more after the block than before."""
    progress = Progress()
    stop = trio.Event()

    async def keep_requesting() -> None:
        async with await Wire.connect(host, port, **layout) as wire:
            n = 0
            while not stop.is_set():
                assert await wire.request({"good": n}) == {"good": n}
                n += 1
                progress.served = n
                await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_requesting)
        await progress.wait_for(1)
        yield progress
        await progress.wait_for(progress.served + 3)
        stop.set()


# -- the cases, over a socket -------------------------------------------------------------------
@pytest.mark.parametrize("send, replies, bad, then, server_settings", CASES)
async def test_garbage_is_answered_and_the_server_goes_on(
    make_echo, caplog, send, replies, bad, then, server_settings
):
    caplog.set_level(logging.INFO, logger="asyncapy")
    layout = {k: v for k, v in server_settings.items() if k in ("header_size", "byteorder")}
    async with serving(make_echo(**server_settings)) as (host, port):
        async with well_behaved_client(host, port, **layout):
            known = set(started_sessions(caplog.records))
            async with await Wire.connect(host, port, **layout) as wire:
                session_id = await new_session_id(caplog, known)
                await wire.send(send)
                for expected in replies:
                    assert await wire.read_packet() == expected
                if then == CONTINUES:
                    await wire.send(json_packet({"still": "here"}, **layout))
                    reply = await wire.read_packet()
                    assert reply in (json_packet({"still": "here"}, **layout), zi_packet({"still": "here"}, **layout))
                elif then == SILENT:
                    await wire.assert_silent(0.05)
                    await wire.stream.send_eof()
                    await wire.read_eof()
                else:
                    await wire.read_eof()
        # And a brand-new connection is served too.
        async with await Wire.connect(host, port, **layout) as fresh:
            assert await fresh.request({"fresh": True}) == {"fresh": True}

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    mine = [r for r in warnings if session_id in r.getMessage()]
    assert len(mine) == bad, [r.getMessage() for r in mine]
    assert len(warnings) == bad, "a warning about another session"
    assert_no_traceback(caplog.records)


async def test_garbage_from_many_connections_at_once(make_echo, caplog):
    """Every case of the table at the same time, each on its own connection, beside a
    well-behaved client: nothing interferes."""
    caplog.set_level(logging.INFO, logger="asyncapy")
    plain = [p.values for p in CASES if not p.values[4]]
    async with serving(make_echo()) as (host, port):
        async with well_behaved_client(host, port):

            async def one(send: bytes, replies: list, then: str) -> None:
                async with await Wire.connect(host, port) as wire:
                    await wire.send(send)
                    for expected in replies:
                        assert await wire.read_packet() == expected
                    if then == SILENT:
                        await wire.stream.send_eof()
                    if then in (SILENT, CLOSES):
                        await wire.read_eof()

            async with trio.open_nursery() as nursery:
                for send, replies, _bad, then, _ in plain:
                    nursery.start_soon(one, send, replies, then)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    counts = [m for m in warnings if "of all sessions not logged" in m]
    # Every warning is logged, or counted by the log limit all sessions share (one line
    # per second, its count in the next line let through or when the server stops).
    left_out = sum(int(n) for m in counts for n in re.findall(r"(\d+) (?:more )?protocol.errors? ", m))
    assert len(warnings) - len([m for m in counts if "warning(s) of all" in m]) + left_out == sum(
        values[2] for values in plain
    )
    assert_no_traceback(caplog.records)


# -- arbitrary bytes (Hypothesis), against one long-running server -----------------------------
MAX_PACKET = 512
"""The fuzzed server's ``max_packet_size``: small, so random lengths mostly exceed it
and the rest stays cheap."""


class ThreadedServer:
    """An echo server serving from its own thread (its own trio run) for a whole module,
    so that Hypothesis's examples, plain synchronous functions, all hit the same server
    and "it never dies" covers every one of them. Its log records are collected."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.records: list = []
        self.failure: Optional[BaseException] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="garbage-server", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported by alive()
            self.failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with serving(self.server) as (host, port):
            self.address = (host, port)
            self._ready.set()
            await self._stop.wait()

    def alive(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    def __enter__(self) -> "ThreadedServer":
        self._handler = _ListHandler(self.records)
        logger = logging.getLogger("asyncapy")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self._handler)
        self._thread.start()
        assert self._ready.wait(10) and self.alive(), self.failure
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self.alive():
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(15)
            assert not self._thread.is_alive(), "the server did not stop"
            assert self.failure is None, self.failure
        finally:
            logger = logging.getLogger("asyncapy")
            logger.removeHandler(self._handler)
            logger.setLevel(self._level)


class _ListHandler(logging.Handler):
    def __init__(self, records: list) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)  # list.append is atomic


@pytest.fixture(scope="module")
def garbage_server():
    from asyncapy import Server

    server = Server(addr="127.0.0.1", port=0, timeout=10, max_packet_size=MAX_PACKET)
    # Every warning of every session is checked below, at Hypothesis' pace: lift the
    # limit all sessions share (its own tests: tests/e2e/test_fair_share.py).
    server._sessions.shared_logs = SharedLogs(lines=10**6, session_lines=10**6)

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    with ThreadedServer(server) as threaded:
        yield threaded


def frames_of(data: bytes) -> tuple[list, Optional[str]]:
    """The complete packets of ``data`` as protocol.md frames them (4-byte big-endian
    layout, the ``max_packet_size`` above): ``(version, encoding, payload)`` each, and
    the code of the framing error that ends the stream, if one does."""
    frames: list = []
    position = 0
    while len(data) - position >= 4:
        length = int.from_bytes(data[position : position + 4], "big")
        if length < 2:
            return frames, MALFORMED
        if length > MAX_PACKET:
            return frames, TOO_LARGE
        if len(data) - position < 4 + length:
            break
        frames.append((data[position + 4], data[position + 5], data[position + 6 : position + 4 + length]))
        position += 4 + length
    return frames, None


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def split_packets(data: bytes) -> list:
    packets = []
    while data:
        assert len(data) >= 6, f"a truncated reply: {data!r}"
        length = int.from_bytes(data[:4], "big")
        assert len(data) >= 4 + length, f"a truncated reply: {data!r}"
        packets.append((data[4], data[5], data[6 : 4 + length]))
        data = data[4 + length :]
    return packets


def decode_reply(encoding: int, payload: bytes) -> Any:
    import json

    import ziproto

    if encoding == JSON_CODE:
        return json.loads(payload)
    return ziproto.decode(payload)


def wait_for_new_session(records: list, known: set) -> str:
    for _ in range(3000):
        fresh = [s for s in started_sessions(records) if s not in known]
        if fresh:
            return fresh[0]
        threading.Event().wait(0.001)
    raise AssertionError("the server did not start a session")


small_maps = st.dictionaries(
    st.text(max_size=5), st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8), max_size=4
)
valid_packets = small_maps.flatmap(
    lambda obj: st.sampled_from([json_packet(obj), zi_packet(obj)])
)
packets = st.builds(
    lambda payload, version, encoding: frame(payload, encoding, version),
    st.binary(max_size=40),
    st.sampled_from([22, 22, 22, 0, 21, 23, 255]),
    st.sampled_from([JSON_CODE, ZIPROTO_CODE, JSON_CODE, ZIPROTO_CODE, 2, 255]),
)
lengths = st.sampled_from([0, 1, 2, 3, MAX_PACKET, MAX_PACKET + 1, 2**32 - 1]).map(
    lambda n: n.to_bytes(4, "big")
)
garbage = st.one_of(
    st.binary(max_size=2000),
    st.lists(valid_packets | packets | lengths | st.binary(max_size=12), max_size=8).map(b"".join),
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=garbage)
def test_arbitrary_bytes_never_break_the_server(garbage_server, data):
    records = garbage_server.records
    before = len(records)
    known = set(started_sessions(records))
    host, port = garbage_server.address
    with socket.create_connection((host, port), timeout=5) as sock:
        session_id = wait_for_new_session(records, known)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # the server must answer what is whole, then close
        received = read_all(sock)

    # One reply per complete packet, in order, then one for a framing error, if any.
    frames, framing_error = frames_of(data)
    replies = split_packets(received)
    assert len(replies) == len(frames) + (framing_error is not None), (replies, frames, framing_error)
    session: Optional[int] = None
    bad = 0
    for (version, encoding, payload), (reply_version, reply_encoding, body) in zip(frames, replies):
        assert reply_version == 22
        reply = decode_reply(reply_encoding, body)
        fallback = JSON_CODE if session is None else session
        if version != 22 or encoding not in (JSON_CODE, ZIPROTO_CODE):
            bad += 1
            assert reply == {"status": "failure", "error": HEADER}
            assert reply_encoding == (encoding if encoding in (JSON_CODE, ZIPROTO_CODE) else fallback)
        elif not payload or reply == {"status": "failure", "error": MALFORMED}:
            bad += 1
            assert reply == {"status": "failure", "error": MALFORMED}
            assert reply_encoding == encoding  # the declared encoding
        else:  # valid: echoed in the session's encoding, which the first valid packet fixed
            session = encoding if session is None else session
            assert reply_encoding == session
            assert type(reply) is dict and "error" not in reply
    event(f"{len(frames)} complete packet(s), {bad} bad" if frames else "no complete packet")
    event(f"ends with {framing_error}" if framing_error else "no framing error")
    if framing_error is not None:
        bad += 1
        _, reply_encoding, body = replies[-1]
        assert decode_reply(reply_encoding, body) == {"status": "failure", "error": framing_error}
        assert reply_encoding == (JSON_CODE if session is None else session)

    # The server is alive and serves a fresh connection.
    assert garbage_server.alive()
    with socket.create_connection((host, port), timeout=5) as sock:
        request = json_packet({"fresh": 1})
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == request

    new = records[before:]
    warnings = [r for r in new if r.levelno == logging.WARNING]
    assert len([r for r in warnings if session_id in r.getMessage()]) == bad
    assert len(warnings) == bad
    assert_no_traceback(new)
