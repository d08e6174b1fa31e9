"""The Redis stores (adapters/redis.py) against the store contracts, twice over.

* over **fakeredis** (in-process, with Lua scripting through ``lupa``: the
  ``fakeredis[lua]`` extra), for fast unit runs;
* over a **real redis-server** (the session-scoped ``redis_server`` fixture, emptied
  before each test), through :func:`asyncapy.adapters.redis_urls.connect`, the client the server
  itself uses: the admission and renewal scripts run in the real Lua engine, with
  the real ``TIME``, and the stores go through the thread hop and the bounded pool.

Each class only provides a fresh, empty store; every test is the contract's.
"""

import fakeredis
import pytest

from asyncapy.adapters.redis import RedisKeyStore, RedisSessionStore, connect
from asyncapy.testing.contracts import KeyStoreContract, SessionStoreContract


def fake_client() -> fakeredis.FakeRedis:
    """A fakeredis client on its own, empty, fake server."""
    try:
        import lupa  # noqa: F401  (fakeredis runs EVAL/EVALSHA with it)
    except ImportError:
        pytest.fail(
            "fakeredis cannot run the adapters' Lua scripts without lupa: install the "
            "test extra (pip install -e '.[test]', which pulls fakeredis[lua])",
            pytrace=False,
        )
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


class TestFakeRedisSessionStore(SessionStoreContract):
    # fakeredis runs each admission's Lua in about 0.6 ms: 10,000 would take 6 s. 2,500
    # still lists in three HMGET chunks, and a script passing every id to one HMGET
    # already fails here; the real-redis class below runs the full count.
    many_sessions = 2_500

    @pytest.fixture
    def store(self):
        return RedisSessionStore(fake_client(), lease=30)


class TestFakeRedisKeyStore(KeyStoreContract):
    @pytest.fixture
    def store(self):
        return RedisKeyStore(fake_client())


class TestRealRedisSessionStore(SessionStoreContract):
    @pytest.fixture
    async def store(self, redis_url):
        store = RedisSessionStore(connect(redis_url), lease=30)
        yield store
        await store.aclose()


class TestRealRedisKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, redis_url):
        store = RedisKeyStore(connect(redis_url))
        yield store
        await store.aclose()


def test_fakeredis_runs_the_adapters_lua_scripts():
    """The fakeredis classes above are only meaningful if fakeredis executes Lua,
    including ``redis.call('TIME')`` the lease scripts rely on (it needs ``lupa``)."""
    client = fake_client()
    script = client.register_script("local t = redis.call('TIME') return {t[1], t[2]}")
    seconds, micros = script([], [])
    assert int(seconds) > 1_600_000_000
    assert 0 <= int(micros) < 1_000_000
