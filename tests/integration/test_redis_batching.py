"""Store calls batched per scheduling round (adapters/redis.py ``_RedisAdapter``): the
calls tasks make in one round go to Redis as one pipelined round trip from one worker
thread, each keeping its own reply and its own failure, and admission stays exact.
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
