"""Persistent sessions over a real socket: many packets, pipelining, arbitrary splits,
the sticky session encoding, the session's identity and its log lines, and graceful
shutdown with a handler in flight."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import trio

from asyncapy import Server
from tests.conftest import serving

from .wire import Wire, json_error, json_packet, settle, zi_packet


async def test_many_packets_on_one_connection(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            for n in range(200):
                assert await wire.request({"n": n, "text": "x" * (n % 7)}) == {
                    "n": n,
                    "text": "x" * (n % 7),
                }


async def test_pipelined_packets_in_one_write_are_answered_in_order(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            packets = [json_packet({"n": n}) for n in range(50)]
            await wire.send(b"".join(packets))
            for packet in packets:
                assert await wire.read_packet() == packet


async def test_pipelined_valid_and_invalid_packets_keep_their_order(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(
                json_packet({"n": 1})
                + b"\x00\x00\x00\x04\x16\x00{]"  # malformed JSON
                + json_packet({"n": 2})
                + b"\x00\x00\x00\x04\x15\x00{}"  # version 21
                + json_packet({"n": 3})
            )
            assert await wire.read_packet() == json_packet({"n": 1})
            assert await wire.read_packet() == json_error("ERR_REQUEST_MALFORMED")
            assert await wire.read_packet() == json_packet({"n": 2})
            assert await wire.read_packet() == json_error("ERR_HEADER_INVALID")
            assert await wire.read_packet() == json_packet({"n": 3})


@pytest.mark.parametrize("buf", [1, 3, 1024])
async def test_packets_split_down_to_one_byte_per_write(make_echo, buf):
    async with serving(make_echo(buf=buf)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            packets = [json_packet({"n": n, "pad": "p" * n}) for n in range(3)]
            for byte in b"".join(packets):
                await wire.send(bytes([byte]))
                await trio.sleep(0.001)
            for packet in packets:
                assert await wire.read_packet() == packet


async def test_packet_split_across_writes_at_every_boundary(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            packet = json_packet({"split": "here", "n": 42})
            for cut in range(1, len(packet)):
                await wire.send(packet[:cut])
                await trio.sleep(0.001)
                await wire.send(packet[cut:])
                assert await wire.read_packet() == packet


async def test_session_encoding_is_fixed_by_the_first_valid_packet(make_echo):
    async with serving(make_echo()) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(zi_packet({"first": "ziproto"}))
            assert await wire.read_packet() == zi_packet({"first": "ziproto"})
            # Decoded by its own header, echoed in the session's encoding.
            await wire.send(json_packet({"then": "json", "n": 7}))
            assert await wire.read_packet() == zi_packet({"then": "json", "n": 7})

        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"first": "json"}))
            assert await wire.read_packet() == json_packet({"first": "json"})
            await wire.send(zi_packet({"then": "ziproto", "bin": 1.5}))
            assert await wire.read_packet() == json_packet({"then": "ziproto", "bin": 1.5})


async def test_handlers_see_the_session_encoding(make_server):
    server = make_server()
    seen: list = []

    @server.add_handler()
    async def record(client, packet):
        seen.append((client.encoding, packet.encoding))
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(zi_packet({"a": 1}) + json_packet({"b": 2}))
            await wire.read_packet()
            await wire.read_packet()
    assert seen == [("ziproto", "ziproto"), ("ziproto", "ziproto")]


async def test_session_identity_and_peer_address(make_server):
    server = make_server()
    seen: list = []

    @server.add_handler()
    async def record(client, packet):
        seen.append(client)
        await client.send(packet)

    async with serving(server) as (host, port):
        before = time.time()
        async with await Wire.connect(host, port) as one, await Wire.connect(host, port) as two:
            assert await one.request({"n": 1}) == {"n": 1}
            assert await two.request({"n": 2}) == {"n": 2}
            assert await one.request({"n": 3}) == {"n": 3}
        after = time.time()

    first, second, again = seen
    assert first is again  # one Client per session
    for client in (first, second):
        assert client.address == "127.0.0.1"  # the peer's address
        session = client.session
        assert isinstance(session.session_id, uuid.UUID)
        assert session.session_id.version == 4
        assert type(session.date) is float
        assert before - 1 <= session.date <= after
        assert session.get_client() is client
    assert first.session.session_id != second.session.session_id


async def test_one_info_line_per_session_start_and_end_and_no_payload(make_echo, caplog):
    caplog.set_level(logging.DEBUG, logger="asyncapy")
    server = make_echo()
    ids: list = []

    @server.add_handler(group=-1)
    async def remember(client, packet):
        ids.append(str(client.session.session_id))

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            for n in range(3):
                assert await wire.request({"secret": f"top-secret-{n}"}) == {
                    "secret": f"top-secret-{n}"
                }
            await send_unloggable_garbage(wire)
        await settle()

    session_id = ids[0]
    info = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and session_id in r.getMessage()
    ]
    assert len(info) == 2, info
    assert "start" in info[0].lower()
    assert "end" in info[1].lower()
    assert "127.0.0.1" in info[0]
    assert "top-secret" not in caplog.text
    assert "not-for-logs" not in caplog.text


async def send_unloggable_garbage(wire: Wire) -> None:
    await wire.send(b"\x00\x00\x00\x10\x16\x00not-for-logs!!")
    assert await wire.read_packet() == json_error("ERR_REQUEST_MALFORMED")


# -- graceful shutdown --------------------------------------------------------------------
async def test_shutdown_lets_an_in_flight_handler_finish_and_refuses_new_connections(
    make_server,
):
    server = make_server(shutdown_grace=5)
    started = trio.Event()
    release = trio.Event()

    @server.add_handler()
    async def slow(client, packet):
        started.set()
        await release.wait()
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as busy, await Wire.connect(host, port) as idle:
            await busy.send(json_packet({"in": "flight"}))
            await started.wait()

            server.request_shutdown()
            await settle()

            with pytest.raises(OSError):
                await trio.open_tcp_stream(host, port)
            await idle.read_eof()  # an idle session is closed at once

            release.set()
            assert await busy.read_packet() == json_packet({"in": "flight"})
            await busy.read_eof()


async def test_shutdown_hook_runs_after_sessions_end(make_server):
    events: list = []

    class App(Server):
        async def setup(self):
            events.append("setup")

        async def shutdown(self):
            events.append("shutdown")

    server = App(timeout=5)

    @server.add_handler()
    async def echo(client, packet):
        events.append("handled")
        await client.send(packet)

    async with serving(server) as (host, port):
        assert events == ["setup"]
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"a": 1}) == {"a": 1}
    assert events == ["setup", "handled", "shutdown"]


async def test_grace_period_over_closes_a_stuck_handler(make_server):
    server = make_server(shutdown_grace=0.3)

    @server.add_handler()
    async def stuck(client, packet):
        await trio.sleep_forever()

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"a": 1}))
            await settle()
            server.request_shutdown()
            await wire.read_eof()
