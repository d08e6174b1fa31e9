"""Bad handlers hurt only their own packet: ``handler_timeout`` and session isolation.

Over real sockets: a handler that raises, one that hangs past ``handler_timeout``, one
that hangs while writing to a client that does not read, and one that closes its client
in the middle of propagation. Each gets the answer the protocol promises (``ERR_INTERNAL``
and the session goes on, or the session ends), and none of them disturbs another
client, whose session keeps answering in between, in order, on the same connection.
"""

from __future__ import annotations

import logging
import re
import uuid

import pytest
import trio

from asyncapy.config import ConfigError
from asyncapy.server import Server

from ..conftest import serving
from .wire import Wire, json_error, json_packet, settle

INTERNAL = json_error("ERR_INTERNAL")


def build(make_server, **settings) -> tuple[Server, list[str]]:
    """A server whose handlers misbehave on request; ``seen`` lists what group 1 saw."""
    server = make_server(**settings)
    seen: list[str] = []

    @server.add_handler(group=0)
    async def misbehave(client, packet):
        if "raise" in packet:
            raise RuntimeError("a handler bug")
        if "hang" in packet:
            await trio.sleep_forever()
        if "flood" in packet:  # hangs in a write: its client reads nothing
            while True:
                await client.send(type(packet)({"x": "y" * 65536}, encoding="json"))
        if "close" in packet:
            await client.close()

    @server.add_handler(group=1)
    async def echo(client, packet):
        seen.append(next(iter(packet)))
        await client.send(packet)

    return server, seen


async def ask_bystander(wire: Wire, n: int) -> None:
    """The well-behaved client: its reply, at once, on its one connection."""
    with trio.fail_after(1):
        assert await wire.request({"bystander": n}) == {"bystander": n}


async def test_raising_handler_answers_internal_and_the_session_goes_on(make_server, caplog):
    server, seen = build(make_server)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as bad, await Wire.connect(host, port) as good:
            await ask_bystander(good, 0)
            await bad.send(json_packet({"raise": 1}))
            assert await bad.read_packet() == INTERNAL
            await ask_bystander(good, 1)
            assert await bad.request({"fine": 1}) == {"fine": 1}  # same session, still served
            await ask_bystander(good, 2)
    assert seen == ["bystander", "bystander", "fine", "bystander"]  # the failed packet stopped
    assert any("misbehave" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


async def test_handler_past_handler_timeout_is_cancelled_answered_and_logged(make_server, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server, seen = build(make_server, handler_timeout=0.3)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as bad, await Wire.connect(host, port) as good:
            await bad.send(json_packet({"hang": 1}))
            # Meanwhile the other client is served at once, again and again.
            for n in range(3):
                await ask_bystander(good, n)
            started = trio.current_time()
            assert await bad.read_packet() == INTERNAL
            assert trio.current_time() - started < 1
            # The session goes on: same connection, next request answered.
            assert await bad.request({"after": 1}) == {"after": 1}
    assert seen == ["bystander", "bystander", "bystander", "after"]
    [warning] = [r for r in caplog.records if "handler_timeout" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "misbehave" in message and "0.3" in message
    session_id = re.match(r"\((\S+)\) ", message).group(1)
    uuid.UUID(session_id)  # the session's id, as every line of the session names it
    assert any(
        r.getMessage().startswith(f"({session_id}) Session started") for r in caplog.records
    )


async def test_handler_timeout_in_the_middle_of_a_write_closes_that_session_only(make_server, caplog):
    """Part of a reply may be on the wire: an ERR_INTERNAL after it would be garbage,
    so the session ends instead; the other client does not notice."""
    server, _ = build(make_server, handler_timeout=0.5)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as bad, await Wire.connect(host, port) as good:
            await bad.send(json_packet({"flood": 1}))  # and never read
            for n in range(3):
                await ask_bystander(good, n)
            with trio.fail_after(3):
                while server._listening.connections > 1:
                    await trio.sleep(0.05)
            await ask_bystander(good, 3)
    assert any("while writing" in r.getMessage() for r in caplog.records)


async def test_without_handler_timeout_a_slow_handler_is_left_alone(make_server):
    server = make_server()

    @server.add_handler()
    async def slow(client, packet):
        await trio.sleep(0.6)
        await client.send(packet)

    assert server.handler_timeout is None
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"slow": 1}) == {"slow": 1}


async def test_handler_closing_its_client_mid_propagation_disturbs_no_one(make_server):
    server, seen = build(make_server)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as good:
            for n in range(5):
                async with await Wire.connect(host, port) as closing:
                    await closing.send(json_packet({"close": n}) + json_packet({"unseen": n}))
                    await closing.read_eof()
                await ask_bystander(good, n)
            await settle()
            assert len(server._sessions.live) == 1  # the closed ones were released
    assert seen == ["bystander"] * 5  # group 1 never saw a closed session's packet


async def test_every_kind_of_bad_handler_at_once_beside_one_good_client(make_server):
    """Many bad sessions misbehaving together; the good one is answered throughout."""
    server, _ = build(make_server, handler_timeout=0.3)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as good:

            async def misbehave(kind: str) -> None:
                async with await Wire.connect(host, port) as bad:
                    await bad.send(json_packet({kind: 1}))
                    if kind == "close":
                        await bad.read_eof()
                    else:
                        assert await bad.read_packet() == INTERNAL
                        assert await bad.request({"again": 1}) == {"again": 1}

            async with trio.open_nursery() as nursery:
                for kind in ["raise", "hang", "close"] * 10:
                    nursery.start_soon(misbehave, kind)
                for n in range(10):
                    await ask_bystander(good, n)
                    await trio.sleep(0.03)
            await ask_bystander(good, 10)


@pytest.mark.parametrize("value", [0, -1, "1", True, float("inf")])
def test_handler_timeout_is_validated(value):
    with pytest.raises(ConfigError, match="handler_timeout"):
        Server(handler_timeout=value)


def test_handler_timeout_from_a_config_file(tmp_path):
    ini = tmp_path / "app.ini"
    ini.write_text("[AsyncAPY]\nhandler_timeout = 2.5\nmax_connections = 50\n")
    server = Server(config=str(ini))
    assert (server.handler_timeout, server.max_connections) == (2.5, 50)
    ini.write_text("[AsyncAPY]\nhandler_timeout =\n")
    assert Server(handler_timeout=3, config=str(ini)).handler_timeout is None
