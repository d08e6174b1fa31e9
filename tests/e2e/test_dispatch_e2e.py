"""Dispatch over the wire: group order, propagation, StopPropagation, closing from a
handler, handlers that match nothing, and what a handler can learn about its client."""

from __future__ import annotations

import pytest
import trio

from asyncapy import Filters, Packet, StopPropagation
from tests.conftest import serving

from .wire import Wire, json_packet, settle, zi_packet


def reply(client, **fields) -> Packet:
    return Packet(fields, encoding=client.encoding)


async def test_groups_run_in_ascending_order_and_the_packet_propagates(make_server):
    server = make_server()
    order: list = []

    def make(group: int, tag: str):
        async def handler(client, packet):
            order.append(tag)
            await client.send(reply(client, group=group, tag=tag, got=packet["n"]))

        return handler

    # Registered out of order on purpose.
    server.register_handler(make(1, "one"), group=1)
    server.register_handler(make(-1, "minus-one"), group=-1)
    server.register_handler(make(0, "zero-first"))
    server.register_handler(make(0, "zero-second"))  # same group: never reached
    server.register_handler(make(10, "ten"), group=10)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"n": 1}))
            replies = [await wire.read_json() for _ in range(4)]
            await wire.assert_silent(0.2)
    assert [r["tag"] for r in replies] == ["minus-one", "zero-first", "one", "ten"]
    assert [r["group"] for r in replies] == [-1, 0, 1, 10]
    assert all(r["got"] == 1 for r in replies)
    assert order == ["minus-one", "zero-first", "one", "ten"]


async def test_within_a_group_the_first_matching_handler_wins(make_server):
    server = make_server()

    @server.add_handler(Filters.Fields(kind="a"))
    async def only_a(client, packet):
        await client.send(reply(client, by="only_a"))

    @server.add_handler()
    async def anything(client, packet):
        await client.send(reply(client, by="anything"))

    @server.add_handler(Filters.Fields(kind="b"))
    async def shadowed(client, packet):
        await client.send(reply(client, by="shadowed"))

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"kind": "a"}) == {"by": "only_a"}
            assert await wire.request({"kind": "b"}) == {"by": "anything"}
            assert await wire.request({"kind": "c"}) == {"by": "anything"}
            await wire.assert_silent(0.1)


@pytest.mark.parametrize("spelling", ["call", "await", "raise"])
async def test_stop_propagation_keeps_later_groups_out_and_the_session_open(make_server, spelling):
    server = make_server()
    later: list = []

    @server.add_handler(Filters.Fields(stop=None), group=-1)
    async def stopper(client, packet):
        await client.send(reply(client, stopped=True))
        if spelling == "call":
            packet.stop_propagation()
        elif spelling == "await":
            await packet.stop_propagation()
        else:
            raise StopPropagation

    @server.add_handler(group=0)
    async def echo(client, packet):
        later.append(dict(packet))
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"stop": 1}) == {"stopped": True}
            # The next reply is the echo of the next packet: nothing came in between,
            # and the session is still open.
            assert await wire.request({"go": 1}) == {"go": 1}
            assert await wire.request({"stop": 2}) == {"stopped": True}
            await wire.assert_silent(0.1)
    assert later == [{"go": 1}]


async def test_handler_close_ends_the_session_and_later_groups_do_not_run(make_server):
    server = make_server()
    later: list = []

    @server.add_handler(Filters.Fields(bye=None), group=0)
    async def goodbye(client, packet):
        await client.send(reply(client, bye=True))
        await client.close()
        assert client.closed
        with pytest.raises(trio.ClosedResourceError):
            await client.send(reply(client, too="late"))

    @server.add_handler(group=1)
    async def after(client, packet):
        later.append(dict(packet))
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"hi": 1}) == {"hi": 1}
            assert await wire.request({"bye": 1}) == {"bye": True}
            await wire.read_eof()
            await settle()
    assert later == [{"hi": 1}]


async def test_send_with_close_replies_then_closes(make_server):
    server = make_server()
    later: list = []

    @server.add_handler(group=0)
    async def last_word(client, packet):
        await client.send(packet, close=True)

    @server.add_handler(group=1)
    async def after(client, packet):
        later.append(dict(packet))

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            # Pipelined: the second packet must never be answered.
            await wire.send(zi_packet({"n": 1}) + zi_packet({"n": 2}))
            assert await wire.read_packet() == zi_packet({"n": 1})
            await wire.read_eof()
            await settle()
    assert later == []


async def test_no_matching_handler_sends_nothing_and_keeps_the_session(make_server):
    server = make_server()

    @server.add_handler(Filters.Fields(ping=None))
    async def pong(client, packet):
        await client.send(reply(client, pong=packet["ping"]))

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"unknown": 1}))
            await wire.assert_silent(0.3)
            assert await wire.request({"ping": 5}) == {"pong": 5}


async def test_get_sessions_lists_this_addresss_live_sessions(make_server):
    server = make_server()
    sessions_seen: list = []

    @server.add_handler(Filters.Fields(who=None))
    async def whoami(client, packet):
        await client.send(reply(client, me=str(client.session.session_id), address=client.address))

    @server.add_handler(Filters.Fields(sessions=None))
    async def list_sessions(client, packet):
        sessions = await client.get_sessions()
        sessions_seen.append(sessions)
        await client.send(reply(client, all=sorted(str(s.session_id) for s in sessions)))

    async with serving(server) as (host, port):
        one = await Wire.connect(host, port)
        two = await Wire.connect(host, port)
        async with one, two:
            me_one = await one.request({"who": 1})
            me_two = await two.request({"who": 1})
            assert me_one["address"] == me_two["address"] == "127.0.0.1"
            assert me_one["me"] != me_two["me"]

            listed = await two.request({"sessions": 1})
            assert listed["all"] == sorted([me_one["me"], me_two["me"]])
            for session in sessions_seen[-1]:
                assert session.get_client() is not None
                assert session.get_client().address == "127.0.0.1"

            await one.aclose()
            await settle()
            listed = await two.request({"sessions": 1})
            assert listed["all"] == [me_two["me"]]


async def test_session_close_from_another_session(make_server):
    """A handler may close another live session of the same address."""
    server = make_server()

    @server.add_handler(Filters.Fields(kick=None))
    async def kick(client, packet):
        for session in await client.get_sessions():
            if session != client.session:
                await session.close()
        await client.send(reply(client, kicked=True))

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as victim, await Wire.connect(host, port) as boss:
            assert await victim.request({"n": 1}) == {"n": 1}
            assert await boss.request({"kick": 1}) == {"kicked": True}
            await victim.read_eof()
            assert await boss.request({"n": 2}) == {"n": 2}
