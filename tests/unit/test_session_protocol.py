"""SessionProtocol: one session's events handled, driven by hand (no sockets, no server).

The object takes bytes and events and writes replies through its channel; these tests
feed it directly, as a driver other than its own ``run`` would, and read what reaches
the client's end of an in-memory stream.
"""

from __future__ import annotations

import logging
import uuid

import pytest
import trio
import trio.testing

from asyncapy.config import make_settings
from asyncapy.core import Client, Packet, Session
from asyncapy.domain.codecs import JSON
from asyncapy.domain.connection import NEED_DATA, Connection, ProtocolError, Request
from asyncapy.domain.dispatch import Dispatcher, Handler
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.framing import Framer
from asyncapy.metrics import Recorder
from asyncapy.session_protocol import SessionProtocol
from asyncapy.session_state import IDLE, SessionState
from asyncapy.transport import Channel

FRAMER = Framer()


def frame(fields: dict) -> bytes:
    return FRAMER.frame(JSON.encode(fields), JSON.code)


class Wire:
    """The client's end: reads whole reply frames."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.framer = Framer()

    async def reply(self) -> dict:
        while True:
            got = self.framer.next_event()
            if got is not NEED_DATA:
                return JSON.decode(got.payload)
            data = await self.stream.receive_some(65536)
            assert data, "the server closed the connection"
            self.framer.receive_data(data)


class _Attached:
    """What a Client asks of its server, for a client built by hand."""

    async def sessions_of(self, address: str) -> list:
        return []

    def attach(self, client: Client) -> None:  # pragma: no cover - attached below
        raise AssertionError("attached by make()")


def make(dispatcher: Dispatcher, **settings) -> tuple[SessionProtocol, Wire, Recorder]:
    ours, theirs = trio.testing.memory_stream_pair()
    client = Client("192.0.2.1", _Attached(), ours, None, "json")
    channel = client._channel = Channel(ours)
    connection = client._connection = Connection()
    client.session = Session(uuid.uuid4(), client, 0.0)
    recorder = Recorder()
    channel.meter = recorder.session_started(client)
    protocol = SessionProtocol(
        client,
        channel,
        connection,
        SessionState(0.0, channel),
        settings=make_settings(settings),
        dispatch=dispatcher.dispatch,
        recorder=recorder,
        stopping=trio.Event(),
    )
    return protocol, Wire(theirs), recorder


def echo_dispatcher() -> Dispatcher:
    async def echo(client, packet):
        await client.send(Packet(dict(packet), encoding=client.encoding))

    dispatcher = Dispatcher()
    dispatcher.register(Handler(echo))
    return dispatcher


def next_event(protocol: SessionProtocol):
    event = protocol.connection.next_event()
    assert event is not NEED_DATA
    return event


async def test_bytes_in_a_request_out_and_its_reply_written():
    protocol, wire, recorder = make(echo_dispatcher())
    protocol.receive_data(frame({"hello": 1}))
    event = next_event(protocol)
    assert type(event) is Request
    assert await protocol.handle_request(event) is None
    assert await wire.reply() == {"hello": 1}
    assert protocol.meter.requests == 1 and protocol.meter.received == len(frame({"hello": 1}))


async def test_a_protocol_error_is_answered_and_the_session_goes_on():
    protocol, wire, recorder = make(echo_dispatcher())
    protocol.receive_data(FRAMER.frame(b"[1]", JSON.code))  # a list, not an object
    event = next_event(protocol)
    assert type(event) is ProtocolError and not event.close
    assert await protocol.handle_protocol_error(event) is None
    assert await wire.reply() == {"status": "failure", "error": "ERR_REQUEST_MALFORMED"}
    assert not protocol.channel.closed
    assert recorder.snapshot().error_replies["ERR_REQUEST_MALFORMED"] == 1


async def test_max_protocol_errors_in_a_row_close_after_the_last_reply():
    protocol, wire, _ = make(echo_dispatcher(), max_protocol_errors=3)
    reasons = []
    for _ in range(3):
        protocol.receive_data(FRAMER.frame(b"[1]", JSON.code))
        reasons.append(await protocol.handle_protocol_error(next_event(protocol)))
    assert reasons == [None, None, "too many protocol errors"]
    for _ in range(3):
        assert (await wire.reply())["error"] == "ERR_REQUEST_MALFORMED"
    assert protocol.channel.closed


async def test_a_request_between_errors_resets_the_count():
    protocol, wire, _ = make(echo_dispatcher(), max_protocol_errors=2)
    protocol.receive_data(FRAMER.frame(b"[1]", JSON.code))
    assert await protocol.handle_protocol_error(next_event(protocol)) is None
    protocol.receive_data(frame({"ok": 1}))
    assert await protocol.handle_request(next_event(protocol)) is None
    protocol.receive_data(FRAMER.frame(b"[1]", JSON.code))
    assert await protocol.handle_protocol_error(next_event(protocol)) is None  # 1 in a row, not 2


async def test_a_fatal_protocol_error_closes_with_its_reply_after_the_held_ones():
    protocol, wire, _ = make(echo_dispatcher())
    protocol.channel.hold()
    protocol.receive_data(frame({"first": 1}))
    assert await protocol.handle_request(next_event(protocol)) is None  # held, not written
    protocol.receive_data(b"\x7f\xff\xff\xff")  # 2 GiB declared: framing is lost
    event = next_event(protocol)
    assert type(event) is ProtocolError and event.close
    assert await protocol.handle_protocol_error(event) == event.code
    assert await wire.reply() == {"first": 1}
    assert (await wire.reply())["error"] == event.code
    assert protocol.channel.closed


async def test_a_handler_that_raises_gets_err_internal_and_a_traceback(caplog):
    async def broken(client, packet):
        raise RuntimeError("boom")

    dispatcher = Dispatcher()
    dispatcher.register(Handler(broken))
    protocol, wire, _ = make(dispatcher)
    protocol.receive_data(frame({"x": 1}))
    assert await protocol.handle_request(next_event(protocol)) is None
    assert await wire.reply() == {"status": "failure", "error": "ERR_INTERNAL"}
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "broken" in record.getMessage() and record.exc_info[0] is RuntimeError


async def test_a_store_outage_in_a_handler_is_err_unavailable_in_one_line(caplog):
    async def needs_store(client, packet):
        raise StoreUnavailable("redis://localhost:1: connection refused")

    dispatcher = Dispatcher()
    dispatcher.register(Handler(needs_store))
    protocol, wire, _ = make(dispatcher)
    protocol.receive_data(frame({"x": 1}))
    await protocol.handle_request(next_event(protocol))
    assert await wire.reply() == {"status": "failure", "error": "ERR_UNAVAILABLE"}
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.WARNING and not record.exc_info


async def test_a_packet_no_handler_matched_is_logged_at_debug_with_its_fields(caplog):
    dispatcher = Dispatcher()

    async def never(client, packet):  # pragma: no cover - its filter never passes
        raise AssertionError

    class Nobody:
        def check(self, client, packet):
            return False

    dispatcher.register(Handler(never, [Nobody()]))
    caplog.set_level(logging.DEBUG, logger="asyncapy.server")
    protocol, wire, _ = make(dispatcher)
    protocol.receive_data(frame({"b": 1, "a": 2}))
    assert await protocol.handle_request(next_event(protocol)) is None
    [line] = [r.getMessage() for r in caplog.records if "No handler matched" in r.getMessage()]
    assert line.endswith("No handler matched a packet with fields ['a', 'b']")


async def test_a_handler_past_handler_timeout_is_cancelled_and_answered(caplog):
    async def slow(client, packet):
        await trio.sleep(10)

    dispatcher = Dispatcher()
    dispatcher.register(Handler(slow))
    protocol, wire, _ = make(dispatcher, handler_timeout=0.05)
    protocol.receive_data(frame({"x": 1}))
    assert await protocol.handle_request(next_event(protocol)) is None
    assert await wire.reply() == {"status": "failure", "error": "ERR_INTERNAL"}
    assert any("ran past handler_timeout" in r.getMessage() for r in caplog.records)


async def test_a_handler_that_closes_ends_the_session():
    async def bye(client, packet):
        await client.send(Packet({"bye": True}, encoding="json"), close=True)

    dispatcher = Dispatcher()
    dispatcher.register(Handler(bye))
    protocol, wire, _ = make(dispatcher)
    protocol.receive_data(frame({"x": 1}))
    assert await protocol.handle_request(next_event(protocol)) == "closed by a handler"
    assert await wire.reply() == {"bye": True}


async def test_close_with_sends_nothing_after_an_interrupted_write():
    protocol, wire, recorder = make(echo_dispatcher())
    protocol.channel.interrupted = True  # a write was cut short: the stream is out of step
    await protocol.close_with("ERR_TIMED_OUT")
    assert protocol.channel.closed
    assert await wire.stream.receive_some(10) == b""
    assert recorder.snapshot().error_replies["ERR_TIMED_OUT"] == 0


async def test_run_serves_until_the_client_closes():
    protocol, wire, _ = make(echo_dispatcher())
    async with trio.open_nursery() as nursery:
        reasons = []

        async def run():
            reasons.append(await protocol.run())

        nursery.start_soon(run)
        await wire.stream.send_all(frame({"a": 1}) + frame({"b": 2}))  # pipelined
        assert await wire.reply() == {"a": 1}
        assert await wire.reply() == {"b": 2}
        await wire.stream.aclose()
    assert reasons == ["client closed the connection"]


async def test_run_times_out_with_err_timed_out_when_the_reaper_cancels_it():
    protocol, wire, _ = make(echo_dispatcher())
    async with trio.open_nursery() as nursery:
        reasons = []

        async def run():
            reasons.append(await protocol.run())

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        assert protocol.state.waiting
        protocol.state.cancel(IDLE)
        assert await wire.reply() == {"status": "failure", "error": "ERR_TIMED_OUT"}
    assert reasons == ["timed out"]


async def test_run_ends_on_shutdown_once_it_waits_for_bytes():
    protocol, wire, _ = make(echo_dispatcher())
    protocol.stopping.set()
    assert await protocol.run() == "server shutting down"


@pytest.mark.parametrize("size", [1, 7])
async def test_bytes_fed_in_pieces_make_the_same_request(size):
    protocol, wire, _ = make(echo_dispatcher())
    data = frame({"split": "yes"})
    for start in range(0, len(data), size):
        assert protocol.connection.next_event() is NEED_DATA
        protocol.receive_data(data[start:start + size])
    event = next_event(protocol)
    assert event.fields == {"split": "yes"}
