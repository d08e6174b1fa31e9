"""Echo every packet back to its sender, in the session's encoding.

Run it with ``make run`` (or ``python -m asyncapy run examples.echo:app``), then::

    python -c "from asyncapy.client import Client
    with Client(tls=False) as c:
        c.connect('127.0.0.1', 8081); print(c.request({'hello': 'world'}))"
"""

from asyncapy import Client, Packet, Server

app = Server(buf=65536)


@app.add_handler()
async def echo(client: Client, packet: Packet) -> None:
    await client.send(packet)


if __name__ == "__main__":
    app.start()
