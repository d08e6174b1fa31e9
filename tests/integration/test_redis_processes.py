"""Real server processes sharing one real Redis (``python -m asyncapy run ... --config``).

* Admission is exact across processes: 12 simultaneous connections from one address,
  spread over two processes with ``session_limit = 3``, get exactly 3 sessions; the 9
  others get ``ERR_SESSION_LIMIT_REACHED`` then EOF.
* API keys are shared: a key issued by ``APIKeyFactory(store=url)`` in this process is
  accepted by a guarded handler in each of three server processes; reissued or revoked,
  it is refused by all of them inside an open session within the key cache's promise
  (100 ms; tests/integration/test_redis_key_cache.py measures it), and a reissue's new
  key is granted at once.
* A process killed with SIGKILL (no shutdown, no release) holds its address's slot
  for at most ``session_lease`` seconds; then the other process admits the address,
  with nobody having cleaned up.

The application is tests/integration/redis_app.py.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from typing import AsyncIterator

import redis
import trio
import trio.testing

from asyncapy import APIKeyFactory
from tests.e2e.wire import Wire
from tests.integration.test_redis_key_cache import honoured

HOST = "127.0.0.1"
SESSIONS = "asyncapy:sessions:127.0.0.1"


async def attempt(port: int) -> tuple[str, Wire]:
    """Open a session on ``port`` and send a request: ("served", open wire) if the echo
    comes back, ("refused", closed wire) after the limit error and EOF."""
    wire = await Wire.connect(HOST, port)
    reply = await wire.request({"hello": port})
    if reply == {"hello": port}:
        return "served", wire
    assert reply == {"status": "failure", "error": "ERR_SESSION_LIMIT_REACHED"}
    await wire.read_eof()
    await wire.aclose()
    return "refused", wire


@asynccontextmanager
async def racing(ports: list[int], count: int = 12) -> AsyncIterator[list[str]]:
    """``count`` connections let go at the same moment, spread over ``ports`` in turn;
    inside, every admission is decided (the outcomes of :func:`attempt`) and the
    admitted sessions are still held; on exit they hang up."""
    go, everyone_answered, hang_up = trio.Event(), trio.Event(), trio.Event()
    outcomes: list[str] = []

    async def connect(port: int) -> None:
        await go.wait()
        outcome, wire = await attempt(port)
        outcomes.append(outcome)
        if len(outcomes) == count:
            everyone_answered.set()
        await hang_up.wait()  # hold the sessions until all are decided and counted
        await wire.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(connect, ports[n % len(ports)])
        await trio.testing.wait_all_tasks_blocked()
        go.set()
        await everyone_answered.wait()
        try:
            yield outcomes
        finally:
            hang_up.set()


def live_sessions(inspector: redis.Redis) -> int:
    """Unexpired leases of 127.0.0.1 in Redis."""
    now = inspector.time()
    now_ms = now[0] * 1000 + now[1] // 1000
    return inspector.zcount(SESSIONS, f"({now_ms}", "+inf")


async def wait_for_live_sessions(inspector: redis.Redis, count: int, limit: float = 5) -> None:
    with trio.fail_after(limit):
        while live_sessions(inspector) != count:
            await trio.sleep(0.02)


async def test_twelve_racing_connections_over_two_processes_get_exactly_three_sessions(redis_url, spawn):
    servers = [spawn(redis_url, session_limit=3, session_lease=30) for _ in range(2)]
    for server in servers:
        await server.serving()
    inspector = redis.Redis.from_url(redis_url)
    for race in range(3):
        async with racing([server.port for server in servers]) as outcomes:
            assert sorted(outcomes) == ["refused"] * 9 + ["served"] * 3, f"race {race}"
            assert live_sessions(inspector) == 3
        await wait_for_live_sessions(inspector, 0)  # each process released its own
    inspector.close()
    started = 0
    for server in servers:
        assert server.stop() == 0, server.output()
        log = server.output()
        assert "Traceback" not in log
        # Both processes took part: each decided the admission of its 6 connections per race.
        # Refusals are logged at most once a second, the others counted in a later line.
        refused = log.count(": limit reached") + sum(
            int(n) for n in re.findall(r"(\d+) more (?:connection\(s\) )?refused for session_limit", log)
        )
        assert log.count("Session started for 127.0.0.1") + refused == 18, log
        started += log.count("Session started for 127.0.0.1")
    assert started == 9


async def test_three_processes_share_api_keys(redis_url, spawn):
    servers = [spawn(redis_url) for _ in range(3)]
    factory = APIKeyFactory(store=redis_url)
    # The synchronous 0.5 API, as an admin script would call it (no event loop there).
    key = await trio.to_thread.run_sync(factory.issue, {"user": "erin"})
    for server in servers:
        await server.serving()

    wires = [await Wire.connect(HOST, server.port) for server in servers]
    try:
        for server, wire in zip(servers, wires):
            assert await wire.request({"key": key, "ask": "hello"}) == {
                "answer": "granted", "user": {"user": "erin"}, "pid": server.pid,
            }
            assert await wire.request({"key": "not-" + key, "ask": "hello"}) == {
                "answer": "denied", "pid": server.pid,
            }

        # Each process's key cache hears of a change from Redis, a fraction of a
        # millisecond after it is made (within 100 ms, its promise): the old key is
        # polled for, in the same sessions; the new one was never cached, so it works
        # at once.
        new = await trio.to_thread.run_sync(factory.reissue, key)
        for server, wire in zip(servers, wires):
            denied = {"answer": "denied", "pid": server.pid}
            await honoured(lambda: wire.request({"key": key, "ask": "again"}), denied)
            assert (await wire.request({"key": new, "ask": "again"}))["answer"] == "granted"

        await trio.to_thread.run_sync(factory.revoke, new)
        for server, wire in zip(servers, wires):
            denied = {"answer": "denied", "pid": server.pid}
            await honoured(lambda: wire.request({"key": new, "ask": "after"}), denied)
            assert await wire.request({"plain": "echo"}) == {"plain": "echo"}
    finally:
        for wire in wires:
            await wire.aclose()


async def test_a_sigkilled_process_holds_its_sessions_only_for_the_lease(redis_url, spawn):
    lease = 2
    doomed, survivor = (spawn(redis_url, session_limit=1, session_lease=lease) for _ in range(2))
    await doomed.serving()
    await survivor.serving()

    outcome, held = await attempt(doomed.port)
    assert outcome == "served"
    # The doomed process renews its lease: after more than a lease, it still holds the slot.
    await trio.sleep(lease + 0.5)
    assert await held.request({"still": "here"}) == {"still": "here"}
    assert (await attempt(survivor.port))[0] == "refused"

    doomed.kill()
    killed = trio.current_time()
    await held.aclose()
    # Its last renewal was at most lease/3 ago: the slot stays taken for 2/3 of a lease
    # at least...
    assert (await attempt(survivor.port))[0] == "refused"
    # ...and is free once the lease ran out, though nobody released or cleaned anything.
    with trio.fail_after(lease + 1.5):
        while True:
            outcome, wire = await attempt(survivor.port)
            if outcome == "served":
                break
            await trio.sleep(0.05)
    waited = trio.current_time() - killed
    assert lease / 3 <= waited <= lease + 0.5, waited
    assert await wire.request({"after": "the lease"}) == {"after": "the lease"}
    await wire.aclose()
    assert survivor.stop() == 0, survivor.output()

