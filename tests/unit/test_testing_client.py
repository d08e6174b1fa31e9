"""``asyncapy.testing.open_test_client``: a server's whole session pipeline, in-process.

Admission and ``session_limit``, framing, filters, groups, propagation, sessions and
``get_sessions``, the sticky encoding, error replies, idle timeouts, lifespan hooks,
and the test client's own contract: its address, its exit, its errors, no pytest
needed to import it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import trio

from asyncapy import Client, Filters, Packet, Server
from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.testing import TestClient, open_test_client


def failure(code: str) -> dict:
    """The payload of an error reply."""
    return {"status": "failure", "error": code}


def make_server(**kwargs) -> Server:
    """A server that is never bound: the test client needs no port."""
    kwargs.setdefault("timeout", 5)
    return Server(**kwargs)


def echo_server(**kwargs) -> Server:
    """A server that echoes every packet (in the session's encoding)."""
    server = make_server(**kwargs)

    @server.add_handler()
    async def echo(client: Client, packet: Packet) -> None:
        await client.send(packet)

    return server


def reply(client: Client, fields: dict) -> Packet:
    """A packet of ``fields`` in the session's encoding."""
    return Packet(fields, encoding=client.encoding)


# -- the basics ------------------------------------------------------------------------
async def test_echo_of_a_dict_a_json_string_and_a_packet():
    async with open_test_client(echo_server()) as client:
        assert await client.request({"n": 1, "text": "hé"}) == {"n": 1, "text": "hé"}
        assert await client.request('{"n": 2}') == {"n": 2}
        assert await client.request(Packet({"n": 3}, encoding="json")) == {"n": 3}


async def test_many_packets_and_a_pipelined_batch_on_one_session():
    async with open_test_client(echo_server()) as client:
        for n in range(50):
            await client.send({"n": n})
        for n in range(50):
            assert await client.receive() == {"n": n}


async def test_the_server_never_listens():
    server = echo_server()
    async with open_test_client(server) as client:
        assert await client.request({"ping": 1}) == {"ping": 1}
    assert server.addresses == []


async def test_a_payload_that_is_not_an_object_is_refused_before_sending():
    async with open_test_client(echo_server()) as client:
        with pytest.raises(ValueError, match="JSON object"):
            await client.send("[1, 2]")
        assert not client.connected


async def test_the_servers_framing_is_spoken():
    server = echo_server(header_size=2, byteorder="little")
    async with open_test_client(server) as client:
        await client.send({"a": 1})
        raw = await client.receive_raw()
        assert raw[:2] == (len(raw) - 2).to_bytes(2, "little")
        assert json.loads(raw[4:]) == {"a": 1}


# -- dispatch ----------------------------------------------------------------------------
def dispatch_server(log: list) -> Server:
    """Groups -1, 0 and 1; in group 0 a handler that stops propagation, then a
    filtered one. Every handler call is appended to ``log``."""
    server = make_server()

    @server.add_handler(group=-1)
    async def audit(client: Client, packet: Packet) -> None:
        log.append(("audit", dict(packet)))

    @server.add_handler(Filters.Fields(op="stop"))
    async def stop(client: Client, packet: Packet) -> None:
        log.append(("stop", packet["op"]))
        await client.send(reply(client, {"stopped": True}))
        packet.stop_propagation()

    @server.add_handler(Filters.Fields(op=None))
    async def operation(client: Client, packet: Packet) -> None:
        log.append(("operation", packet["op"]))
        await client.send(reply(client, {"done": packet["op"]}))

    @server.add_handler(group=1)
    async def after(client: Client, packet: Packet) -> None:
        log.append(("after", dict(packet)))
        await client.send(reply(client, {"after": True}))

    return server


async def test_groups_run_in_order_and_the_first_matching_handler_wins():
    log: list = []
    async with open_test_client(dispatch_server(log)) as client:
        assert await client.request({"op": "add"}) == {"done": "add"}
        assert await client.receive() == {"after": True}
    assert log == [("audit", {"op": "add"}), ("operation", "add"), ("after", {"op": "add"})]


async def test_stop_propagation_keeps_the_packet_from_later_groups_but_not_the_session():
    log: list = []
    async with open_test_client(dispatch_server(log)) as client:
        assert await client.request({"op": "stop"}) == {"stopped": True}
        assert await client.request({"op": "add"}) == {"done": "add"}
        assert await client.receive() == {"after": True}
    assert [name for name, _ in log] == ["audit", "stop", "audit", "operation", "after"]


async def test_a_packet_no_filter_lets_through_reaches_only_the_other_groups():
    log: list = []
    async with open_test_client(dispatch_server(log)) as client:
        assert await client.request({"other": 1}) == {"after": True}
    assert [name for name, _ in log] == ["audit", "after"]


async def test_no_matching_handler_sends_nothing():
    server = make_server()

    @server.add_handler(Filters.Fields(wanted=None))
    async def wanted(client: Client, packet: Packet) -> None:
        await client.send(reply(client, {"ok": True}))

    async with open_test_client(server, timeout=0.2) as client:
        await client.send({"unwanted": 1})
        with pytest.raises(TimeoutError, match="0.2s"):
            await client.receive()
        assert await client.request({"wanted": 1}) == {"ok": True}


async def test_a_handler_that_raises_gets_err_internal_and_the_session_goes_on():
    server = echo_server()

    @server.add_handler(Filters.Fields(boom=None), group=-1)
    async def boom(client: Client, packet: Packet) -> None:
        raise RuntimeError("handler bug")

    async with open_test_client(server) as client:
        assert await client.request({"boom": 1}) == failure("ERR_INTERNAL")
        assert await client.request({"fine": 1}) == {"fine": 1}


async def test_a_handler_closing_the_session_ends_it():
    server = make_server()

    @server.add_handler()
    async def bye(client: Client, packet: Packet) -> None:
        await client.send(reply(client, {"bye": True}), close=True)

    async with open_test_client(server) as client:
        assert await client.request({"hi": 1}) == {"bye": True}
        assert await client.receive_raw() == b""
        with pytest.raises(ConnectionError, match="closed"):
            await client.receive()


# -- the client's address ----------------------------------------------------------------
def ip_server() -> Server:
    """Answers ``allowed`` to 2001:db8::/32 and 10.0.0.0/8, ``denied`` to the rest,
    with the address the server saw."""
    server = make_server()

    @server.add_handler(Filters.Ip(["2001:db8::/32", "10.0.0.0/8"]))
    async def allowed(client: Client, packet: Packet) -> None:
        await client.send(reply(client, {"allowed": client.address}))

    @server.add_handler()
    async def denied(client: Client, packet: Packet) -> None:
        await client.send(reply(client, {"denied": client.address}))

    return server


async def test_ip_filters_see_the_address_the_test_sets():
    server = ip_server()
    async with open_test_client(server) as local:
        assert await local.request({}) == {"denied": "127.0.0.1"}
    async with open_test_client(server, address="2001:db8::7") as remote:
        assert await remote.request({}) == {"allowed": "2001:db8::7"}


async def test_the_address_is_settable_until_the_client_connects():
    async with open_test_client(ip_server()) as client:
        client.address = "2001:DB8:0::1"
        assert client.address == "2001:db8::1"  # normalised as a socket's peer would be
        assert await client.request({}) == {"allowed": "2001:db8::1"}
        with pytest.raises(RuntimeError, match="before the first send"):
            client.address = "10.1.2.3"
        assert client.address == "2001:db8::1"


async def test_an_ipv4_mapped_address_is_seen_as_ipv4():
    async with open_test_client(ip_server(), address="::ffff:10.1.2.3") as client:
        assert client.address == "10.1.2.3"
        assert await client.request({}) == {"allowed": "10.1.2.3"}


async def test_the_session_store_sees_the_address_group():
    """The store counts an IPv6 client under its /64 (session_limit_ipv6_prefix), and
    an IPv4 one under its own address; the handlers see the address itself."""
    server = echo_server()
    async with open_test_client(server, address="2001:db8::9") as client:
        await client.connect()
        records = await server.store.sessions("2001:db8::/64")
        assert [r.address for r in records] == ["2001:db8::/64"]
        assert await server.store.sessions("2001:db8::9") == []
        assert await server.store.sessions("127.0.0.1") == []
    server = echo_server()
    server.session_limit_ipv6_prefix = 128
    async with open_test_client(server, address="2001:db8::9") as client:
        await client.connect()
        records = await server.store.sessions("2001:db8::9")
        assert [r.address for r in records] == ["2001:db8::9"]


async def test_an_address_that_is_not_a_string_is_refused_at_once():
    with pytest.raises(ValueError, match="address"):
        async with open_test_client(echo_server(), address=None):  # type: ignore[arg-type]
            pass  # pragma: no cover


# -- sessions ----------------------------------------------------------------------------
def sessions_server(**kwargs) -> Server:
    """Answers every packet with the live sessions of the client's address."""
    server = make_server(**kwargs)

    @server.add_handler()
    async def sessions(client: Client, packet: Packet) -> None:
        live = await client.get_sessions()
        await client.send(
            reply(client, {"count": len(live), "mine": str(client.session), "ids": sorted(map(str, live))})
        )

    return server


async def test_get_sessions_lists_the_sessions_of_the_clients_address():
    server = sessions_server()
    async with open_test_client(server) as first, open_test_client(server) as second:
        async with open_test_client(server, address="203.0.113.5") as elsewhere:
            await first.connect()  # sessions open on connect, or on the first send
            await second.connect()
            one = await first.request({})
            two = await second.request({})
            other = await elsewhere.request({})
            assert one["count"] == two["count"] == 2
            assert one["ids"] == two["ids"] == sorted([one["mine"], two["mine"]])
            assert one["mine"] != two["mine"]
            assert other["count"] == 1 and other["ids"] == [other["mine"]]
        await second.aclose()  # waits for the server to end the session
        assert (await first.request({}))["ids"] == [one["mine"]]


async def test_each_session_gets_a_fresh_uuid4():
    server = sessions_server()
    ids = set()
    for _ in range(3):
        async with open_test_client(server) as client:
            mine = (await client.request({}))["mine"]
            assert len(mine) == 36 and mine[14] == "4"
            ids.add(mine)
    assert len(ids) == 3


async def test_session_limit_refuses_the_third_client_of_an_address():
    server = sessions_server(session_limit=2)
    async with open_test_client(server) as a, open_test_client(server) as b:
        async with open_test_client(server) as c, open_test_client(server, address="10.9.9.9") as d:
            await a.connect()
            await b.connect()
            await c.connect()
            await d.connect()
            assert (a.admitted, b.admitted, c.admitted, d.admitted) == (True, True, False, True)
            assert await c.receive() == failure("ERR_SESSION_LIMIT_REACHED")
            assert await c.receive_raw() == b""
            assert (await a.request({}))["count"] == 2
            assert (await d.request({}))["count"] == 1
        await a.aclose()
        async with open_test_client(server) as e:
            assert (await e.request({}))["count"] == 2  # a's place is free again
            assert e.admitted


async def test_the_limit_reply_reaches_a_client_that_already_sent_a_request():
    server = sessions_server(session_limit=1)
    async with open_test_client(server) as first, open_test_client(server) as second:
        await first.connect()
        assert await second.request({"please": 1}) == failure("ERR_SESSION_LIMIT_REACHED")
        assert await second.receive_raw() == b""


async def test_an_unreachable_store_refuses_with_err_unavailable():
    class DownStore(MemorySessionStore):
        async def admit(self, record, limit):
            raise StoreUnavailable("redis is down")

    async with open_test_client(echo_server(store=DownStore())) as client:
        assert await client.request({"x": 1}) == failure("ERR_UNAVAILABLE")
        assert client.admitted is False
        assert await client.receive_raw() == b""


async def test_sessions_are_released_when_the_block_ends():
    server = echo_server()
    async with open_test_client(server, address="10.0.0.1") as client:
        await client.connect()
        assert len(await server.store.sessions("10.0.0.1")) == 1
    assert await server.store.sessions("10.0.0.1") == []
    assert server._sessions.live == {}


# -- encodings ---------------------------------------------------------------------------
async def test_a_ziproto_client_gets_ziproto_replies():
    async with open_test_client(echo_server(), encoding="ziproto") as client:
        await client.send({"foo": "bar"})
        raw = await client.receive_raw()
        assert raw == bytes.fromhex("0000000b1601") + bytes.fromhex("81a3666f6fa3626172")


async def test_the_first_packet_fixes_the_session_encoding():
    async with open_test_client(echo_server()) as client:
        assert await client.request({"first": "json"}) == {"first": "json"}
        await client.send({"then": "ziproto"}, encoding="ziproto")
        raw = await client.receive_raw()
        assert raw[5] == 0  # echoed in the session's encoding, JSON
        assert json.loads(raw[6:]) == {"then": "ziproto"}


# -- error replies -----------------------------------------------------------------------
async def test_a_malformed_payload_is_answered_and_the_session_goes_on():
    async with open_test_client(echo_server()) as client:
        await client.send_raw(b"\x00\x00\x00\x04\x16\x00{]")
        assert await client.receive() == failure("ERR_REQUEST_MALFORMED")
        await client.send_raw(b"\x00\x00\x00\x04\x15\x00{}")
        assert await client.receive() == failure("ERR_HEADER_INVALID")
        assert await client.request({"still": "here"}) == {"still": "here"}


async def test_an_unframeable_content_length_closes_the_session():
    async with open_test_client(echo_server()) as client:
        await client.send_raw(b"\x00\x00\x00\x01\x16")
        assert await client.receive() == failure("ERR_REQUEST_MALFORMED")
        assert await client.receive_raw() == b""


async def test_a_packet_too_large_closes_the_session():
    async with open_test_client(echo_server(max_packet_size=64)) as client:
        await client.send({"big": "x" * 100})
        assert await client.receive() == failure("ERR_PACKET_TOO_LARGE")
        assert await client.receive_raw() == b""


async def test_an_idle_session_times_out():
    async with open_test_client(echo_server(timeout=0.3)) as client:
        start = trio.current_time()
        assert await client.request({"alive": 1}) == {"alive": 1}
        assert await client.receive() == failure("ERR_TIMED_OUT")
        assert 0.3 <= trio.current_time() - start < 2
        assert await client.receive_raw() == b""


async def test_a_packet_trickling_in_does_not_keep_the_session_alive():
    async with open_test_client(echo_server(timeout=0.3)) as client:
        packet = b'\x00\x00\x00\x10\x16\x00{"foo": "bar"}'
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):  # the server hung up mid-packet
            for byte in packet[:-1]:
                await client.send_raw(bytes([byte]))
                await trio.sleep(0.05)
        assert trio.current_time() - start < 0.05 * (len(packet) - 1)
        assert await client.receive() == failure("ERR_TIMED_OUT")


async def test_a_half_closed_client_still_gets_its_replies():
    async with open_test_client(echo_server()) as client:
        await client.send({"n": 1})
        await client.send({"n": 2})
        await client.send_eof()
        assert await client.receive() == {"n": 1}
        assert await client.receive() == {"n": 2}
        assert await client.receive_raw() == b""


# -- lifespan ----------------------------------------------------------------------------
class Hooked(Server):
    """A server recording its hooks."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log: list = []

        @self.add_handler()
        async def status(client: Client, packet: Packet) -> None:
            await client.send(reply(client, {"log": self.log}))

    async def setup(self) -> None:
        self.log.append("setup")

    async def shutdown(self) -> None:
        self.log.append("shutdown")


async def test_lifespan_runs_setup_before_and_shutdown_after():
    server = Hooked()
    async with open_test_client(server, lifespan=True) as client:
        assert await client.request({}) == {"log": ["setup"]}
    assert server.log == ["setup", "shutdown"]


async def test_without_lifespan_no_hook_runs():
    server = Hooked()
    async with open_test_client(server) as client:
        assert await client.request({}) == {"log": []}
    assert server.log == []


async def test_lifespan_runs_shutdown_even_when_the_block_fails():
    server = Hooked()
    with pytest.raises(KeyError):
        async with open_test_client(server, lifespan=True):
            raise KeyError("test failure")
    assert server.log == ["setup", "shutdown"]


# -- the test client's own contract ----------------------------------------------------
async def test_an_error_in_the_block_propagates_as_itself_and_cancels_the_session():
    server = make_server()
    started = trio.Event()

    @server.add_handler()
    async def forever(client: Client, packet: Packet) -> None:
        started.set()
        await trio.sleep_forever()

    begin = trio.current_time()
    with pytest.raises(AssertionError, match="the test failed"):
        async with open_test_client(server) as client:
            await client.send({})
            await started.wait()
            raise AssertionError("the test failed")
    assert trio.current_time() - begin < 1  # no grace period for a failed test
    assert server._sessions.live == {}


async def test_leaving_the_block_lets_an_in_flight_handler_finish():
    server = make_server()
    finished = []

    @server.add_handler()
    async def slow(client: Client, packet: Packet) -> None:
        await trio.sleep(0.1)
        finished.append(packet["n"])

    async with open_test_client(server) as client:
        await client.send({"n": 1})
    assert finished == [1]


async def test_a_test_client_is_one_session():
    async with open_test_client(echo_server()) as client:
        assert not client.connected and client.admitted is None
        await client.connect()
        assert client.connected and client.admitted
        with pytest.raises(RuntimeError, match="already connected"):
            await client.connect()
    with pytest.raises(RuntimeError, match="closed"):
        await TestClient.connect(client)
    assert "TestClient(127.0.0.1, connected)" == repr(client)


async def test_a_server_that_served_and_stopped_can_be_tested_again():
    server = echo_server()
    server.addr, server.port = "127.0.0.1", 0
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        server.request_shutdown()
    assert server._sessions.stopping is not None and server._sessions.stopping.is_set()
    async with open_test_client(server) as client:
        assert await client.request({"again": 1}) == {"again": 1}


async def test_a_test_client_beside_a_serving_server_shares_its_sessions():
    from asyncapy.client import AsyncClient
    from asyncapy.testing import open_test_server

    server = sessions_server()
    async with open_test_server(server) as (host, port):
        async with AsyncClient(tls=False) as network, open_test_client(server) as local:
            await network.connect(host, port)
            assert (await network.request({}))["count"] == 1
            assert (await local.request({}))["count"] == 2


@pytest.fixture
async def echo_client():
    """A test client in an async fixture: its nursery lives in the fixture's task."""
    async with open_test_client(echo_server(), address="10.0.0.2") as client:
        yield client


async def test_a_test_client_from_an_async_fixture(echo_client):
    assert await echo_client.request({"from": "fixture"}) == {"from": "fixture"}
    assert echo_client.address == "10.0.0.2"


def test_it_runs_under_a_plain_trio_run():
    async def main() -> dict:
        async with open_test_client(echo_server()) as client:
            return await client.request({"plain": "trio"})

    assert trio.run(main) == {"plain": "trio"}


def test_importing_and_using_it_needs_no_pytest():
    program = textwrap.dedent(
        """
        import sys
        sys.modules["pytest"] = None   # any import of pytest now fails
        sys.modules["_pytest"] = None
        import trio
        from asyncapy import Server
        from asyncapy.testing import open_test_client

        server = Server()

        @server.add_handler()
        async def echo(client, packet):
            await client.send(packet)

        async def main():
            async with open_test_client(server) as client:
                print(await client.request({"no": "pytest"}))

        trio.run(main)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'no': 'pytest'}"
