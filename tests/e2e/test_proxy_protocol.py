"""The PROXY protocol on the serving side (issue 13, item 3), over real sockets.

The server listens on 127.0.0.1 and trusts 127.0.0.2; clients play the proxy by
binding their sockets to 127.0.0.2 and writing the header themselves (built by hand in
tests/unit/test_proxy.py), or an untrusted peer by binding to 127.0.0.3. The address a
header names must be the client's everywhere: ``client.address``, ``session_limit``
(IPv6 by /64), ``Filters.Ip``, ``get_sessions()`` and the logs. Behind a real HAProxy:
tests/e2e/test_proxy_haproxy.py.
"""

from __future__ import annotations

import logging
import re
import ssl

import pytest
import trio
import trio.lowlevel

from asyncapy import Client, Filters, Packet
from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.config import ConfigError

from ..conftest import serving
from ..unit.test_proxy import inet, v2
from .wire import Wire, json_error, json_packet, settle

PROXY = "127.0.0.2"
STRANGER = "127.0.0.3"


def v1(source: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {destination} {port} 8081\r\n".encode()


def v2_for(source: str, port: int = 40000) -> bytes:
    if ":" in source:
        return v2(family=2, block=inet(source, "::1", port, 8081))
    return v2(block=inet(source, "127.0.0.1", port, 8081))


LOCAL = v2(command=0, family=0, transport=0)


async def connect_from(source: str, host: str, port: int) -> Wire:
    """A raw connection from ``source`` (a loopback address other than 127.0.0.1), each
    write its own segment (so a header written in pieces arrives in pieces)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    await sock.bind((source, 0))
    await sock.connect((host, port))
    return Wire(trio.SocketStream(sock))


async def closed_without_reply(wire: Wire, timeout: float = 3.0) -> None:
    """The server closed ``wire`` without writing a byte (an orderly close or a reset)."""
    with trio.fail_after(timeout):
        try:
            data = await wire.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return
    assert data == b"", f"expected the connection closed without a reply, got {data!r}"


def whoami_app(make_server, admin: str = "198.51.100.1", **settings):
    """A server behind a proxy at 127.0.0.2: ``{"who": 1}`` is answered with the
    client's address and the addresses of its sessions; ``{"admin": 1}`` only for
    ``admin`` (Filters.Ip), ``{"denied": ...}`` for everyone else."""
    settings.setdefault("proxy_protocol", True)
    settings.setdefault("trusted_proxies", [PROXY])
    server = make_server(**settings)

    @server.add_handler(Filters.Fields(admin=None) & Filters.Ip(admin))
    async def admin_only(client: Client, packet: Packet) -> None:
        await client.send(Packet({"admin": client.address}, "json"))

    @server.add_handler(Filters.Fields(admin=None) & ~Filters.Ip(admin))
    async def denied(client: Client, packet: Packet) -> None:
        await client.send(Packet({"denied": client.address}, "json"))

    @server.add_handler(Filters.Fields(who=None))
    async def whoami(client: Client, packet: Packet) -> None:
        sessions = await client.get_sessions()
        await client.send(
            Packet({"address": client.address, "sessions": sorted(s.client.address for s in sessions)}, "json")
        )

    return server


WHO = json_packet({"who": 1})


# -- the header's address is the client's ---------------------------------------------------
@pytest.mark.parametrize("make_header", [v1, v2_for], ids=["v1", "v2"])
async def test_the_header_at_every_byte_split_names_the_client(make_server, make_header):
    header = make_header("198.51.100.7")
    server = whoami_app(make_server)
    async with serving(server) as (host, port):
        for cut in range(1, len(header)):
            async with await connect_from(PROXY, host, port) as wire:
                await wire.send(header[:cut])
                await trio.sleep(0.002)
                await wire.send(header[cut:] + WHO)  # the request right behind the header
                assert await wire.read_json() == {"address": "198.51.100.7", "sessions": ["198.51.100.7"]}, cut
        # The whole header and the request byte by byte, in one connection.
        async with await connect_from(PROXY, host, port) as wire:
            for byte in header + WHO:
                await wire.send(bytes([byte]))
                await trio.lowlevel.checkpoint()
            assert (await wire.read_json())["address"] == "198.51.100.7"
        # Then the session goes on as any other.
        async with await connect_from(PROXY, host, port) as wire:
            await wire.send(header)
            for _ in range(3):
                assert (await wire.request({"who": 1}))["address"] == "198.51.100.7"


async def test_ipv6_and_mapped_clients_are_canonical(make_server):
    server = whoami_app(make_server)
    async with serving(server) as (host, port):
        for header, expected in [
            (v1("2001:DB8:0:0::7"), "2001:db8::7"),
            (v2_for("2001:db8::7"), "2001:db8::7"),
            (v2_for("::ffff:198.51.100.8"), "198.51.100.8"),  # an IPv4 client of a dual-stack proxy
        ]:
            async with await connect_from(PROXY, host, port) as wire:
                await wire.send(header + WHO)
                assert (await wire.read_json())["address"] == expected


async def test_session_limit_counts_the_clients_the_headers_name(make_server, caplog):
    caplog.set_level(logging.INFO, "asyncapy.server")
    server = whoami_app(make_server, session_limit=1)
    async with serving(server) as (host, port):
        first = await connect_from(PROXY, host, port)
        await first.send(v2_for("198.51.100.1") + WHO)
        assert await first.read_json() == {"address": "198.51.100.1", "sessions": ["198.51.100.1"]}
        # Another client through the same proxy: its own limit.
        second = await connect_from(PROXY, host, port)
        await second.send(v1("198.51.100.2") + WHO)
        assert await second.read_json() == {"address": "198.51.100.2", "sessions": ["198.51.100.2"]}
        # The first client again, through the same proxy: over its limit.
        again = await connect_from(PROXY, host, port)
        await again.send(v2_for("198.51.100.1", 40001))
        assert await again.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
        # IPv6 clients count by /64: two addresses of one /64 are one client.
        six = await connect_from(PROXY, host, port)
        await six.send(v2_for("2001:db8:1:2::1") + WHO)
        assert (await six.read_json())["address"] == "2001:db8:1:2::1"
        six_again = await connect_from(PROXY, host, port)
        await six_again.send(v1("2001:db8:1:2::ffff"))
        assert await six_again.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
        for wire in (first, second, again, six, six_again):
            await wire.aclose()
        await settle()
    text = caplog.text
    assert "Session started for 198.51.100.1" in text and "Session started for 198.51.100.2" in text
    assert "198.51.100.1 already holds 1 session(s): limit reached" in text
    assert "1 more connection(s) refused for session_limit" in text  # the /64's, within the second
    assert f"Session started for {PROXY}" not in text


async def test_filters_ip_sees_the_headers_address(make_server):
    server = whoami_app(make_server)
    async with serving(server) as (host, port):
        for source, expected in [("198.51.100.1", {"admin": "198.51.100.1"}), ("198.51.100.2", {"denied": "198.51.100.2"})]:
            async with await connect_from(PROXY, host, port) as wire:
                await wire.send(v2_for(source))
                assert await wire.request({"admin": 1}) == expected


async def test_a_header_without_a_client_address_is_served_as_unknown(make_server):
    """LOCAL (a health check), UNKNOWN: no client address, so none of the proxy's own
    either (a balancer on this host is 127.0.0.1, which an admin guard may allow):
    'unknown', which no Filters.Ip matches, one session_limit group for them all."""
    server = whoami_app(make_server, admin=PROXY)
    async with serving(server) as (host, port):
        async with await connect_from(PROXY, host, port) as wire:  # a health check's ping
            await wire.send(LOCAL + WHO)
            assert await wire.read_json() == {"address": "unknown", "sessions": ["unknown"]}
            assert await wire.request({"admin": 1}) == {"denied": "unknown"}
        async with await connect_from(PROXY, host, port) as wire:  # one that only closes
            await wire.send(LOCAL)
        async with await connect_from(PROXY, host, port) as wire:
            await wire.send(b"PROXY UNKNOWN\r\n" + WHO)
            assert (await wire.read_json())["address"] == "unknown"
            assert await wire.request({"admin": 1}) == {"denied": "unknown"}


async def test_headers_without_a_client_address_share_one_session_limit_group(make_server):
    server = whoami_app(make_server, session_limit=1)
    async with serving(server) as (host, port):
        async with await connect_from(PROXY, host, port) as first:
            await first.send(LOCAL + WHO)
            assert (await first.read_json())["address"] == "unknown"
            async with await connect_from(PROXY, host, port) as second:
                await second.send(b"PROXY UNKNOWN\r\n" + WHO)
                assert await second.read_json() == {"status": "failure", "error": "ERR_SESSION_LIMIT_REACHED"}
            async with await connect_from(PROXY, host, port) as named:  # a real client is not in it
                await named.send(v1("198.51.100.7") + WHO)
                assert (await named.read_json())["address"] == "198.51.100.7"


@pytest.mark.parametrize("trusted", ["0.0.0.0/0", "::/0", "0.0.0.0/1,128.0.0.0/1", "::ffff:0:0/96"])
def test_trusting_every_address_is_refused_unless_acknowledged(make_server, trusted):
    with pytest.raises(ConfigError, match="cover every IPv[46] address.*insecure_trust_any_proxy"):
        make_server(proxy_protocol=True, trusted_proxies=trusted)
    server = make_server(proxy_protocol=True, trusted_proxies=trusted, insecure_trust_any_proxy=True)
    assert server.insecure_trust_any_proxy


def test_trusting_a_wide_network_that_is_not_everything_is_accepted(make_server):
    make_server(proxy_protocol=True, trusted_proxies="0.0.0.0/1,10.0.0.0/8")


# -- who is believed -------------------------------------------------------------------------
async def test_an_untrusted_peer_is_closed_without_reply_and_logged_once_a_second(make_server, caplog):
    caplog.set_level(logging.INFO, "asyncapy.server")
    server = whoami_app(make_server)
    async with serving(server) as (host, port):
        for _ in range(5):
            # A valid header naming the admin: never believed from this peer.
            wire = await connect_from(STRANGER, host, port)
            await wire.send(v2_for("198.51.100.1") + json_packet({"admin": 1}))
            await closed_without_reply(wire)
            await wire.aclose()
        # Without a header: the same (a direct client behind the balancer's back).
        wire = await connect_from(STRANGER, host, port)
        await wire.send(WHO)
        await closed_without_reply(wire)
        await wire.aclose()
        assert not server._sessions.live and server._listening.connections == 0
        # The trusted proxy is served meanwhile.
        async with await connect_from(PROXY, host, port) as wire:
            await wire.send(v1("198.51.100.9") + WHO)
            assert (await wire.read_json())["address"] == "198.51.100.9"
    refused = [r.getMessage() for r in caplog.records if "not a trusted proxy" in r.getMessage()]
    assert refused == [
        f"PROXY protocol: refused a connection from {STRANGER}, not a trusted proxy (trusted_proxies: {PROXY})"
    ]
    assert "PROXY protocol: 5 more connection(s) from untrusted peers refused since the last such warning" in caplog.text
    assert "Session started for 198.51.100.1" not in caplog.text and f"for {STRANGER}" not in caplog.text


async def test_trusted_networks_and_the_start_line(make_server, caplog):
    caplog.set_level(logging.INFO, "asyncapy.server")
    server = whoami_app(make_server, trusted_proxies="127.0.0.0/30, fd00::/8")
    async with serving(server) as (host, port):
        for source in ("127.0.0.2", "127.0.0.3"):  # both in 127.0.0.0/30
            async with await connect_from(source, host, port) as wire:
                await wire.send(v1("198.51.100.4") + WHO)
                assert (await wire.read_json())["address"] == "198.51.100.4"
        async with await connect_from("127.0.0.4", host, port) as wire:
            await wire.send(v1("198.51.100.4") + WHO)
            await closed_without_reply(wire)
    assert "PROXY protocol on: every connection starts with a PROXY header from a trusted proxy (127.0.0.0/30, fd00::/8)" in caplog.text


# -- bad headers close only their connection -------------------------------------------------
BAD_HEADERS = {
    "no header": WHO,
    "malformed v1": b"PROXY TCP4 198.51.100.1 127.0.0.1 040000 8081\r\n" + WHO,
    "lone LF": b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 8081\n" + WHO,
    "v1 without end": b"PROXY TCP4 " + b"1" * 200,
    "oversized v2": v2(block=inet("198.51.100.1", "127.0.0.1", 1, 2) + b"\x00" * 5000),
    "bad v2 family": v2(family=7, block=inet("198.51.100.1", "127.0.0.1", 1, 2)) + WHO,
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def test_bad_headers_close_only_their_connection_while_a_canary_is_served(make_server, caplog):
    caplog.set_level(logging.INFO, "asyncapy.server")
    server = whoami_app(make_server, timeout=1)
    async with serving(server) as (host, port):
        canary = await connect_from(PROXY, host, port)
        await canary.send(v2_for("198.51.100.50") + WHO)
        assert (await canary.read_json())["address"] == "198.51.100.50"
        for name, data in BAD_HEADERS.items():
            wire = await connect_from(PROXY, host, port)
            try:
                await wire.send(data)
            except trio.BrokenResourceError:
                pass  # closed while still sending: closed all the same
            await closed_without_reply(wire)
            await wire.aclose()
            assert (await canary.request({"who": 1}))["address"] == "198.51.100.50", name
        # A header cut by the peer closing, and one trickling until the deadline
        # (min(timeout, 5 s) = 1 s here), beside the canary.
        cut = await connect_from(PROXY, host, port)
        await cut.send(v2_for("198.51.100.1")[:20])
        await cut.stream.send_eof()
        await closed_without_reply(cut)
        trickler = await connect_from(PROXY, host, port)
        start = trio.current_time()
        for byte in v1("198.51.100.1"):
            try:
                await trickler.send(bytes([byte]))
            except trio.BrokenResourceError:
                break  # closed at the deadline
            await trio.sleep(0.2)
            assert (await canary.request({"who": 1}))["address"] == "198.51.100.50"
        await closed_without_reply(trickler)
        assert 0.9 <= trio.current_time() - start < 3
        for wire in (cut, trickler, canary):
            await wire.aclose()
    warnings = [r.getMessage() for r in caplog.records if "PROXY protocol: closed a connection" in r.getMessage()]
    assert warnings[0].startswith(f"PROXY protocol: closed a connection from proxy {PROXY}: the connection does not start with a PROXY header")
    # Logged at most once a second, every one counted: the lines, the counts they
    # carry, and the count reported when the server stopped.
    counted = len(warnings) + sum(int(n) for n in re.findall(r"\((\d+) more closed alike since\)", caplog.text))
    counted += sum(int(n) for n in re.findall(r"(\d+) more connection\(s\) without a valid PROXY header", caplog.text))
    assert counted == len(BAD_HEADERS) + 2
    assert "no complete PROXY header within 1s" in caplog.text
    assert "Session started for 198.51.100.1" not in caplog.text


async def test_a_trickled_header_still_within_the_deadline_is_served(make_server):
    server = whoami_app(make_server, timeout=2)
    async with serving(server) as (host, port):
        async with await connect_from(PROXY, host, port) as wire:
            header = v2_for("198.51.100.3")
            for piece in (header[:5], header[5:17], header[17:]):
                await wire.send(piece)
                await trio.sleep(0.3)
            assert await wire.request({"who": 1}) == {"address": "198.51.100.3", "sessions": ["198.51.100.3"]}


async def test_a_trickling_header_holds_a_max_connections_slot_until_its_deadline(make_server):
    server = whoami_app(make_server, timeout=1, max_connections=1)
    async with serving(server) as (host, port):
        trickler = await connect_from(PROXY, host, port)
        await trickler.send(LOCAL[:3])
        await settle()
        assert server._listening.connections == 1
        refused = await connect_from(PROXY, host, port)  # past max_connections meanwhile
        await refused.send(v2_for("198.51.100.2") + WHO)
        await closed_without_reply(refused)
        await closed_without_reply(trickler)  # at its deadline
        await settle()
        async with await connect_from(PROXY, host, port) as wire:
            await wire.send(v2_for("198.51.100.2") + WHO)
            assert (await wire.read_json())["address"] == "198.51.100.2"
        for wire in (trickler, refused):
            await wire.aclose()


# -- TLS behind the header -------------------------------------------------------------------
async def test_tls_behind_a_proxy_header(make_server, tls_files, ca, caplog):
    caplog.set_level(logging.INFO, "asyncapy.server")
    server = whoami_app(make_server, certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with serving(server) as (host, port):
        for header in (v1("198.51.100.11"), v2_for("2001:db8::11"), LOCAL):
            plain = await connect_from(PROXY, host, port)
            await plain.send(header)  # the header precedes the ClientHello, in the clear
            tls = trio.SSLStream(plain.stream, context, server_hostname="127.0.0.1")
            wire = Wire(tls)
            await wire.send(WHO)  # handshakes first
            expected = {v1("198.51.100.11"): "198.51.100.11", LOCAL: "unknown"}.get(header, "2001:db8::11")
            assert await wire.read_json() == {"address": expected, "sessions": [expected]}
            await wire.aclose()
        # The header and the ClientHello in one segment: the hello is left for TLS.
        sock = trio.socket.socket()
        await sock.bind((PROXY, 0))
        await sock.connect((host, port))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls_object = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            tls_object.do_handshake()
        await sock.send(v1("198.51.100.12") + outgoing.read())
        # Finished by hand, with the same TLS object, over the raw socket.
        with trio.fail_after(5):
            while True:
                incoming.write(await sock.recv(65536))
                try:
                    tls_object.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await sock.send(outgoing.read())
            await sock.send(outgoing.read())
            tls_object.write(WHO)
            await sock.send(outgoing.read())
            reply = b""
            while len(reply) < 4 or len(reply) < 4 + int.from_bytes(reply[:4], "big"):
                try:
                    reply += tls_object.read(65536)
                except ssl.SSLWantReadError:
                    incoming.write(await sock.recv(65536))
        assert b'"address": "198.51.100.12"' in reply
        sock.close()
    assert "TLS handshake" not in caplog.text


async def test_a_failed_tls_handshake_behind_a_header_is_logged_with_the_client(make_server, tls_files, caplog):
    caplog.set_level(logging.INFO, "asyncapy.server")
    server = whoami_app(make_server, certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    async with serving(server) as (host, port):
        async with await connect_from(PROXY, host, port) as wire:
            await wire.send(v1("198.51.100.13") + b"\x16\x03\x01\x00\x05hello")
            await closed_without_reply(wire)
    assert "TLS handshake with 198.51.100.13 failed" in caplog.text


# -- off by default ----------------------------------------------------------------------------
async def test_without_proxy_protocol_a_header_is_just_garbage(make_server):
    server = whoami_app(make_server, proxy_protocol=False, trusted_proxies=[])
    async with serving(server) as (host, port):
        async with await connect_from(PROXY, host, port) as wire:
            await wire.send(WHO)
            assert (await wire.read_json())["address"] == PROXY  # served as itself
        async with await connect_from(PROXY, host, port) as wire:
            await wire.send(v1("198.51.100.1") + WHO)
            reply = await wire.read_packet()
            assert b"ERR_" in reply  # never believed: the header is no packet


async def test_one_store_two_servers_behind_the_same_proxy_count_together(make_server):
    store = MemorySessionStore()
    first, second = (whoami_app(make_server, session_limit=1, store=store) for _ in range(2))
    async with serving(first) as (host, port_a), serving(second) as (_, port_b):
        a = await connect_from(PROXY, host, port_a)
        await a.send(v2_for("198.51.100.20") + WHO)
        assert (await a.read_json())["sessions"] == ["198.51.100.20"]
        b = await connect_from(PROXY, host, port_b)
        await b.send(v1("198.51.100.20"))
        assert await b.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
        for wire in (a, b):
            await wire.aclose()
