"""Load and connection admission: many clients at once, and ``max_connections``.

* 1,500 connections open at once, each sending a request, all get their replies, from
  a server (a subprocess) started with the common soft open-file limit of 1024: it
  must raise its own limit towards the hard one to hold them, and does.
* A hard limit too low for ``max_connections`` is logged as a clear warning.
* Past ``max_connections``, a new connection is accepted and closed at once, lingering
  (the client sees the connection end, not a reset, even with a request written), and
  the refusals are logged at most once a second, with the count of those not logged.
  A slot freed by a session that ends is taken by the next client.
* Hostile decoding (issue 17): four attackers sending the worst payloads (colliding
  map keys, ZiProto and JSON amplification at the element limit and past it) get
  their error replies or their echoes, while a canary's requests are all answered
  (no stall of seconds: docs/security.md has the measured round trips) and the
  server's memory grows by less than 256 MiB. The packet memory budget refuses large
  packets that do not fit with ERR_PACKET_TOO_LARGE, never small ones, and is whole
  again once the sessions are gone.
"""

from __future__ import annotations

import logging
import re
import resource

import pytest
import trio

from asyncapy.config import ConfigError
from asyncapy.domain.limits import FREE_PACKET_SIZE, MAX_ELEMENTS
from asyncapy.server import Server
from benchmarks.hostile_decode import attack, frame, payloads
from fuzz import attacks

from ..conftest import serving
from .hostile_app import launch, open_file_limit
from .wire import Wire, json_error, json_packet, settle, zi_error

CLIENTS = 1500
MiB = 1 << 20
LIMIT_WARNING = re.compile(r"WARNING.*open-file limit \((\d+)")


@pytest.fixture
def many_files():
    """Let this test process hold :data:`CLIENTS` sockets and more (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = CLIENTS + 500
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"the hard open-file limit ({hard}) is below {wanted}: raise it (ulimit -Hn)")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_1500_concurrent_connections_all_get_their_replies(many_files):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A soft limit of 1024, as most shells give: too few for 1,500 connections unless
    # the server raises it itself.
    running, port = launch(timeout=30, max_connections=CLIENTS + 100, nofile_soft=1024)
    with running:
        server_limit = open_file_limit(running.process.pid)
        assert server_limit == hard if hard != resource.RLIM_INFINITY else server_limit > 1024
        connected = 0
        all_connected = trio.Event()
        answered = 0
        all_answered = trio.Event()
        replies: dict[int, bytes] = {}

        async def client(n: int) -> None:
            nonlocal connected, answered
            async with await Wire.connect("127.0.0.1", port) as wire:
                connected += 1
                if connected == CLIENTS:
                    all_connected.set()
                await all_connected.wait()  # every connection is open: now all ask
                await wire.send(json_packet({"client": n}))
                replies[n] = await wire.read_packet(timeout=15)
                answered += 1
                if answered == CLIENTS:
                    all_answered.set()
                await all_answered.wait()  # and none leaves before all were answered

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(CLIENTS):
                    nursery.start_soon(client, n)
        assert replies == {n: json_packet({"client": n}) for n in range(CLIENTS)}
        assert running.stop() == 0, running.output
    assert not running.matches(LIMIT_WARNING), running.output
    assert "Traceback" not in running.output
    assert "accept returned" not in running.output  # it never ran out of descriptors


def test_a_hard_limit_below_max_connections_is_a_clear_warning():
    running, _ = launch(max_connections=10_000, nofile_soft=256, nofile_hard=512)
    with running:
        # Raised as far as allowed: the soft limit is the hard one now...
        assert open_file_limit(running.process.pid) == 512
        [warning] = running.wait_for(LIMIT_WARNING)
        assert running.stop() == 0, running.output
    # ...and the warning says what caps what, and how to fix it.
    line = warning.string
    assert warning.group(1) == "512"
    assert "max_connections=10000" in line and "ulimit" in line


async def test_past_max_connections_new_connections_are_closed_at_once(make_echo, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_echo(max_connections=5)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "max_connections (5) reached" in r.getMessage()]

    async with serving(server) as (host, port):
        admitted = [await Wire.connect(host, port) for _ in range(5)]
        try:
            for n, wire in enumerate(admitted):
                assert await wire.request({"n": n}) == {"n": n}
            # Ten more, in a burst: each accepted and closed at once, with no reply. A
            # client writing a big request meanwhile is not reset: the close lingers,
            # reading what it sends until it is done.
            for n in range(10):
                async with await Wire.connect(host, port) as refused:
                    await refused.send(json_packet({"refused": n, "pad": "x" * MiB}))
                    await refused.read_eof(timeout=1)
            # One warning for the burst, not ten.
            [first] = refusals()
            assert first.levelno == logging.WARNING
            assert "127.0.0.1" in first.getMessage() and "more" not in first.getMessage()
            assert server._listening.connections == 5 and len(server._sessions.live) == 5
            # A second later, the next refusal is logged, counting the nine left out.
            await trio.sleep(1.05)
            async with await Wire.connect(host, port) as refused:
                await refused.read_eof(timeout=1)
            assert len(refusals()) == 2
            assert "9 more refused" in refusals()[1].getMessage()
            # Admitted sessions were never disturbed.
            for n, wire in enumerate(admitted):
                assert await wire.request({"again": n}) == {"again": n}
            # A session ends: its slot is free for the next client.
            await admitted.pop().aclose()
            await settle()
            async with await Wire.connect(host, port) as newcomer:
                assert await newcomer.request({"new": 1}) == {"new": 1}
        finally:
            for wire in admitted:
                await wire.aclose()
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_refusals_not_yet_logged_are_counted_at_shutdown(make_echo, caplog):
    server = make_echo(max_connections=1)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as admitted:
            assert await admitted.request({"n": 1}) == {"n": 1}
            for _ in range(3):
                async with await Wire.connect(host, port) as refused:
                    await refused.read_eof(timeout=1)
    messages = [r.getMessage() for r in caplog.records if "max_connections (1)" in r.getMessage()]
    assert len(messages) == 2 and "2 more refused" in messages[1]


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", None])
def test_max_connections_is_validated(value):
    with pytest.raises(ConfigError, match="max_connections"):
        Server(max_connections=value)


# -- hostile decoding -------------------------------------------------------------------
def test_attackers_get_their_replies_and_neither_stall_nor_bloat_the_server():
    # The defaults (max_packet_size 1 MiB), but a budget whose quarter for one address
    # (the six attackers share 127.0.0.1) holds their packets at once: what is tested
    # here is the decoder's work per packet; the shares are test_fair_share.py's.
    # max_protocol_errors off too: an attacker sending nothing but refused packets for
    # 6 s comes near the default 100 in a row, and its session would be closed for that
    # (by design, and not what is tested here).
    running, port = launch(timeout=30, max_packet_memory=1 << 30, max_protocol_errors=0)
    with running:
        packets = payloads(1 << 20, MAX_ELEMENTS)
        # Past the element limit: refused when the decoder reaches it.
        packets["ziproto past the limit"] = frame(attacks.ziproto_arrays(MAX_ELEMENTS + 6), 1)
        result = trio.run(attack, port, running.process.pid, packets, 6, 6.0)
        # Every canary request was answered, in order and intact (attack() checks
        # each reply); none waited seconds behind the attackers' packets.
        assert len(result["rtts"]) > 20 and max(result["rtts"]) < 2.0, result["rtts"]
        replies = result["replies"]
        outcomes = {kind: {outcome for (k, outcome) in replies if k == kind} for kind in packets}
        assert outcomes["colliding keys"] == {"ERR_REQUEST_MALFORMED"}
        assert outcomes["ziproto past the limit"] == {"ERR_REQUEST_MALFORMED"}
        for kind in ("ziproto [[]...]", "ziproto [{}...]", "json [[]...]", "json [{}...]"):
            assert outcomes[kind] == {f"echo ({len(packets[kind]) if kind.startswith('ziproto') else len(_json_echo(packets[kind]))} bytes)"}, (kind, outcomes)
        growth = result["peak"] - result["baseline"]
        assert growth < 256 * MiB, f"the server grew by {growth / MiB:.0f} MiB"
        # And it serves as before.
        async def ask() -> None:
            async with await Wire.connect("127.0.0.1", port) as wire:
                assert await wire.request({"after": 1}) == {"after": 1}

        trio.run(ask)
        assert running.stop() == 0, running.output
    assert "Traceback" not in running.output


def _json_echo(packet: bytes) -> bytes:
    """The echo of a JSON attack packet: json.dumps writes ", " between items."""
    return frame(packet[6:].replace(b",", b", ").replace(b'{"a": [', b'{"a": ['), 0)


async def test_large_packets_past_the_memory_budget_are_refused_and_small_ones_are_not(make_echo):
    # 32 MiB of budget, a quarter of it (8 MiB) for one client address. A large packet
    # is charged as its bytes arrive, five times each (the byte, and four for the
    # strings it may decode to), never from its declared length alone.
    server = make_echo(max_packet_memory=32 * MiB, buf=65536)
    memory = server._sessions.packet_memory
    big = json_packet({"blob": "x" * (MiB - 20)})
    half = MiB // 2
    async with serving(server) as (host, port):
        halves = [await Wire.connect(host, port) for _ in range(4)]
        for wire in halves[:3]:  # 3 x 2.5 MiB: within 127.0.0.1's 8 MiB
            await wire.send(big[:half])
        await settle()
        assert 3 * 5 * (half - 10) <= memory.used <= 3 * 5 * half
        await halves[3].send(big[:half])  # a fourth would pass 8 MiB: refused
        assert await halves[3].read_packet() == json_error("ERR_PACKET_TOO_LARGE")
        await halves[3].read_eof()
        async with await Wire.connect(host, port) as small:  # small packets never count
            for n in range(3):
                assert (await small.request({"n": n, "pad": "y" * (FREE_PACKET_SIZE - 100)}))["n"] == n
        other = await Wire.connect_from("127.0.0.2", host, port)  # another address: its own share
        await other.send(big)
        assert await other.read_packet() == big
        await other.aclose()
        for wire in halves[1:3]:  # two stall and leave: what they held is given back
            await wire.aclose()
        await halves[0].send(big[half:])  # now whole: 5 MiB, within the share
        assert await halves[0].read_packet() == big
        await halves[0].aclose()
        await halves[3].aclose()
        # The sessions ended (one of them refused with half a packet in): all given back.
        await settle()
        assert memory.used == 0 and memory.refusals == 1 and memory.peak < 32 * MiB


async def test_a_container_map_key_is_malformed_and_the_session_goes_on(make_echo):
    server = make_echo()
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(frame(attacks.colliding_keys(2000), 1))
            assert await wire.read_packet() == zi_error("ERR_REQUEST_MALFORMED")
            await wire.send(frame(b"\x81\x92\x01\x02\x01", 1))  # {[1, 2]: 1}
            assert await wire.read_packet() == zi_error("ERR_REQUEST_MALFORMED")
            await wire.send(frame(b"\x81\x01\x02", 1))  # {1: 2}: a scalar key is fine
            assert await wire.read_packet() == frame(b"\x81\x01\x02", 1)


async def test_the_default_max_packet_size_is_1_mib_and_the_old_one_is_a_setting(make_echo):
    big = json_packet({"blob": "x" * (2 * MiB)})
    async with serving(make_echo(buf=65536)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(big[:64])
            assert await wire.read_packet() == json_error("ERR_PACKET_TOO_LARGE")
    async with serving(make_echo(buf=65536, max_packet_size=16 * MiB)) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(big)
            assert await wire.read_packet(timeout=10) == big


async def test_max_packet_memory_from_a_config_file_applies(make_echo, tmp_path):
    ini = tmp_path / "app.ini"
    ini.write_text("[AsyncAPY]\nmax_packet_memory = 0\n")
    server = make_echo(buf=65536)
    server.config = str(ini)
    server.load_config()  # as `asyncapy run --config` does, after the app built it
    assert server.max_packet_memory == 0
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"small": "x" * 100}) == {"small": "x" * 100}
            await wire.send(json_packet({"large": "x" * (FREE_PACKET_SIZE + 1)}))
            assert await wire.read_packet() == json_error("ERR_PACKET_TOO_LARGE")
