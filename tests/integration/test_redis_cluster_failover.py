"""A Redis Cluster with replicas, a master killed: keys and sessions on every slot are
served again once the Cluster has failed over, without a restart.

Three masters and three replicas (tests/real_parts.py, ``cluster-node-timeout`` 2 s).
One master is killed with SIGKILL; calls for its slots fail (failing closed) until the
replicas vote and one is promoted, then the stores find the new master from the slot
map. Probed every 50 ms: an admission for an address on each master, an uncached key
check, and a cached store's check of a key revoked after the failover.
"""

from __future__ import annotations

import time

import trio

from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.adapters.redis import RedisKeyStore, RedisSessionStore, connect
from asyncapy.adapters.redis_cluster import ClusterClient
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import SessionRecord
from tests.contract.test_cached_key_stores import linked
from tests.real_parts import RedisCluster, _wait

KEY = "failover-key-" + "f" * 20


def _addresses(cluster: RedisCluster) -> dict[int, str]:
    """One address per master: ``{master port: address}``."""
    found: dict[int, str] = {}
    for n in range(5000):
        address = f"10.2.{n // 250}.{n % 250}"
        owner = cluster.owner(ClusterClient.slot(f"x{{{address}}}"))
        found.setdefault(owner, address)
        if len(found) == len(cluster._masters()):
            return found
    raise AssertionError("no address for some master")  # pragma: no cover


async def test_a_killed_master_is_replaced_and_every_slot_served_again():
    with RedisCluster(replicas=1).start() as cluster:
        _wait("replication", cluster.replicated, cluster.processes)
        keys = RedisKeyStore(connect(cluster.url), wait_replicas=1)  # the key is on the replica too
        cached = CachedKeyStore(RedisKeyStore(connect(cluster.url)), size=64)
        sessions = RedisSessionStore(connect(cluster.url), lease=30)
        try:
            await keys.put(KEY, {"user": "ada"})
            await linked(cached)
            assert await cached.contains(KEY)
            addresses = _addresses(cluster)
            victim = cluster.owner(ClusterClient.slot("asyncapy:{key}:"))  # the keys' master
            n = 0

            async def all_served() -> bool:
                nonlocal n
                try:
                    for address in addresses.values():
                        n += 1
                        record = SessionRecord(f"s{n}", address, float(n), "test")
                        if not await sessions.admit(record, 1000):
                            return False
                        await sessions.release(record)
                    return await keys.get(KEY) == {"user": "ada"}
                except StoreUnavailable:
                    return False

            assert await all_served()
            cluster.kill(victim)
            killed = time.monotonic()
            with trio.fail_after(30):
                while not await all_served():
                    await trio.sleep(0.05)
            back = time.monotonic() - killed
            assert cluster.owner(ClusterClient.slot("asyncapy:{key}:")) != victim
            # The cache's tracker linked to the new master: a revocation there reaches it
            # (written without WAIT: the new master has no replica left).
            keys.wait_replicas = 0
            await keys.delete(KEY)
            with trio.fail_after(5):
                while True:
                    try:  # an idle store's first call may still meet its dead master: closed
                        if not await cached.contains(KEY):
                            break
                    except StoreUnavailable:
                        pass
                    await trio.sleep(0.01)
            print(f"\nkeys and sessions on every slot served again {back:.2f} s after the master was killed")
        finally:
            await keys.aclose()
            await cached.aclose()
            await sessions.aclose()
