"""A tiny application for the CLI tests: echoes, and says so when its hooks run.

``python -m asyncapy run tests.e2e.cli_app:app`` serves it; its ``setup`` and
``shutdown`` overrides print a marker line to stdout, so a test can tell that a
SIGTERM stopped the server gracefully.
"""

from asyncapy import Client, Packet, Server


class App(Server):
    async def setup(self) -> None:
        print("cli_app: setup ran", flush=True)

    async def shutdown(self) -> None:
        print("cli_app: shutdown ran", flush=True)


app = App(timeout=10)


@app.add_handler()
async def echo(client: Client, packet: Packet) -> None:
    await client.send(packet)


not_a_server = object()
