"""A user's type checker against the installed package: the wheel ships ``py.typed``
and annotations precise enough that ``mypy --strict`` passes a correct program and
flags real mistakes (a port given as text, ``client.send`` given a number).

The wheel is built and installed in a fresh virtual environment as in
tests/e2e/test_wheel.py (tests/e2e/wheels.py); mypy runs with that environment's
Python, from a directory outside the repository, so it sees the installed package
only, as a user's project would.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.e2e.wheels import build_wheel, install_in_fresh_env

CORRECT = '''
"""The README's example, and the rest of the public API a program uses."""
from typing import Any

import trio

from asyncapy import Client, Packet, Server
from asyncapy.client import AsyncClient
from asyncapy.client import Client as BlockingClient
from asyncapy.filters import Filter, Filters
from asyncapy.testing import TestClient, open_test_client
from asyncapy.util import APIKeyFactory

server = Server(addr="127.0.0.1", port=8081, session_limit=5)
keys = APIKeyFactory()


@server.add_handler(Filters.Fields(ping=None), group=-1)
async def ping(client: Client, packet: Packet) -> None:
    await client.send(Packet({"pong": True}, encoding=client.encoding))
    packet.stop_propagation()


@server.add_handler(Filters.APIFactory(keys, "key") & Filters.Ip("127.0.0.0/8"))
async def secret(client: Client, packet: Packet) -> None:
    metadata = await keys.aget(packet["key"])
    await client.send({"metadata": metadata})


class EvenLength(Filter):
    def check(self, client: Any, packet: Any) -> bool:
        return len(packet) % 2 == 0


@server.add_handler(EvenLength() | ~Filters.Ip("10.0.0.0/8"), group=1)
async def even(client: Client, packet: Packet) -> None:
    await client.send({"even": True}, close=True)


port: int = server.port
server.timeout = 5


async def with_a_test_client() -> dict[Any, Any]:
    async with open_test_client(server) as test_client:
        assert isinstance(test_client, TestClient)
        return await test_client.request({"ping": 1})


async def with_an_async_client() -> dict[Any, Any]:
    async with AsyncClient(tls=False) as client:
        await client.connect("127.0.0.1", port)
        return await client.request({"ping": 1})


def with_the_blocking_client() -> dict[Any, Any]:
    with BlockingClient(tls=False) as client:
        client.connect("127.0.0.1", port)
        return client.request({"ping": 1})


if __name__ == "__main__":
    key: str = keys.issue({"user": "alice"}, rate_limit="10/s")
    keys.revoke(keys.reissue(key))
    print(trio.run(with_a_test_client))
    server.start()
'''

MISTAKES = '''
from asyncapy import Client, Packet, Server

server = Server(port="9000")


@server.add_handler()
async def reply(client: Client, packet: Packet) -> None:
    await client.send(42)


reveal_type(reply)
'''


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    python, _ = install_in_fresh_env(wheel, tmp_path_factory.mktemp("typing") / "env")
    return python


def mypy_strict(python: Path, project: Path, source: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``source``, as a user runs it in ``project``: with the fresh
    environment's Python (mypy itself is borrowed from the test environment)."""
    project.mkdir()
    (project / "app.py").write_text(textwrap.dedent(source))
    assert not (project / "pyproject.toml").exists()
    return subprocess.run(
        [str(python), "-m", "mypy", "--strict", "--no-incremental", "--python-executable", str(python), "app.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_correct_program_passes_mypy_strict_against_the_installed_wheel(fresh_python, tmp_path):
    checked = mypy_strict(fresh_python, tmp_path / "project", CORRECT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Success: no issues found in 1 source file" in checked.stdout


def test_mistakes_are_flagged(fresh_python, tmp_path):
    checked = mypy_strict(fresh_python, tmp_path / "project", MISTAKES)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert any(
        line.startswith('app.py:4: error: Argument "port" to "Server" has incompatible type "str"; expected "int"')
        for line in lines
    ), checked.stdout
    assert any(
        line.startswith('app.py:9: error: Argument 1 to "send" of "Client" has incompatible type "int"')
        for line in lines
    ), checked.stdout
    # The decorator handed back the function with its own type, not an untyped one.
    assert any(
        line.startswith('app.py:12: note: Revealed type is "def (client: asyncapy.core.Client, packet: asyncapy.core.Packet)')
        for line in lines
    ), checked.stdout
    assert checked.stdout.count(": error:") == 2, checked.stdout
