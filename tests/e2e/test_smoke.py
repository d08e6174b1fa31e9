"""The echo example answers over a real socket, with the bundled async client."""

from asyncapy.client import AsyncClient
from examples.echo import app as echo_app
from tests.conftest import serving


async def test_echo_round_trip():
    async with serving(echo_app) as (host, port):
        async with AsyncClient(tls=False) as client:
            await client.connect(host, port)
            assert await client.request({"hello": "world"}) == {"hello": "world"}


async def test_a_server_without_the_codec_accelerator_says_so_and_still_serves(
    make_server, monkeypatch, caplog
):
    from asyncapy.domain import codecs

    server = make_server()

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    monkeypatch.setattr(codecs, "ACCELERATED", False)
    with caplog.at_level("WARNING", logger="asyncapy.server"):
        async with serving(server) as (host, port):
            async with AsyncClient(tls=False, encoding="ziproto") as client:
                await client.connect(host, port)
                assert await client.request({"a": [1, 2]}) == {"a": [1, 2]}
    assert any("accelerator" in r.getMessage() and "gcc" in r.getMessage() for r in caplog.records)


async def test_a_server_with_the_accelerator_does_not_warn(make_server, caplog):
    server = make_server()
    with caplog.at_level("WARNING", logger="asyncapy.server"):
        async with serving(server):
            pass
    assert not any("accelerator" in r.getMessage() for r in caplog.records)
