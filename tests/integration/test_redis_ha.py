"""Real server processes (tests/integration/redis_app.py) on the highly available forms
of Redis, with real parts (tests/real_parts.py).

Sentinel
    Two processes share a ``redis+sentinel://`` store (sessions and API keys). The
    master is killed with SIGKILL; each process finds the new master by itself: new
    sessions and key checks are served again well within 15 s, without a restart; the
    sessions held across the failover still count against ``session_limit`` (their
    leases are renewed on the new master), and a key revoked after the failover is
    refused by both processes (the key caches' trackers follow the master). The time
    from the kill to the first session and key check served again is printed (run with
    ``-s``): docs/guide-scaling-out.md quotes it.

Cluster
    Two processes share a ``redis+cluster://`` store of three masters: twelve racing
    connections get exactly ``session_limit`` sessions; a process killed with SIGKILL
    holds its sessions only for the lease; a key reissued or revoked is refused by
    both, and still after the keys' hash slot is moved to another master (a resharding).
"""

from __future__ import annotations

import time

import trio

from asyncapy import APIKeyFactory
from tests.e2e.wire import Wire
from tests.integration.test_redis_processes import HOST, attempt, racing
from tests.real_parts import RedisCluster, SentinelSet

FAILOVER_BUDGET = 15.0
"""Seconds from the master's death until new sessions and key checks are served again
(issue 13; the aim is 5)."""


async def probe(port: int, key: str) -> str:
    """One new session on ``port`` asking with ``key``: ``"granted"``, ``"denied"``, or
    ``"unavailable"`` (the session or the key check refused for want of a store)."""
    try:
        wire = await Wire.connect(HOST, port)
    except OSError:
        return "unavailable"
    try:
        with trio.fail_after(10):
            reply = await wire.request({"key": key, "ask": "probe"})
    except (trio.TooSlowError, EOFError, OSError):
        return "unavailable"
    finally:
        await wire.aclose()
    return reply.get("answer", "unavailable")


async def test_a_sentinel_failover_is_followed_by_every_process_without_restart(spawn):
    with SentinelSet().start() as sentinels:
        url = sentinels.url
        servers = [spawn(url, session_limit=3, session_lease=6) for _ in range(2)]
        factory = APIKeyFactory(store=url)
        key = await trio.to_thread.run_sync(factory.issue, {"user": "ha"})
        for server in servers:
            await server.serving()
        # Two sessions held across the failover (one per process), each using the key.
        held = []
        for server in servers:
            outcome, wire = await attempt(server.port)
            assert outcome == "served"
            held.append(wire)
        # Each probe is one more session of 127.0.0.1 (limit 3, two held): the one before
        # may not be released in Redis yet (a release is posted, not awaited, and the
        # client reconnects at once), so a probe may be refused for a moment; retry.
        for server in servers:
            with trio.fail_after(5):
                while await probe(server.port, key) != "granted":
                    await trio.sleep(0.05)

        old_master = sentinels.kill_master()
        killed = time.monotonic()
        served_again: dict[int, float] = {}
        with trio.fail_after(FAILOVER_BUDGET):
            while len(served_again) < len(servers):
                for server in servers:
                    if server.port not in served_again and await probe(server.port, key) == "granted":
                        served_again[server.port] = time.monotonic() - killed
                await trio.sleep(0.05)
        assert sentinels.master_address()[1] != old_master
        print(f"\nSentinel failover: served again after {sorted(round(s, 2) for s in served_again.values())} s")

        # session_limit still holds: 2 held + 1 new = 3; the 4th is refused. A lease
        # (6 s) passes first, so only renewals on the new master keep the held ones.
        await trio.sleep(6.5)
        for wire in held:
            assert await wire.request({"still": "here"}) == {"still": "here"}
        outcome, third = await attempt(servers[0].port)
        assert outcome == "served"
        assert (await attempt(servers[1].port))[0] == "refused"
        await third.aclose()

        # A revocation made on the new master is seen by both processes' key caches.
        await trio.to_thread.run_sync(factory.revoke, key)
        with trio.fail_after(2):
            for server in servers:
                while await probe(server.port, key) != "denied":
                    await trio.sleep(0.02)
        for wire in held:
            await wire.aclose()
        for server in servers:
            assert server.stop() == 0, server.output()
            assert "Traceback" not in server.output()


async def test_a_cluster_keeps_the_limit_exact_under_a_race(cluster_url, spawn):
    servers = [spawn(cluster_url, session_limit=3, session_lease=30) for _ in range(2)]
    for server in servers:
        await server.serving()
    async with racing([server.port for server in servers]) as outcomes:
        assert sorted(outcomes) == ["refused"] * 9 + ["served"] * 3
    for server in servers:
        assert server.stop() == 0, server.output()


async def test_a_sigkilled_process_holds_its_cluster_sessions_only_for_the_lease(cluster_url, spawn):
    lease = 2
    doomed, survivor = (spawn(cluster_url, session_limit=1, session_lease=lease) for _ in range(2))
    await doomed.serving()
    await survivor.serving()
    outcome, held = await attempt(doomed.port)
    assert outcome == "served"
    await trio.sleep(lease + 0.5)  # renewed (per slot) past a lease
    assert (await attempt(survivor.port))[0] == "refused"
    doomed.kill()
    killed = trio.current_time()
    await held.aclose()
    with trio.fail_after(lease + 1.5):
        while True:
            outcome, wire = await attempt(survivor.port)
            if outcome == "served":
                break
            await trio.sleep(0.05)
    assert trio.current_time() - killed <= lease + 0.5
    await wire.aclose()
    assert survivor.stop() == 0, survivor.output()


async def test_cluster_keys_reissued_revoked_and_resharded_are_seen_by_every_process(
    redis_cluster: RedisCluster, cluster_url, spawn
):
    servers = [spawn(cluster_url) for _ in range(2)]
    factory = APIKeyFactory(store=cluster_url)
    key = await trio.to_thread.run_sync(factory.issue, {"user": "c"})
    for server in servers:
        await server.serving()
    for server in servers:
        assert await probe(server.port, key) == "granted"

    new = await trio.to_thread.run_sync(factory.reissue, key)  # one atomic RENAME
    for server in servers:
        assert await probe(server.port, key) == "denied"
        assert await probe(server.port, new) == "granted"

    # Move the keys' slot to another master: the trackers move with it, and a
    # revocation made on the new owner is seen (within the tracker's 1 s recheck).
    from asyncapy.adapters.redis_cluster import ClusterClient

    slot = ClusterClient.slot("asyncapy:{key}:")
    before = redis_cluster.owner(slot)
    redis_cluster.move_slot(slot, next(p for p in redis_cluster.ports if p != before))
    for server in servers:
        assert await probe(server.port, new) == "granted"  # moved with its slot
    await trio.to_thread.run_sync(factory.revoke, new)
    revoked = time.monotonic()
    with trio.fail_after(3):
        for server in servers:
            while await probe(server.port, new) != "denied":
                await trio.sleep(0.02)
    print(f"\nrevocation after a resharding seen in {time.monotonic() - revoked:.2f} s")
    for server in servers:
        assert server.stop() == 0, server.output()
        assert "Traceback" not in server.output()
