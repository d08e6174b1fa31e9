"""A small application for the multi-process Redis tests, served as a subprocess by
``python -m asyncapy run tests.integration.redis_app:app --port P --config FILE``.

The config file names the shared session store (``store = redis://...``), the
``session_limit`` and the ``session_lease``. API keys live in the Redis named by the
``ASYNCAPY_TEST_KEYS`` environment variable (in memory without it).

Handlers, all in group 0, so the first whose filters pass answers:

* ``{"key": K, "ask": ...}`` with a key the shared store holds -> ``{"answer": "granted",
  "user": <the key's metadata>, "pid": ...}``;
* the same with any other key (or an unreachable store) -> ``{"answer": "denied", "pid": ...}``;
* anything else is echoed back.
"""

import os

from asyncapy import APIKeyFactory, Client, Filters, Packet, Server

app = Server(timeout=30)
keys = APIKeyFactory(store=os.environ.get("ASYNCAPY_TEST_KEYS", "memory://"))
ASK = Filters.Fields(key=None, ask=None)


@app.add_handler(ASK, Filters.APIFactory(keys, "key"))
async def granted(client: Client, packet: Packet) -> None:
    metadata = await keys.aget(packet["key"])
    reply = {"answer": "granted", "user": metadata, "pid": os.getpid()}
    await client.send(Packet(reply, encoding=client.encoding))


@app.add_handler(ASK)
async def denied(client: Client, packet: Packet) -> None:
    await client.send(Packet({"answer": "denied", "pid": os.getpid()}, encoding=client.encoding))


@app.add_handler()
async def echo(client: Client, packet: Packet) -> None:
    await client.send(packet)
