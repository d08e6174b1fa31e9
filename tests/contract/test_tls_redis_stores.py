"""The Redis stores against the store contracts over TLS: a Redis Cluster whose nodes
speak TLS only (``rediss+cluster://``) and a Sentinel set whose nodes and sentinels
speak TLS only (``rediss+sentinel://``), with certificates made by trustme and client
certificates required (tests/real_parts.py). The cached key stores' tracker links over
TLS too: its contract runs with the link up.

Each class only provides a fresh, empty store; every test is the contract's.
"""

import pytest

from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.adapters.redis import RedisKeyStore, RedisSessionStore, connect
from asyncapy.testing.contracts import KeyStoreContract, SessionStoreContract
from tests.contract.test_cached_key_stores import linked
from tests.real_parts import RedisCluster, SentinelSet


@pytest.fixture(scope="module")
def tls_cluster():
    with RedisCluster(tls=True).start() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tls_sentinels():
    with SentinelSet(tls=True).start() as sentinels:
        yield sentinels


@pytest.fixture
def tls_cluster_url(tls_cluster) -> str:
    tls_cluster.flush()
    assert tls_cluster.url.startswith("rediss+cluster://")
    return tls_cluster.url


@pytest.fixture
def tls_sentinel_url(tls_sentinels) -> str:
    tls_sentinels.flush()
    assert tls_sentinels.url.startswith("rediss+sentinel://")
    return tls_sentinels.url


class TestTLSClusterSessionStore(SessionStoreContract):
    @pytest.fixture
    async def store(self, tls_cluster_url):
        store = RedisSessionStore(connect(tls_cluster_url), lease=30)
        yield store
        await store.aclose()


class TestCachedTLSClusterKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, tls_cluster_url):
        store = CachedKeyStore(RedisKeyStore(connect(tls_cluster_url)), size=8)
        await linked(store)
        yield store
        await store.aclose()


class TestTLSSentinelSessionStore(SessionStoreContract):
    @pytest.fixture
    async def store(self, tls_sentinel_url):
        store = RedisSessionStore(connect(tls_sentinel_url), lease=30)
        yield store
        await store.aclose()


class TestCachedTLSSentinelKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, tls_sentinel_url):
        store = CachedKeyStore(RedisKeyStore(connect(tls_sentinel_url)), size=8)
        await linked(store)
        yield store
        await store.aclose()
