"""Keys and sessions through a Redis Cluster slot migration, driven by hand.

``redis-cli --cluster reshard`` takes every slot through the same states, which these
tests hold as long as they like (tests/real_parts.py): the target ``IMPORTING``, the
source ``MIGRATING``, keys moved a few at a time with ``MIGRATE``, then ``SETSLOT ...
NODE``. Meanwhile a key already moved is answered ``ASK`` by the source, a multi-key
call whose keys are split (or that would create keys on the target) ``TRYAGAIN``, and
once the slot has moved every node answers ``MOVED``. The stores must keep answering
through all of it, and the API-key caches of two processes must stay coherent: a key
revoked mid-migration is refused by the other process at once.
"""

from __future__ import annotations

import threading
import time

import pytest
import trio

from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.adapters.redis import RedisKeyStore, RedisSessionStore, connect
from asyncapy.adapters.redis_cluster import ClusterClient
from asyncapy.domain.ports import SessionRecord
from tests.contract.test_cached_key_stores import linked
from tests.real_parts import RedisCluster, _command

KEYS = [f"migrating-key-{n:02d}-" + "k" * 20 for n in range(20)]


@pytest.fixture(scope="module")
def cluster():
    with RedisCluster().start() as parts:
        yield parts


def _address_in(slot: int, *, skip: str = "") -> str:
    """An IPv4 address whose sessions hash to ``slot`` (their hash tag is the address)."""
    for a in range(256):
        for b in range(256):
            address = f"10.{a}.{b}.7"
            if address != skip and ClusterClient.slot(f"x{{{address}}}") == slot:
                return address
    raise AssertionError(f"no address for slot {slot}")  # pragma: no cover


def _record(address: str, n: int) -> SessionRecord:
    return SessionRecord(session_id=f"{address}-{n}", address=address, date=1000.0 + n, server_id="test")


def _later(seconds: float, action) -> threading.Thread:
    """Run ``action`` in a thread after ``seconds`` (the operator finishing the move)."""
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


async def test_api_keys_through_a_migration_of_their_slot(cluster):
    cluster.flush()
    here = CachedKeyStore(RedisKeyStore(connect(cluster.url)), size=64)
    there = CachedKeyStore(RedisKeyStore(connect(cluster.url)), size=64)  # another process
    try:
        for key in KEYS:
            await here.put(key, {"key": key})
        await linked(here)
        await linked(there)
        slot = ClusterClient.slot("asyncapy:{key}:")
        source = cluster.owner(slot)
        target = next(port for port in cluster.ports if port != source)
        for key in KEYS:  # cached by both
            assert await there.get(key) == {"key": key}

        cluster.begin_migration(slot, target)
        assert cluster.migrate_keys(slot, target, 10) == 10  # half the keys on the target
        on_target = set(_command(target, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").splitlines())
        moved = [k for k in KEYS if f"asyncapy:{{key}}:{_sha(k)}" in on_target]
        assert len(moved) == 10
        for store in (here, there):  # every key answers, moved or not (moved: after ASK)
            for key in KEYS:
                assert await store.contains(key) and await store.get(key) == {"key": key}
        await here.put("issued-mid-migration" + "n" * 20, {"new": True})  # created on the target
        assert await there.get("issued-mid-migration" + "n" * 20) == {"new": True}
        await here.update(moved[0], {"plan": "pro"})
        assert await there.get(moved[0]) == {"plan": "pro"}
        await here.delete(moved[1])  # revoked on the target: the other process refuses it
        assert not await there.contains(moved[1])
        still = [k for k in KEYS if k not in moved]
        await here.delete(still[0])  # revoked on the source: tracked as ever
        await _refused_soon(there, still[0])

        # A reissue is one RENAME: split keys are TRYAGAIN until the move is over, and
        # retried meanwhile (the store's retry_for).
        finishing = _later(0.5, lambda: (
            [cluster.migrate_keys(slot, target, 100) for _ in range(3)], cluster.finish_migration(slot, target)
        ))
        started = time.monotonic()
        await here.replace(still[1], "reissued-key" + "r" * 20)
        assert time.monotonic() - started >= 0.3
        finishing.join(10)
        assert cluster.owner(slot) == target

        # After the move: MOVED, the slot map updated, the trackers relinked to the
        # new owner; a change there reaches the other process's cache.
        assert await there.get("reissued-key" + "r" * 20) == {"key": still[1]}
        assert not await there.contains(still[1])
        await linked(there)
        await here.delete(still[2])
        await _refused_soon(there, still[2])
        assert there._tracker.links >= 2
    finally:
        await here.aclose()
        await there.aclose()


async def _refused_soon(store: CachedKeyStore, key: str) -> None:
    """Wait (1 s at most) until ``store`` refuses ``key``: the invalidation of a change
    made elsewhere reaches its cache a moment after the change."""
    with trio.fail_after(1):
        while await store.contains(key):
            await trio.sleep(0.005)


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


async def test_sessions_through_a_migration_of_their_slot(cluster):
    cluster.flush()
    store = RedisSessionStore(connect(cluster.url), lease=30)
    try:
        slot = ClusterClient.slot("x{10.9.9.9}")
        old = _address_in(slot)
        new = _address_in(slot, skip=old)
        for n in range(3):
            assert await store.admit(_record(old, n), 10)
        source = cluster.owner(slot)
        target = next(port for port in cluster.ports if port != source)

        cluster.begin_migration(slot, target)
        # Keys still on the source: everything as usual.
        assert await store.admit(_record(old, 3), 10)
        assert len(await store.sessions(old)) == 4
        cluster.migrate_keys(slot, target, 100)  # the address's keys now on the target
        assert await store.admit(_record(old, 4), 10)  # ASK, ASKING
        assert not await store.admit(_record(old, 5), 5)  # the limit holds there
        assert [r.session_id for r in await store.sessions(old)] == [f"{old}-{n}" for n in range(5)]
        await store.release(_record(old, 0))
        assert len(await store.sessions(old)) == 4
        assert await store.renew() == 4

        # A new address in the slot: its two keys are on neither node, and a two-key
        # script cannot run on the importing node without them: TRYAGAIN until the
        # slot is handed over, retried meanwhile (the store's retry_for).
        finishing = _later(0.5, lambda: cluster.finish_migration(slot, target))
        started = time.monotonic()
        elsewhere = "10.200.0.1"
        assert ClusterClient.slot(f"x{{{elsewhere}}}") != slot
        answered: dict = {}

        async def meanwhile() -> None:  # a call for another slot is not held up behind it
            await trio.sleep(0.1)
            assert await store.admit(_record(elsewhere, 0), 10)
            answered["elsewhere"] = time.monotonic() - started

        async with trio.open_nursery() as nursery:
            nursery.start_soon(meanwhile)
            assert await store.sessions(new) == []
            assert await store.admit(_record(new, 0), 10)
            answered["new"] = time.monotonic() - started
        assert answered["new"] >= 0.3
        assert answered["elsewhere"] < 0.4 and answered["elsewhere"] < answered["new"], answered
        finishing.join(10)

        # Handed over: MOVED once, then straight to the new owner.
        assert len(await store.sessions(old)) == 4 and len(await store.sessions(new)) == 1
        await store.release(_record(old, 1))
        assert await store.renew() == 5  # three of the old address, the new one, elsewhere
        assert store.redis.pool(f"x{{{old}}}").connection_kwargs["port"] == target
    finally:
        await store.aclose()


async def test_a_reshard_under_load_fails_no_call(cluster):
    """The keys' slot and the slots of eight addresses migrated a few keys at a time,
    with pauses (as a reshard of a busy cluster), while tasks check keys, admit,
    list and release sessions and renew leases without a pause: not one call fails,
    and every answer is right."""
    cluster.flush()
    keys = CachedKeyStore(RedisKeyStore(connect(cluster.url)), size=64)
    sessions = RedisSessionStore(connect(cluster.url), lease=30)
    many = [f"load-key-{n:03d}-" + "l" * 20 for n in range(200)]
    for key in many:
        await keys.put(key, {"key": key})
    addresses = [f"10.1.{n}.9" for n in range(8)]
    for address in addresses:
        assert await sessions.admit(_record(address, 0), 1000)
    slots = [ClusterClient.slot("asyncapy:{key}:")] + [ClusterClient.slot(f"x{{{a}}}") for a in addresses]
    moves = []
    for slot in dict.fromkeys(slots):
        source = cluster.owner(slot)
        moves.append((slot, next(p for p in cluster.ports if p != source)))

    def reshard() -> None:
        for slot, target in moves:
            cluster.begin_migration(slot, target)
            while cluster.migrate_keys(slot, target, 10):
                time.sleep(0.02)
            time.sleep(0.05)
            cluster.finish_migration(slot, target)

    done = threading.Event()
    counts = {"checks": 0, "admissions": 0, "failures": 0}
    wrong: list = []

    async def check_keys() -> None:
        while not done.is_set():
            for key in many[::7]:
                try:
                    if await keys.get(key) != {"key": key}:
                        wrong.append(key)
                    counts["checks"] += 1
                except Exception as exc:  # noqa: BLE001 - counted and shown
                    counts["failures"] += 1
                    wrong.append(repr(exc))
            await trio.sleep(0.001)  # answers from the cache do not yield

    async def churn(address: str) -> None:
        n = 1
        while not done.is_set():
            record = _record(address, n)
            try:
                assert await sessions.admit(record, 1000)
                assert record.session_id in [r.session_id for r in await sessions.sessions(address)]
                await sessions.release(record)
                counts["admissions"] += 1
            except Exception as exc:  # noqa: BLE001 - counted and shown
                counts["failures"] += 1
                wrong.append(repr(exc))
            n += 1

    async def renew() -> None:
        while not done.is_set():
            try:
                assert await sessions.renew() >= len(addresses)
            except Exception as exc:  # noqa: BLE001
                counts["failures"] += 1
                wrong.append(repr(exc))
            await trio.sleep(0.05)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(check_keys)
            nursery.start_soon(renew)
            for address in addresses:
                nursery.start_soon(churn, address)
            await trio.to_thread.run_sync(reshard)
            done.set()
        assert all(cluster.owner(slot) == target for slot, target in moves)
        print(f"\nreshard of {len(moves)} slots under load: {counts}")
        assert counts["failures"] == 0 and not wrong, wrong[:5]
        assert counts["checks"] > 100 and counts["admissions"] > 100
    finally:
        await keys.aclose()
        await sessions.aclose()
