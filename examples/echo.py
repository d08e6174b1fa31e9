"""Echo every packet back to its sender, in the session's encoding.

Run it with ``make run`` (or ``python -m asyncapy run examples.echo:app``), then::

    python -c "from asyncapy.client import Client
    with Client(tls=False) as c:
        c.connect('127.0.0.1', 8081); print(c.request({'hello': 'world'}))"

A packet can hold values its session's encoding cannot carry: a session replies in
the encoding of its first packet, so a later packet in the other one (ZiProto
``bin`` in a JSON session, a JSON integer beyond 64 bits in a ZiProto one) cannot be
sent back as it is. ``client.send`` then raises ``CodecError``; this echo answers
``{"status": "failure", "error": "not representable in json"}`` (or ``ziproto``)
instead of letting it escape as a handler failure, which would be ``ERR_INTERNAL``
and a traceback in the log for every such packet.
"""

from asyncapy import Client, Packet, Server
from asyncapy.errors import CodecError

app = Server(buf=65536)


@app.add_handler()
async def echo(client: Client, packet: Packet) -> None:
    try:
        await client.send(packet)
    except CodecError:
        error = f"not representable in {client.encoding}"
        await client.send(Packet({"status": "failure", "error": error}, encoding=client.encoding))


if __name__ == "__main__":
    app.start()
