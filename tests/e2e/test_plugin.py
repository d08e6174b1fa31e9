"""The pytest plugin (``asyncapy.testing.plugin``) and its ``asyncapy_serve`` fixture.

The fixture runs a server on a real loopback socket inside the test's trio run; these
tests talk to it with the bundled :class:`~asyncapy.client.AsyncClient`. The plugin is
registered by the ``pytest11`` entry point, so a user's test file uses the fixture
without importing anything: a pytester run of such a file checks that.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import trio

from asyncapy import Client, Filters, Packet, Server
from asyncapy.client import AsyncClient
from asyncapy.testing import open_test_server

pytest_plugins = ["pytester"]


class Hooked(Server):
    """An echo server recording its hooks and the packets its slow handler finished."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("timeout", 5)
        super().__init__(**kwargs)
        self.log: list = []

        @self.add_handler(Filters.Fields(slow=None))
        async def slow(client: Client, packet: Packet) -> None:
            await trio.sleep(0.2)
            self.log.append(f"slow {packet['slow']} done")

        @self.add_handler()
        async def echo(client: Client, packet: Packet) -> None:
            await client.send(packet)

    async def setup(self) -> None:
        self.log.append("setup")

    async def shutdown(self) -> None:
        self.log.append("shutdown")


def test_the_plugin_is_registered_through_the_pytest11_entry_point(pytestconfig):
    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "asyncapy"]
    assert entry.value == "asyncapy.testing.plugin"
    assert pytestconfig.pluginmanager.hasplugin("asyncapy")


async def test_the_fixture_serves_on_a_free_loopback_port(asyncapy_serve):
    assert asyncapy_serve is open_test_server
    server = Hooked(port=8081)
    async with asyncapy_serve(server) as (host, port):
        assert host == "127.0.0.1" and 0 < port < 65536 and port != 8081
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"hello": "socket"}) == {"hello": "socket"}
            assert await client.request({"again": 1}) == {"again": 1}
    assert (server.addr, server.port) == ("127.0.0.1", 8081)  # restored


async def test_leaving_the_block_shuts_the_server_down_gracefully(asyncapy_serve):
    server = Hooked()
    async with asyncapy_serve(server) as (host, port):
        assert server.log == ["setup"]
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            await client.send({"slow": 1})
            await trio.sleep(0.05)  # the handler is running
    # The in-flight handler finished before shutdown(), and nothing listens any more.
    assert server.log == ["setup", "slow 1 done", "shutdown"]
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)


async def test_several_servers_side_by_side(asyncapy_serve):
    first, second = Hooked(), Hooked()
    async with asyncapy_serve(first) as (_, port_a), asyncapy_serve(second) as (_, port_b):
        assert port_a != port_b
        for port in (port_a, port_b):
            async with AsyncClient(tls=False, timeout=5) as client:
                await client.connect("127.0.0.1", port)
                assert await client.request({"port": port}) == {"port": port}


async def test_an_error_in_the_block_propagates_as_itself(asyncapy_serve):
    server = Hooked()
    with pytest.raises(KeyError, match="from the test"):
        async with asyncapy_serve(server):
            raise KeyError("from the test")
    assert server.log == ["setup", "shutdown"]


async def test_a_server_failing_to_start_raises_its_own_error(asyncapy_serve):
    class Broken(Server):
        async def setup(self) -> None:
            raise RuntimeError("no database")

    with pytest.raises(RuntimeError, match="no database"):
        async with asyncapy_serve(Broken()):
            pass  # pragma: no cover


# A user's test file, run by pytester: one test passes, one fails on purpose.
USER_TESTS = '''
"""A user's tests of their AsyncAPY app, with nothing imported from the test tooling."""

from asyncapy import Packet, Server
from asyncapy.client import AsyncClient

server = Server()


@server.add_handler()
async def hello(client, packet):
    name = packet.get("name", "world")
    await client.send(Packet({"greeting": f"hello, {name}"}, encoding=client.encoding))


async def test_hello(asyncapy_serve):
    async with asyncapy_serve(server) as (host, port):
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"name": "bob"}) == {"greeting": "hello, bob"}


async def test_a_wrong_expectation_fails(asyncapy_serve):
    async with asyncapy_serve(server) as (host, port):
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({}) == {"greeting": "bonjour"}
'''


def test_a_users_test_file_uses_the_fixture_without_importing_it(pytester):
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user_app=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_a_wrong_expectation_fails*", "*bonjour*"])
    result.stdout.no_fnmatch_line("*fixture 'asyncapy_serve' not found*")
