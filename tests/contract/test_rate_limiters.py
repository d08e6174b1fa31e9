"""Every rate limiter against the one contract (asyncapy/testing/ratelimit_contracts.py):
in memory; in Redis over fakeredis, a real redis-server, a real Cluster and a real
Sentinel set (tests/real_parts.py), through the batching front the stores use.

Each class only provides a fresh limiter; every test is the contract's. Below them,
what only one adapter promises (bounded memory, keys that expire in Redis, the
Cluster's slots).
"""

import pytest
import trio

from asyncapy.adapters.memory_ratelimit import MemoryRateLimiter
from asyncapy.adapters.redis import connect
from asyncapy.adapters.redis_ratelimit import RedisRateLimiter
from asyncapy.domain.ports import run_to_completion
from asyncapy.domain.ratelimit import Decision, Rate
from asyncapy.testing.ratelimit_contracts import RateLimiterContract
from tests.contract.test_redis_stores import fake_client


class TestMemoryRateLimiter(RateLimiterContract):
    @pytest.fixture
    def limiter(self):
        return MemoryRateLimiter()


class TestFakeRedisRateLimiter(RateLimiterContract):
    @pytest.fixture
    def limiter(self):
        return RedisRateLimiter(fake_client())


class TestRealRedisRateLimiter(RateLimiterContract):
    @pytest.fixture
    async def limiter(self, redis_url):
        limiter = RedisRateLimiter(connect(redis_url))
        yield limiter
        await limiter.aclose()


class TestClusterRateLimiter(RateLimiterContract):
    @pytest.fixture
    async def limiter(self, cluster_url):
        limiter = RedisRateLimiter(connect(cluster_url))
        yield limiter
        await limiter.aclose()


class TestSentinelRateLimiter(RateLimiterContract):
    @pytest.fixture
    async def limiter(self, sentinel_url):
        limiter = RedisRateLimiter(connect(sentinel_url))
        yield limiter
        await limiter.aclose()


# -- beyond the contract ---------------------------------------------------------------
def test_the_memory_limiter_runs_without_an_event_loop_and_on_its_own_clock():
    now = [10**12]
    limiter = MemoryRateLimiter(clock=lambda: now[0])
    assert run_to_completion(limiter.acquire("k", "10/s", 1)) == Decision(True, 0.0, 1)
    assert run_to_completion(limiter.acquire("k", "10/s", 1)) == Decision(True, 0.0, 0)
    assert run_to_completion(limiter.acquire("k", "10/s", 1)) == Decision(False, 0.1, 0)
    now[0] += 100_000
    assert run_to_completion(limiter.acquire("k", "10/s", 1)).allowed


def test_the_memory_limiter_forgets_idle_keys_and_keeps_to_its_capacity():
    now = [10**12]
    limiter = MemoryRateLimiter(capacity=1_000, clock=lambda: now[0])
    for n in range(5_000):
        run_to_completion(limiter.acquire(f"198.51.100.{n}", "100/s", 5))
    assert len(limiter) == 1_000
    now[0] += 10_000  # every debt paid
    for _ in range(500):
        run_to_completion(limiter.acquire("busy", "1000000/s", 0))
        now[0] += 1
    assert len(limiter) <= 2
    assert repr(limiter).startswith("MemoryRateLimiter(")


def _ttl_ms(limiter: RedisRateLimiter, key: str) -> int:
    client = limiter.redis.node_client(limiter._name(key)) if limiter.cluster else limiter.redis
    return client.pttl(limiter._name(key))


async def test_a_redis_key_expires_when_its_debt_is_paid(redis_url):
    """Redis holds only keys active now: each state expires (PX) at its TAT."""
    limiter = RedisRateLimiter(connect(redis_url), prefix="t:")
    try:
        await limiter.acquire("203.0.113.1", Rate(10, 1), 4, 5)  # 0.5 s of debt
        ttl = await trio.to_thread.run_sync(_ttl_ms, limiter, "203.0.113.1")
        assert 400 < ttl <= 500
        slow = await limiter.acquire("slow", Rate(1, 3600), 0)
        assert slow.allowed
        ttl = await trio.to_thread.run_sync(_ttl_ms, limiter, "slow")
        assert 3_590_000 < ttl <= 3_600_000
        assert limiter._name("203.0.113.1") == "t:rate:{203.0.113.1}"
        await trio.sleep(0.55)
        assert await trio.to_thread.run_sync(_ttl_ms, limiter, "203.0.113.1") == -2  # gone
    finally:
        await limiter.aclose()


async def test_cluster_keys_spread_over_the_masters_by_their_hash_tag(cluster_url, redis_cluster):
    limiter = RedisRateLimiter(connect(cluster_url))
    try:
        keys = [f"198.51.100.{n}" for n in range(30)]
        decisions = await limiter.acquire_many([(key, Rate(1, 3600), 0, 1) for key in keys])
        assert all(d.allowed for d in decisions)
        owners = {redis_cluster.owner(limiter.redis.slot(limiter._name(key))) for key in keys}
        assert len(owners) == len(redis_cluster.ports)  # one batch, every master served
        again = await limiter.acquire_many([(key, Rate(1, 3600), 0, 1) for key in keys])
        assert not any(d.allowed for d in again)
    finally:
        await limiter.aclose()


def test_a_prefix_with_braces_is_refused():
    with pytest.raises(ValueError, match="must not hold"):
        RedisRateLimiter(fake_client(), prefix="a{b}:")


async def test_redis_outage_is_store_unavailable_and_a_flushed_script_is_loaded_again(own_redis_limiter):
    from asyncapy.domain.errors import StoreUnavailable

    server, limiter = own_redis_limiter
    assert (await limiter.acquire("k", Rate(1, 3600), 0)).allowed
    await trio.to_thread.run_sync(lambda: limiter.redis.script_flush())
    assert not (await limiter.acquire("k", Rate(1, 3600), 0)).allowed  # NOSCRIPT: loaded again
    server.stop()
    with pytest.raises(StoreUnavailable):
        await limiter.acquire("k", Rate(1, 3600), 0)
    server.start()
    assert (await limiter.acquire("k", Rate(1, 3600), 0)).allowed  # a new Redis: a new allowance


def test_the_redis_limiter_serves_synchronous_callers(redis_url):
    """Outside an event loop (a script, a command) the call blocks on a pooled
    connection, as the stores' calls do."""
    limiter = RedisRateLimiter(connect(redis_url))
    assert run_to_completion(limiter.acquire("k", "1/h", 1)) == Decision(True, 0.0, 1)
    assert run_to_completion(limiter.acquire_many([("k", "1/h", 1, 1), ("k", "1/h", 1, 1)]))[1].allowed is False
    run_to_completion(limiter.aclose())


@pytest.fixture
async def own_redis_limiter():
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    limiter = RedisRateLimiter(connect(server.url))
    try:
        yield server, limiter
    finally:
        await limiter.aclose()
        server.stop()
