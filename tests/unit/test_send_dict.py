"""``client.send()`` in a handler: a Packet, a plain dict (the session's encoding), and
anything else refused with one line showing the Packet to write."""

from asyncapy import Client, Filters, Packet, Server
from asyncapy.domain.codecs import CODECS_BY_NAME
from asyncapy.testing import open_test_client


def _server() -> Server:
    server = Server(port=0)

    @server.add_handler(Filters.Fields(kind="dict"))
    async def plain(client: Client, packet: Packet) -> None:
        await client.send({"ok": True, "encoding": client.encoding})

    @server.add_handler(Filters.Fields(kind="list"))
    async def wrong(client: Client, packet: Packet) -> None:
        try:
            await client.send(["ok"])
        except TypeError as exc:
            await client.send({"refused": str(exc)})

    @server.add_handler(Filters.Fields(kind="packet"))
    async def packet_reply(client: Client, packet: Packet) -> None:
        await client.send(Packet({"ok": "packet"}, encoding="json"))

    return server


async def test_a_dict_is_sent_in_the_sessions_encoding():
    server = _server()
    async with open_test_client(server) as client:
        assert await client.request({"kind": "dict"}) == {"ok": True, "encoding": "json"}
    async with open_test_client(server, encoding="ziproto") as client:
        await client.send({"kind": "dict"})
        raw = await client.receive_raw()
        assert client._split_packet(raw)[2] == CODECS_BY_NAME["ziproto"].code
        assert client._decode(raw) == {"ok": True, "encoding": "ziproto"}


async def test_anything_else_is_refused_in_one_line_naming_the_packet_to_write():
    async with open_test_client(_server()) as client:
        reply = await client.request({"kind": "list"})
    message = reply["refused"]
    assert "\n" not in message
    assert "not list" in message
    assert "Packet({...}, encoding=client.encoding)" in message


async def test_a_packet_still_goes_in_its_own_encoding():
    async with open_test_client(_server()) as client:
        assert await client.request({"kind": "packet"}) == {"ok": "packet"}
