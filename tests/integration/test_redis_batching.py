"""Store calls batched per scheduling round (adapters/redis_batching.py ``_RedisAdapter``): the
calls tasks make in one round go to Redis as one pipelined round trip (from the trio
thread for one node, from one worker thread otherwise), each keeping its own reply and
its own failure, and admission stays exact.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis
import trio

from asyncapy.adapters.redis import RedisKeyStore, RedisSessionStore, connect
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import SessionRecord

ADDRESS = "203.0.113.9"


def record(address: str = ADDRESS) -> SessionRecord:
    return SessionRecord(str(uuid.uuid4()), address, time.time(), "batching")


@pytest.fixture
async def sessions(redis_url):
    store = RedisSessionStore(connect(redis_url), lease=30)
    yield store
    await store.aclose()


async def test_admissions_of_one_round_are_one_batch_and_exact(sessions):
    records = [record() for _ in range(40)]
    admitted: list[bool] = []

    async def admit(r: SessionRecord) -> None:
        admitted.append(await sessions.admit(r, 5))

    async with trio.open_nursery() as nursery:
        for r in records:
            nursery.start_soon(admit, r)
    assert admitted.count(True) == 5 and len(admitted) == 40
    assert sessions.calls == 40 and sessions.batches < 40
    assert len(await sessions.sessions(ADDRESS)) == 5


async def test_a_failing_call_fails_alone(sessions):
    results: dict = {}

    async def admit(n: int) -> None:
        results[n] = await sessions.admit(record(f"198.51.100.{n}"), 1)

    async def broken() -> None:
        with pytest.raises(StoreUnavailable, match="refused the command"):
            await sessions._command("NO-SUCH-COMMAND")
        results["broken"] = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admit, 1)
        nursery.start_soon(broken)
        nursery.start_soon(admit, 2)
    assert results == {1: True, 2: True, "broken": True}


async def test_scripts_are_loaded_again_after_redis_forgot_them(sessions, redis_url):
    assert await sessions.admit(record(), 0)
    with redis.Redis.from_url(redis_url) as raw:
        raw.script_flush()
    assert await sessions.admit(record(), 0)
    assert len(await sessions.sessions(ADDRESS)) == 2


async def test_releases_and_key_lookups_batch_too(redis_url, sessions):
    keys = RedisKeyStore(connect(redis_url))
    await keys.put("k", {"v": 1})
    held = [record() for _ in range(10)]
    for r in held:
        assert await sessions.admit(r, 0)
    before = sessions.batches
    async with trio.open_nursery() as nursery:
        for r in held:
            nursery.start_soon(sessions.release, r)
    assert sessions.batches - before < 10
    assert await sessions.sessions(ADDRESS) == []
    found: list = []

    async def get() -> None:
        found.append(await keys.get("k"))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(get)
    assert found == [{"v": 1}] * 10 and keys.batches < 1 + 10
    await keys.aclose()


async def test_an_unreachable_redis_fails_every_call_of_the_batch(own_redis):
    store = RedisSessionStore(connect(own_redis.url), lease=30)
    own_redis.stop()
    failures: list = []

    async def admit() -> None:
        try:
            await store.admit(record(), 1)
        except StoreUnavailable as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(admit)
    assert len(failures) == 5 and all("unreachable" in str(f) for f in failures)


# -- the trio transport (one node): no worker thread ------------------------------------
async def test_one_node_is_served_from_the_trio_thread(sessions):
    assert sessions.native
    first = record()
    assert await sessions.admit(first, 5)
    before = sessions.batches
    second = record()
    assert await sessions.admit(second, 5)
    assert sessions.batches - before == 1
    await sessions.release(first)  # posted: it rides the next call's batch...
    assert await sessions.admit(record(), 5)
    assert sessions.batches - before == 2
    await sessions.release(second)  # ...or goes alone, at once, when none follows
    with trio.fail_after(2):
        while sessions.batches - before < 3:
            await trio.sleep(0.001)
    live = [r.session_id for r in await sessions.sessions(first.address)]
    assert len(live) == 1 and first.session_id not in live and second.session_id not in live
    assert sessions._worker is None  # no thread was started


async def test_a_call_queued_behind_a_stalled_batch_is_withdrawn_when_cancelled(sessions, redis_url):
    assert await sessions.admit(record(), 0)  # connected, scripts loaded
    control = redis.Redis.from_url(redis_url)
    control.execute_command("CLIENT", "PAUSE", 600, "ALL")
    sent, withdrawn = record(), record()
    results: dict = {}

    async def admit(r: SessionRecord, key: str) -> None:
        results[key] = await sessions.admit(r, 0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(admit, sent, "sent")
        await trio.sleep(0.05)  # the first batch is out, unanswered
        with trio.move_on_after(0.1) as deadline:
            await admit(withdrawn, "withdrawn")
    assert deadline.cancelled_caught and results == {"sent": True}
    ids = {r.session_id for r in await sessions.sessions(ADDRESS)}
    assert sent.session_id in ids and withdrawn.session_id not in ids
    control.close()


async def test_a_store_closed_serves_again_in_the_same_run(redis_url):
    store = RedisSessionStore(connect(redis_url), lease=30)
    assert await store.admit(record(), 0)
    await store.aclose()
    assert await store.admit(record(), 0)
    await store.aclose()


async def test_a_restarted_redis_fails_the_batch_then_serves_again(own_redis):
    store = RedisSessionStore(connect(own_redis.url), lease=30)
    assert store.native and await store.admit(record(), 0)
    own_redis.stop()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.admit(record(), 0)
    own_redis.start()
    assert await store.admit(record(), 0)  # reconnected; its scripts loaded again
    await store.aclose()


def test_sentinel_cluster_and_custom_connections_keep_the_worker_thread(redis_url):
    class Custom(redis.Connection):
        pass

    custom = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_url, connection_class=Custom))
    assert not RedisSessionStore(custom).native
    assert not RedisSessionStore(connect("redis+sentinel://127.0.0.1:1/mymaster")).native
    assert not RedisSessionStore(connect("redis+cluster://127.0.0.1:1")).native
    assert RedisSessionStore(connect("unix:///tmp/no-such-redis.sock")).native  # redis-py's Unix socket class
