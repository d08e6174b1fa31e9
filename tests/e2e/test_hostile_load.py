"""Load and connection admission: many clients at once, and ``max_connections``.

* 1,500 connections open at once, each sending a request, all get their replies, from
  a server (a subprocess) started with the common soft open-file limit of 1024: it
  must raise its own limit towards the hard one to hold them, and does.
* A hard limit too low for ``max_connections`` is logged as a clear warning.
* Past ``max_connections``, a new connection is accepted and closed at once, lingering
  (the client sees the connection end, not a reset, even with a request written), and
  the refusals are logged at most once a second, with the count of those not logged.
  A slot freed by a session that ends is taken by the next client.
"""

from __future__ import annotations

import logging
import re
import resource

import pytest
import trio

from asyncapy.config import ConfigError
from asyncapy.server import Server

from ..conftest import serving
from .hostile_app import launch, open_file_limit
from .wire import Wire, json_packet, settle

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
    refusals = lambda: [r for r in caplog.records if "max_connections (5) reached" in r.getMessage()]
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
            assert server._connections == 5 and len(server._sessions) == 5
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
