"""The coherent key cache (adapters/key_cache.py ``CachedKeyStore``) against the
key-store contract, in front of each kind of store it is meant for:

* a store without push (the in-memory one, standing for a user's SQL store), in TTL
  mode;
* a real Redis with push invalidation (the tracker thread linked, so answers come from
  memory once cached);
* fakeredis, which has no ``CLIENT TRACKING``: the link never comes up, the cache is
  never trusted, and every answer comes from the store: still the contract.

A wrapper changes where answers come from, never what they are.
"""

import pytest
import trio

from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.adapters.memory import MemoryKeyStore
from asyncapy.adapters.redis import RedisKeyStore, connect
from asyncapy.testing.contracts import KeyStoreContract
from tests.contract.test_redis_stores import fake_client


async def linked(store: CachedKeyStore) -> None:
    """Wait (5 s at most) until ``store``'s tracker has linked to Redis and its cache
    answers from memory: a first check starts the tracker."""
    await store.contains("link it")
    with trio.fail_after(5):
        while not store.cache.trusted:
            await trio.sleep(0.005)


class TestCachedMemoryKeyStoreWithTTL(KeyStoreContract):
    @pytest.fixture
    def store(self):
        return CachedKeyStore(MemoryKeyStore(), size=8, ttl=30)


class TestCachedRealRedisKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, redis_url):
        store = CachedKeyStore(RedisKeyStore(connect(redis_url)), size=8)
        await linked(store)
        yield store
        await store.aclose()


class TestCachedFakeRedisKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self):
        store = CachedKeyStore(RedisKeyStore(fake_client()), size=8)
        yield store
        await store.aclose()
