"""The echo example answers over a real socket, with the bundled async client."""

from asyncapy.client import AsyncClient
from examples.echo import app as echo_app
from tests.conftest import serving


async def test_echo_round_trip():
    async with serving(echo_app) as (host, port):
        async with AsyncClient(tls=False) as client:
            await client.connect(host, port)
            assert await client.request({"hello": "world"}) == {"hello": "world"}
