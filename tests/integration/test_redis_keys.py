"""API keys in a real Redis (adapters/redis.py ``RedisKeyStore``, through ``APIKeyFactory``).

What only a shared store promises, beyond the key-store contract: keys are stored only
as SHA-256 digests (the clear key is nowhere in Redis, neither in a key name nor in a
value), reissuing is one atomic step, and what one factory (one process, its own Redis
client) issues, updates, reissues or revokes, another sees on its very next check
(the coherence of the per-process cache in front of it: test_redis_key_cache.py).

The synchronous tests use the 0.5 API from plain code (no event loop), as an admin
script would; the async ones use the ``a...`` twins, as the server does.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import pytest
import redis
import trio

from asyncapy import APIKeyFactory
from asyncapy.adapters.redis import DEFAULT_PREFIX, RedisKeyStore, connect


def everything_in(client: redis.Redis) -> Iterator[bytes]:
    """Every key name and every stored value (and member, field, score) in Redis."""
    for name in client.scan_iter(count=1000):
        yield name
        kind = client.type(name)
        if kind == b"string":
            yield client.get(name)
        elif kind == b"hash":
            for field, value in client.hgetall(name).items():
                yield field
                yield value
        elif kind == b"zset":
            for member, score in client.zrange(name, 0, -1, withscores=True):
                yield member
                yield repr(score).encode()
        elif kind == b"set":
            yield from client.smembers(name)
        elif kind == b"list":
            yield from client.lrange(name, 0, -1)
        else:  # pragma: no cover - the adapters write nothing else
            raise AssertionError(f"unexpected Redis type {kind!r} at {name!r}")


def digest_name(key: str) -> bytes:
    return f"{DEFAULT_PREFIX}key:{hashlib.sha256(key.encode()).hexdigest()}".encode()


@pytest.fixture
def inspector(redis_url) -> Iterator[redis.Redis]:
    """A separate client for looking into Redis directly."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_keys_are_stored_only_hashed(redis_url, inspector):
    factory = APIKeyFactory(store=redis_url)
    keys = [factory.issue({"user": f"user-{n}", "scopes": ["read"]}) for n in range(5)]
    reissued = factory.reissue(keys[0])
    factory.update(keys[1], {"user": "renamed"})
    live = [reissued, *keys[1:]]

    dump = list(everything_in(inspector))
    assert sorted(name for name in inspector.scan_iter()) == sorted(map(digest_name, live))
    for key in [*keys, reissued]:
        for item in dump:
            assert key.encode() not in item, f"the clear key {key!r} is in Redis: {item!r}"
    # ...and the metadata is there, as JSON, under the digest.
    assert inspector.get(digest_name(keys[1])) == b'{"user": "renamed"}'
    assert factory.get(reissued) == {"user": "user-0", "scopes": ["read"]}


def test_reissue_moves_the_metadata_and_kills_the_old_key(redis_url, inspector):
    factory = APIKeyFactory(store=redis_url)
    old = factory.issue({"user": "alice", "plan": {"tier": 2}})
    bystander = factory.issue("bob")
    new = factory.reissue(old)
    assert new != old and len(new) == factory.size
    assert old not in factory
    assert new in factory
    assert factory.get(new) == {"user": "alice", "plan": {"tier": 2}}
    assert factory.get(bystander) == "bob"
    with pytest.raises(KeyError):
        factory.get(old)
    with pytest.raises(KeyError):
        factory.reissue(old)  # a dead key cannot be reissued...
    assert inspector.dbsize() == 2  # ...and trying created nothing


async def test_concurrent_reissues_of_one_key_have_exactly_one_winner(redis_url, inspector):
    """Reissue is one atomic step in Redis: of many processes reissuing the same key at
    once (here: tasks with their own clients), one gets the new key, the others a
    KeyError, and exactly one key with the metadata remains."""
    factories = [APIKeyFactory(store=RedisKeyStore(connect(redis_url))) for _ in range(8)]
    old = await factories[0].aissue({"user": "carol"})
    winners: list[str] = []
    losers: list[int] = []

    async def reissue(n: int, factory: APIKeyFactory) -> None:
        try:
            winners.append(await factory.areissue(old))
        except KeyError:
            losers.append(n)

    async with trio.open_nursery() as nursery:
        for n, factory in enumerate(factories):
            nursery.start_soon(reissue, n, factory)
    assert len(winners) == 1 and len(losers) == 7
    assert inspector.dbsize() == 1
    assert await factories[3].aget(winners[0]) == {"user": "carol"}
    for factory in factories:
        await factory.store.aclose()


def test_another_process_sees_every_change_at_once(redis_url):
    """Factory B (its own client and pool, as in another process, and no cache) sees
    what factory A does on its very next check, and the other way round. (A's cache is
    not in play either: a script's synchronous checks start no invalidation link, so
    they go to Redis; the cache's own tests are in test_redis_key_cache.py.)"""
    a = APIKeyFactory(store=redis_url)
    b = APIKeyFactory(store=RedisKeyStore(connect(redis_url)))
    assert a.store.store.redis is not b.store.redis

    key = a.issue({"user": "dave"})
    assert key in b
    assert b.get(key) == {"user": "dave"}

    a.update(key, {"user": "dave", "admin": True})
    assert b.get(key) == {"user": "dave", "admin": True}

    new = b.reissue(key)
    assert key not in a
    assert new in a
    assert a.get(new) == {"user": "dave", "admin": True}

    a.revoke(new)
    assert new not in b
    with pytest.raises(KeyError):
        b.revoke(new)


async def test_the_async_api_of_two_factories_shares_keys_too(redis_url):
    a = APIKeyFactory(store=redis_url)
    b = APIKeyFactory(store=RedisKeyStore(connect(redis_url)))
    key = await a.aissue(["scope-1"])
    assert await b.acontains(key) is True
    await b.arevoke(key)
    assert await a.acontains(key) is False
    assert await a.acontains(None) is False
    await b.store.aclose()


async def test_synchronous_key_methods_work_inside_trio_and_leak_nothing(redis_url):
    """``keys.issue()`` called from async code blocks for one round trip but works;
    it must not keep a token of the adapter's thread limiter, or the 17th call and
    every key check after it would hang."""
    keys = APIKeyFactory(store=redis_url)
    issued = [keys.issue({"n": n}) for n in range(40)]
    assert all(key in keys for key in issued)
    with trio.fail_after(5):
        assert await keys.acontains(issued[-1]) is True
        assert await keys.aget(issued[0]) == {"n": 0}
