"""The bundled examples, run as their docstrings tell a reader to run them.

Each example is driven by the bundled network client (:class:`asyncapy.client.AsyncClient`
in-process, :class:`asyncapy.client.Client` against subprocesses):

- in-process, over a real loopback socket (``tests.conftest.serving``), on a fresh
  application from the example's ``make_app()``: the module-level ``app`` objects are
  shared by every test, and an application's state (keys, notes, chat members) must
  not leak from one test into another;
- as real processes: ``python -m asyncapy run examples.X:app --port 0`` (the port the
  server logs is the one used), ``python -m examples.X 0``, the scale-out example with
  two workers against a real Redis, and keys issued by ``asyncapy keys`` into an SQLite file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import AsyncIterator, Callable, Optional

import pytest
import trio

from asyncapy import APIKeyFactory, Client, Packet
from asyncapy.adapters.sqlite import SQLiteKeyStore
from asyncapy.client import AsyncClient
from asyncapy.client import Client as BlockingClient
from asyncapy.filters import Filters
from asyncapy.testing import open_test_client
from examples import authenticated, chat, echo, scaleout
from tests.conftest import serving

from .processes import ROOT, Running, ask

PYTHON = sys.executable

UNAUTHORIZED = {"status": "failure", "error": "unauthorized"}
LIMIT_REACHED = {"status": "failure", "error": "ERR_SESSION_LIMIT_REACHED"}

SERVING_ONE = re.compile(r"AsyncAPY serving on 127\.0\.0\.1:(\d+) \(plain TCP\)")
"""The log line of a single-process server saying where it serves."""

EVENT_FIELDS = {"joined", "left", "from"}
"""The fields of a chat broadcast (as opposed to a reply to one's own request)."""


# -- helpers -------------------------------------------------------------------------------
@asynccontextmanager
async def connected(host: str, port: int, encoding: str = "json") -> AsyncIterator[AsyncClient]:
    """A bundled async client connected to ``host:port`` in plain TCP."""
    async with AsyncClient(tls=False, timeout=5, encoding=encoding) as client:
        await client.connect(host, port)
        yield client


async def nothing_more(client: AsyncClient, wait: float = 0.2) -> None:
    """Fail if ``client`` receives a packet within ``wait`` seconds."""
    with trio.move_on_after(wait):
        extra = await client.receive()
        pytest.fail(f"unexpected extra packet: {extra!r}")


def is_event(packet: dict) -> bool:
    """Whether ``packet`` is a chat broadcast rather than a reply."""
    return bool(EVENT_FIELDS & packet.keys())


async def chat_request(client: AsyncClient, payload: dict) -> tuple[dict, list[dict]]:
    """Send ``payload``; the reply, and the broadcasts that arrived before it."""
    await client.send(payload)
    events = []
    while True:
        packet = await client.receive()
        if not is_event(packet):
            return packet, events
        events.append(packet)


async def receive_until(client: AsyncClient, wanted: Callable[[dict], bool]) -> list[dict]:
    """Receive until a packet ``wanted`` accepts (the client's timeout applies); all of
    them, that one last."""
    seen = []
    while True:
        seen.append(await client.receive())
        if wanted(seen[-1]):
            return seen


def served_port(run: Running) -> int:
    """The port a single-process ``Running`` server logged it serves on."""
    return int(run.wait_for(SERVING_ONE, timeout=15)[0].group(1))


def run_python(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python ARGS...`` from the repository root, to completion."""
    return subprocess.run(
        [PYTHON, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


# -- echo ----------------------------------------------------------------------------------
async def test_echo_answers_in_the_session_encoding():
    """examples.echo: every packet comes back as it was, in JSON or in ZiProto."""
    async with serving(echo.app) as (host, port):
        for encoding, code in (("json", 0), ("ziproto", 1)):
            async with connected(host, port, encoding) as client:
                assert await client.request({"hello": "world", "n": [1, 2]}) == {"hello": "world", "n": [1, 2]}
                await client.send({"again": True})
                raw = await client.receive_raw()
                assert client._split_packet(raw)[2] == code  # Content-Encoding of the reply
                assert client._decode(raw) == {"again": True}
    assert (echo.app.addr, echo.app.port) == ("127.0.0.1", 8081)  # serving() restored them


def test_echo_served_by_asyncapy_run():
    """``python -m asyncapy run examples.echo:app``: what ``make run`` serves."""
    with Running.asyncapy("run", "examples.echo:app", "--port", "0") as run:
        port = served_port(run)
        assert ask(port, {"hello": "world"}) == {"hello": "world"}
        assert run.stop() == 0, run.output
    assert "Traceback" not in run.output


# -- authenticated --------------------------------------------------------------------------
async def test_authenticated_admin_issues_keys_and_holders_use_them():
    """The whole flow of examples.authenticated on one connection from 127.0.0.1."""
    app = authenticated.make_app(store="memory://")
    async with serving(app) as (host, port), connected(host, port) as client:
        key = (await client.request({"issue_key": {"user": "alice"}}))["key"]
        assert isinstance(key, str) and len(key) == 32
        assert await app.keys.aget(key) == {"user": "alice"}
        assert await client.request({"key": key}) == {"user": "alice"}
        assert await client.request({"key": key, "notes": True}) == {"notes": []}
        assert await client.request({"key": key, "note": "buy milk"}) == {"notes": 1}
        assert await client.request({"key": key, "note": "call bob"}) == {"notes": 2}
        assert await client.request({"key": key, "notes": True}) == {"notes": ["buy milk", "call bob"]}
        # A second key of the same user sees the same notes; another user has none.
        second = (await client.request({"issue_key": {"user": "alice"}}))["key"]
        other = (await client.request({"issue_key": {"user": "bob"}}))["key"]
        assert second != key
        assert await client.request({"key": second, "notes": True}) == {"notes": ["buy milk", "call bob"]}
        assert await client.request({"key": other, "notes": True}) == {"notes": []}
        # Refusals: the fallback of group 1.
        assert await client.request({"key": "not-a-key", "notes": True}) == UNAUTHORIZED
        assert await client.request({"key": 12345}) == UNAUTHORIZED
        assert await client.request({"notes": True}) == UNAUTHORIZED
        assert await client.request({"key": key, "what": 1}) == UNAUTHORIZED
        assert await client.request({"hello": "world"}) == UNAUTHORIZED
        # Bad input to a guarded handler is answered by that handler, once.
        bad_note = await client.request({"key": key, "note": "x" * 501})
        assert bad_note["status"] == "failure" and "note" in bad_note["error"]
        bad_user = await client.request({"issue_key": {"user": "no spaces allowed"}})
        assert bad_user["status"] == "failure" and "issue_key" in bad_user["error"]
        assert (await client.request({"issue_key": "alice"}))["status"] == "failure"
        assert app.notes == {"alice": ["buy milk", "call bob"]}
        await nothing_more(client)


async def test_authenticated_requests_get_exactly_one_reply_pipelined():
    """Stopping propagation keeps the fallback from answering a handled request too:
    pipelined requests get one reply each, in order, and nothing else."""
    app = authenticated.make_app(store="memory://")
    key = await app.keys.aissue({"user": "carol"})
    requests = [
        {"key": key},
        {"key": key, "note": "one"},
        {"key": "nope"},
        {"key": key, "notes": True},
        {"issue_key": {"user": "dave"}},
        {"unknown": True},
    ]
    async with serving(app) as (host, port), connected(host, port) as client:
        for request in requests:
            await client.send(request)
        replies = [await client.receive() for _ in requests]
        await nothing_more(client)
    assert replies[:4] == [{"user": "carol"}, {"notes": 1}, UNAUTHORIZED, {"notes": ["one"]}]
    assert set(replies[4]) == {"key"}
    assert replies[5] == UNAUTHORIZED


async def test_authenticated_admin_handlers_are_for_local_clients_only():
    """Filters.Ip("127.0.0.1") | Filters.Ip("::1"): both loopbacks are admins, another
    address is not, though its key holders are served."""
    app = authenticated.make_app(store="memory://")
    async with open_test_client(app, address="::1") as admin6:
        key = (await admin6.request({"issue_key": {"user": "erin"}}))["key"]
    async with open_test_client(app, address="10.1.2.3") as remote:
        assert await remote.request({"issue_key": {"user": "mallory"}}) == UNAUTHORIZED
        assert await remote.request({"revoke_key": key}) == UNAUTHORIZED
        assert await remote.request({"key": key}) == {"user": "erin"}
    async with serving(app, host="::1") as (host, port), connected(host, port) as admin:
        assert set(await admin.request({"issue_key": {"user": "frank"}})) == {"key"}


async def test_authenticated_revocation_takes_effect_at_once():
    """The admin revokes any key, a holder its own; either is refused on the next packet,
    on every connection."""
    app = authenticated.make_app(store="memory://")
    async with serving(app) as (host, port), connected(host, port) as admin, connected(host, port) as holder:
        first = (await admin.request({"issue_key": {"user": "gina"}}))["key"]
        second = (await admin.request({"issue_key": {"user": "gina"}}))["key"]
        assert await holder.request({"key": first}) == {"user": "gina"}
        assert await admin.request({"revoke_key": first}) == {"revoked": True}
        assert await holder.request({"key": first}) == UNAUTHORIZED
        assert await admin.request({"revoke_key": first}) == {"status": "failure", "error": "unknown key"}
        assert await admin.request({"revoke_key": 42}) == {"status": "failure", "error": "unknown key"}
        assert await holder.request({"key": second, "revoke": True}) == {"revoked": True}
        assert await holder.request({"key": second}) == UNAUTHORIZED
        assert await holder.request({"key": second, "revoke": True}) == UNAUTHORIZED
    assert not await app.keys.acontains(first) and not await app.keys.acontains(second)


async def test_authenticated_a_key_revoked_between_filter_and_handler_is_unauthorized():
    """The filter checked the key, then the key went: the handler's ``aget`` raises
    KeyError, and the request is refused rather than failing with ERR_INTERNAL."""
    app = authenticated.make_app(store="memory://")
    key = await app.keys.aissue({"user": "hank"})
    real_aget = app.keys.aget

    async def revoked_meanwhile(candidate):
        """Revoke ``candidate`` (as another session could), then look it up."""
        await app.keys.arevoke(candidate)
        return await real_aget(candidate)

    app.keys.aget = revoked_meanwhile
    async with open_test_client(app) as client:
        assert await client.request({"key": key}) == UNAUTHORIZED
        await nothing_more(client)


def test_authenticated_served_by_asyncapy_run_with_keys_in_redis(redis_url):
    """``ASYNCAPY_STORE=redis://... asyncapy run examples.authenticated:app``: the keys
    the admin issues are in Redis, where another process reads and revokes them."""
    command = [PYTHON, "-m", "asyncapy", "run", "examples.authenticated:app", "--port", "0"]
    with Running(command, env={"ASYNCAPY_STORE": redis_url}) as run:
        port = served_port(run)
        with BlockingClient(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            key = client.request({"issue_key": {"user": "ivy"}})["key"]
            assert client.request({"key": key}) == {"user": "ivy"}
            elsewhere = APIKeyFactory(store=redis_url)  # this test process: another process
            assert elsewhere.get(key) == {"user": "ivy"}
            elsewhere.revoke(key)
            assert client.request({"key": key}) == UNAUTHORIZED
        assert run.stop() == 0, run.output
    assert "Traceback" not in run.output
    assert key not in run.output  # keys are logged by fingerprint only


# -- chat ----------------------------------------------------------------------------------
async def test_chat_join_say_leave_are_broadcast_to_the_others():
    """Three members: each join, message and departure reaches the two others, and
    the sender gets the ``ok`` of group 1."""
    app = chat.make_app()
    async with serving(app) as (host, port):
        async with connected(host, port) as alice, connected(host, port) as bob, connected(host, port, "ziproto") as carol:
            assert await chat_request(alice, {"join": "alice"}) == ({"ok": True}, [])
            assert await chat_request(bob, {"join": "bob"}) == ({"ok": True}, [])
            assert await alice.receive() == {"joined": "bob"}
            assert await chat_request(carol, {"join": "carol"}) == ({"ok": True}, [])
            assert await alice.receive() == {"joined": "carol"}
            assert await bob.receive() == {"joined": "carol"}

            assert await chat_request(alice, {"say": "hello all"}) == ({"ok": True}, [])
            assert await bob.receive() == {"from": "alice", "say": "hello all"}
            # carol speaks ZiProto: her broadcasts come in ZiProto.
            raw = await carol.receive_raw()
            assert carol._split_packet(raw)[2] == 1  # Content-Encoding: ZiProto
            assert carol._decode(raw) == {"from": "alice", "say": "hello all"}

            assert await chat_request(bob, {"who": True}) == ({"members": ["alice", "bob", "carol"]}, [])
            assert await chat_request(bob, {"leave": True}) == ({"ok": True}, [])
            assert await alice.receive() == {"left": "bob", "reason": "left"}
            assert await carol.receive() == {"left": "bob", "reason": "left"}
            assert await chat_request(carol, {"say": "bye bob"}) == ({"ok": True}, [])
            assert await alice.receive() == {"from": "carol", "say": "bye bob"}
            # bob left the room, not the session: he hears nothing more, and may rejoin.
            await nothing_more(bob)
            assert await chat_request(bob, {"say": "hey"}) == ({"status": "failure", "error": "join first"}, [])
            assert await chat_request(bob, {"join": "bob"}) == ({"ok": True}, [])
            assert await alice.receive() == {"joined": "bob"}
            assert await carol.receive() == {"joined": "bob"}
            for member in (alice, bob, carol):
                await nothing_more(member, 0.05)
            assert set(app.members) == {"alice", "bob", "carol"}
    assert app.members == {}  # all three hung up: the session_ended hook dropped them


async def test_chat_refusals_stop_propagation_and_get_no_ok():
    """Group -1 refuses long messages, group 0 bad requests: each gets one error reply,
    no ``ok``, and the other members hear nothing."""
    app = chat.make_app()
    async with serving(app) as (host, port), connected(host, port) as alice, connected(host, port) as bob:
        assert (await alice.request({"say": "too early"}))["error"] == "join first"
        assert (await alice.request({"leave": True}))["error"] == "join first"
        assert (await alice.request({"join": "no spaces"}))["status"] == "failure"
        assert (await alice.request({"join": 7}))["status"] == "failure"
        assert await alice.request({"join": "alice"}) == {"ok": True}
        assert (await alice.request({"join": "again"}))["error"] == "already joined as alice"
        assert (await bob.request({"join": "alice"}))["error"] == "name taken"
        assert await bob.request({"join": "bob"}) == {"ok": True}
        assert await alice.receive() == {"joined": "bob"}
        too_long = await alice.request({"say": "x" * (chat.MAX_MESSAGE + 1)})
        assert too_long == {"status": "failure", "error": "message too long", "limit": chat.MAX_MESSAGE}
        assert (await alice.request({"say": ["not", "text"]}))["error"] == "a message is a string"
        assert (await alice.request({"dance": True}))["error"] == "unknown request"
        assert await alice.request({"say": "x" * chat.MAX_MESSAGE}) == {"ok": True}
        assert await bob.receive() == {"from": "alice", "say": "x" * chat.MAX_MESSAGE}
        for member in (alice, bob):
            await nothing_more(member)


async def test_chat_a_member_disconnecting_mid_chat_breaks_nothing():
    """carol hangs up without leaving: the room goes on, drops her, and says so once."""
    app = chat.make_app()
    async with serving(app) as (host, port), connected(host, port) as alice, connected(host, port) as bob:
        carol = AsyncClient(tls=False, timeout=5)
        await carol.connect(host, port)
        assert await alice.request({"join": "alice"}) == {"ok": True}
        assert await bob.request({"join": "bob"}) == {"ok": True}
        assert await carol.request({"join": "carol"}) == {"ok": True}
        assert await alice.receive() == {"joined": "bob"}
        assert await alice.receive() == {"joined": "carol"}
        assert await bob.receive() == {"joined": "carol"}
        await carol.disconnect()  # mid-chat, no {"leave": true}

        # Right away (the server may not have noticed yet): a message still goes through.
        reply, _ = await chat_request(alice, {"say": "anyone there?"})
        assert reply == {"ok": True}
        bob_saw = await receive_until(bob, lambda p: p.get("say") == "anyone there?")
        # carol is dropped, whoever notices first (a failed send, or a closed session).
        with trio.fail_after(5):
            while True:
                reply, _ = await chat_request(alice, {"who": True})
                if reply == {"members": ["alice", "bob"]}:
                    break
                await trio.sleep(0.02)
        left = {"left": "carol", "reason": "disconnected"}
        if left not in bob_saw:
            bob_saw += await receive_until(bob, lambda p: p == left)
        assert bob_saw.count(left) == 1

        # The room works as before, both ways, and the name is free again.
        assert await chat_request(bob, {"say": "still here"}) == ({"ok": True}, [])
        assert await alice.receive() == {"from": "bob", "say": "still here"}
        async with connected(host, port) as carol_again:
            assert await carol_again.request({"join": "carol"}) == {"ok": True}
        assert await alice.receive() == {"joined": "carol"}
        assert await bob.receive() == {"joined": "carol"}


async def test_chat_a_member_hanging_up_is_announced_by_the_session_ended_hook():
    """No message needs to go out for the room to notice: the server's session_ended
    hook drops dave and tells the others, once, as soon as his session ends."""
    app = chat.make_app()
    async with serving(app) as (host, port), connected(host, port) as alice:
        dave = AsyncClient(tls=False, timeout=5)
        await dave.connect(host, port)
        assert await alice.request({"join": "alice"}) == {"ok": True}
        assert await dave.request({"join": "dave"}) == {"ok": True}
        assert await alice.receive() == {"joined": "dave"}
        await dave.disconnect()
        with trio.fail_after(5):
            assert await alice.receive() == {"left": "dave", "reason": "disconnected"}
        assert set(app.members) == {"alice"}
        await nothing_more(alice, 0.1)


class FakeMember:
    """A member whose session the server does not serve: its sends fail or hang."""

    def __init__(self, send: Callable) -> None:
        """``send``: awaited by every send, after the packet is recorded."""
        self._send = send
        self.closed = False
        self.encoding = "json"
        self.session = SimpleNamespace(session_id=uuid.uuid4())
        self.sent: list[Packet] = []
        self.close_calls = 0

    async def send(self, packet: Packet) -> None:
        """Record ``packet``, then behave as the test asked."""
        self.sent.append(packet)
        await self._send()

    async def close(self) -> None:
        """Record that the room closed this member's session."""
        self.close_calls += 1
        self.closed = True


@pytest.mark.parametrize("error", [trio.BrokenResourceError, trio.ClosedResourceError])
async def test_chat_a_member_whose_send_fails_is_dropped_and_announced(error):
    """A member that vanishes without its session ending (so the session_ended hook
    never sees it): a broadcast finds the member gone, drops it, tells the
    others (the sender too), and the sender still gets its ``ok``."""

    async def fail() -> None:
        """The peer is gone."""
        raise error("gone")

    app = chat.make_app()
    ghost = FakeMember(fail)
    left = {"left": "ghost", "reason": "disconnected"}
    async with serving(app) as (host, port), connected(host, port) as alice, connected(host, port) as bob:
        assert await alice.request({"join": "alice"}) == {"ok": True}
        assert await bob.request({"join": "bob"}) == {"ok": True}
        assert await alice.receive() == {"joined": "bob"}
        app.add("ghost", ghost)
        reply, events = await chat_request(alice, {"say": "hi"})
        assert reply == {"ok": True} and events == [left]
        assert await receive_until(bob, lambda p: p == left) == [{"from": "alice", "say": "hi"}, left]
        assert set(app.members) == {"alice", "bob"} and len(ghost.sent) == 1
        assert ghost.close_calls == 0  # it failed by itself: nothing to close
        for member in (alice, bob):
            await nothing_more(member, 0.05)


async def test_chat_a_member_that_stops_reading_is_dropped_without_delaying_others(monkeypatch):
    """A send that does not finish within SEND_TIMEOUT: the member is closed and dropped,
    and the other members got the message without waiting for it, though the stuck
    member comes first in the room."""
    monkeypatch.setattr(chat, "SEND_TIMEOUT", 1.0)
    app = chat.make_app()
    hang = False

    async def maybe_hang() -> None:
        """Take the packet, or never return once the test says so."""
        if hang:
            await trio.sleep_forever()

    stuck = FakeMember(maybe_hang)
    app.add("stuck", stuck)  # the first member: delivered to first
    async with serving(app) as (host, port), connected(host, port) as alice, connected(host, port) as bob:
        assert await alice.request({"join": "alice"}) == {"ok": True}
        assert await bob.request({"join": "bob"}) == {"ok": True}
        assert await alice.receive() == {"joined": "bob"}
        assert [packet.dict_payload for packet in stuck.sent] == [{"joined": "alice"}, {"joined": "bob"}]
        hang = True  # from now on, stuck takes nothing
        await alice.send({"say": "hi"})
        with trio.fail_after(0.5):  # well before the stuck member's SEND_TIMEOUT
            assert await bob.receive() == {"from": "alice", "say": "hi"}
        assert await bob.receive() == {"left": "stuck", "reason": "disconnected"}
        assert await alice.receive() == {"left": "stuck", "reason": "disconnected"}
        assert await alice.receive() == {"ok": True}
        assert stuck.close_calls == 1 and "stuck" not in app.members


def test_chat_served_by_asyncapy_run():
    """``python -m asyncapy run examples.chat:app``: two blocking clients chat through
    the module's own ``app``."""
    with Running.asyncapy("run", "examples.chat:app", "--port", "0") as run:
        port = served_port(run)
        with BlockingClient(tls=False, timeout=5) as ann, BlockingClient(tls=False, timeout=5) as ben:
            ann.connect("127.0.0.1", port)
            ben.connect("127.0.0.1", port)
            assert ann.request({"join": "ann"}) == {"ok": True}
            assert ben.request({"join": "ben"}) == {"ok": True}
            assert ann.receive() == {"joined": "ben"}
            assert ben.request({"say": "hi ann"}) == {"ok": True}
            assert ann.receive() == {"from": "ben", "say": "hi ann"}
            assert ann.request({"say": "x" * 501})["error"] == "message too long"
            assert ann.request({"leave": True}) == {"ok": True}
            assert ben.receive() == {"left": "ann", "reason": "left"}
        assert run.stop() == 0, run.output
    assert "Traceback" not in run.output
    assert "hi ann" not in run.output  # group -1 logs field names, not messages
    assert re.search(r"127\.0\.0\.1 \(ben\) sent \['say'\]", run.output)


# -- scaleout ------------------------------------------------------------------------------
async def test_scaleout_in_one_process_counts_sessions_and_enforces_the_limit():
    """examples.scaleout with everything in memory: pid, live sessions of the address,
    keys, and the session limit."""
    app = scaleout.make_app(store="memory://")
    key = await app.keys.aissue({"user": "jo"})
    async with serving(app) as (host, port):
        async with connected(host, port) as first, connected(host, port) as second:
            assert await first.request({"whoami": True}) == {"pid": os.getpid(), "sessions": 2}
            assert await second.request({"key": key}) == {"user": "jo", "pid": os.getpid(), "sessions": 2}
            assert await second.request({"key": "bogus"}) == UNAUTHORIZED
            assert await second.request({"what": 1}) == UNAUTHORIZED
            async with connected(host, port) as third, connected(host, port) as fourth:
                assert (await third.request({"whoami": 1}))["sessions"] == 4
                assert (await fourth.request({"whoami": 1}))["sessions"] == 4
                async with connected(host, port) as fifth:
                    assert await fifth.receive() == LIMIT_REACHED
                    assert await fifth.receive_raw() == b""


async def test_scaleout_reads_its_store_from_the_environment(monkeypatch, redis_url):
    """``ASYNCAPY_STORE`` names the store of both the sessions and the keys."""
    monkeypatch.setenv(scaleout.STORE_ENV, redis_url)
    app = scaleout.make_app()
    assert type(app.store).__name__ == "RedisSessionStore"
    assert type(app.keys.store).__name__ == "CachedKeyStore"  # in front of Redis
    behind = app.keys.store.store  # the store behind the cache, timed for metrics
    assert type(behind).__name__ == "MeteredKeyStore" and type(behind.inner).__name__ == "RedisKeyStore"
    assert app.session_limit == scaleout.SESSION_LIMIT
    key = await APIKeyFactory(store=redis_url).aissue({"user": "kim"})
    async with serving(app) as (host, port), connected(host, port) as client:
        assert await client.request({"key": key}) == {"user": "kim", "pid": os.getpid(), "sessions": 1}
    monkeypatch.delenv(scaleout.STORE_ENV)
    assert type(scaleout.make_app().store).__name__ == "MemorySessionStore"


def test_scaleout_two_workers_share_sessions_and_keys_in_redis(redis_url):
    """The deployment of examples.scaleout: ``asyncapy run --workers 2 --store URL``
    with ``ASYNCAPY_STORE`` set. A key issued by a script works in both workers, both
    answer (different pids over several connections), and the session limit counts
    the sessions of both."""
    env = {scaleout.STORE_ENV: redis_url}
    issued = run_python("-m", "examples.scaleout", "issue", "lee", env=env)
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()

    command = [PYTHON, "-m", "asyncapy", "run", "examples.scaleout:app", "--port", "0",
               "--workers", "2", "--store", redis_url]
    with Running(command, env=env) as run:
        port = run.serving(2)
        workers = run.worker_pids()
        assert len(workers) == 2
        seen: set[int] = set()
        for _ in range(200):
            reply = ask(port, {"key": key})
            if reply == LIMIT_REACHED:  # the previous connections' releases still in flight
                continue
            assert reply["user"] == "lee" and reply["sessions"] >= 1
            seen.add(reply["pid"])
            if seen == workers:
                break
        assert seen == workers, f"only {seen} of {workers} answered"

        # Fill the limit, connection by connection, whichever worker takes each: the
        # first one waits until it is alone (the connections above are released).
        clients = [BlockingClient(tls=False, timeout=5) for _ in range(scaleout.SESSION_LIMIT + 1)]
        try:
            clients[0].connect("127.0.0.1", port)
            deadline = time.monotonic() + 5
            while (first := clients[0].request({"whoami": True}))["sessions"] > 1:
                assert time.monotonic() < deadline, first
                time.sleep(0.02)
            replies = [first]
            for client in clients[1:]:
                client.connect("127.0.0.1", port)
                replies.append(client.request({"whoami": True}))
        finally:
            for client in clients:
                client.disconnect()
        assert [r.get("sessions") for r in replies[:-1]] == list(range(1, scaleout.SESSION_LIMIT + 1))
        assert {r["pid"] for r in replies[:-1]} <= workers
        assert replies[-1] == LIMIT_REACHED
        assert run.stop() == 0, run.output
    assert "Traceback" not in run.output


def test_scaleout_refuses_several_workers_without_a_shared_store():
    """No ``ASYNCAPY_STORE``, no ``--store``: several workers with a session limit and
    sessions in memory are refused, as the docstring says."""
    env = {key: value for key, value in os.environ.items() if key != scaleout.STORE_ENV}
    done = subprocess.run(
        [PYTHON, "-m", "asyncapy", "run", "examples.scaleout:app", "--port", "0", "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env=env,
    )
    assert done.returncode == 2
    assert "needs a shared session store" in done.stderr


def test_scaleout_issue_needs_a_shared_store():
    """``python -m examples.scaleout issue USER`` without ``ASYNCAPY_STORE`` refuses:
    the key would die with the script."""
    done = run_python("-m", "examples.scaleout", "issue", "nobody", env={scaleout.STORE_ENV: ""})
    assert done.returncode == 2 and done.stdout == ""
    assert "ASYNCAPY_STORE is not set" in done.stderr


# -- python -m examples.NAME ----------------------------------------------------------------
def test_every_example_runs_with_python_dash_m():
    """``python -m examples.NAME [PORT]`` serves, for the three examples that take a port
    (port 0: the server logs the one it got)."""
    env = {scaleout.STORE_ENV: ""}
    runs = {
        name: Running([PYTHON, "-m", f"examples.{name}", "0"], env=env)
        for name in ("authenticated", "chat", "scaleout")
    }
    try:
        ports = {name: served_port(run) for name, run in runs.items()}
        with BlockingClient(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", ports["authenticated"])
            key = client.request({"issue_key": {"user": "max"}})["key"]
            assert client.request({"key": key}) == {"user": "max"}
        assert ask(ports["chat"], {"join": "max"}) == {"ok": True}
        # In memory, `python -m examples.scaleout` prints a key it issued at start.
        line = runs["scaleout"].wait_for(re.compile(r"try this one: (\S+)"), stream="out")[0]
        reply = ask(ports["scaleout"], {"key": line.group(1)})
        assert reply["user"] == "demo" and reply["sessions"] == 1 and reply["pid"] == runs["scaleout"].process.pid
        for name, run in runs.items():
            assert run.stop() == 0, f"{name}:\n{run.output}"
            assert "Traceback" not in run.output, f"{name}:\n{run.output}"
    finally:
        for run in runs.values():
            run.__exit__(None, None, None)


# -- keys in an SQLite file -------------------------------------------------------------------
async def test_sqlite_keys_issued_by_the_command_a_server_accepts(tmp_path, make_server):
    """``asyncapy keys issue --store sqlite:///PATH`` issues a key into the file; a
    server whose factory uses that file accepts it, from the bundled client."""
    path = tmp_path / "keys.db"
    done = await trio.to_thread.run_sync(
        lambda: run_python(
            "-m", "asyncapy", "keys", "issue", "--metadata", '{"user": "nina"}', "--store", f"sqlite:///{path}"
        )
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.encode() not in path.read_bytes()  # stored hashed, never in clear

    store = SQLiteKeyStore(path)
    keys = APIKeyFactory(store=store)
    server = make_server()

    @server.add_handler(Filters.Fields(key=None) & Filters.APIFactory(keys, "key"))
    async def whoami(client: Client, packet: Packet) -> None:
        """``{"key": KEY}`` -> the key's metadata."""
        await client.send(Packet(await keys.aget(packet["key"]), encoding=client.encoding))

    @server.add_handler()
    async def refuse(client: Client, packet: Packet) -> None:
        """Anything else."""
        await client.send(Packet(UNAUTHORIZED, encoding=client.encoding))

    try:
        async with serving(server) as (host, port), connected(host, port) as client:
            assert await client.request({"key": key}) == {"user": "nina"}
            assert await client.request({"key": key[:-1] + "?"}) == UNAUTHORIZED
            await keys.arevoke(key)
            assert await client.request({"key": key}) == UNAUTHORIZED
    finally:
        await store.aclose()
