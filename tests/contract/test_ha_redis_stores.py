"""The Redis stores against the store contracts over the two highly available forms of
Redis, with real parts (tests/real_parts.py):

* **Redis Cluster** (three masters, ``redis+cluster://``): every call goes to the master
  serving its key's slot; an address's sessions share a hash tag, the renewal is one
  script per slot, all API keys share one slot (so a reissue is one atomic ``RENAME``);
* **Redis Sentinel** (a master, a replica, three sentinels, ``redis+sentinel://``): the
  stores find the master through the sentinels.

Each class only provides a fresh, empty store; every test is the contract's. The
failover itself is tested in tests/integration/test_redis_ha.py.
"""

import pytest

from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.adapters.redis import RedisKeyStore, RedisSessionStore, connect
from asyncapy.testing.contracts import KeyStoreContract, SessionStoreContract
from tests.contract.test_cached_key_stores import linked


class TestClusterSessionStore(SessionStoreContract):
    @pytest.fixture
    async def store(self, cluster_url):
        store = RedisSessionStore(connect(cluster_url), lease=30)
        yield store
        await store.aclose()


class TestClusterKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, cluster_url):
        store = RedisKeyStore(connect(cluster_url))
        yield store
        await store.aclose()


class TestCachedClusterKeyStore(KeyStoreContract):
    """With the tracker linked to the master serving the keys' slot."""

    @pytest.fixture
    async def store(self, cluster_url):
        store = CachedKeyStore(RedisKeyStore(connect(cluster_url)), size=8)
        await linked(store)
        yield store
        await store.aclose()


class TestSentinelSessionStore(SessionStoreContract):
    @pytest.fixture
    async def store(self, sentinel_url):
        store = RedisSessionStore(connect(sentinel_url), lease=30)
        yield store
        await store.aclose()


class TestSentinelKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, sentinel_url):
        store = RedisKeyStore(connect(sentinel_url))
        yield store
        await store.aclose()


class TestSentinelKeyStoreWaitingForTheReplica(KeyStoreContract):
    """``?wait_replicas=1``: every key write confirmed by the replica (``WAIT``)."""

    @pytest.fixture
    async def store(self, sentinel_url):
        store = RedisKeyStore(connect(sentinel_url + "?wait_replicas=1"), wait_replicas=1)
        yield store
        await store.aclose()


class TestCachedSentinelKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, sentinel_url):
        store = CachedKeyStore(RedisKeyStore(connect(sentinel_url)), size=8)
        await linked(store)
        yield store
        await store.aclose()
