"""The key cache's bookkeeping (adapters/key_cache.py ``KeyCache``), without any store:
bounds, TTL, trust, and the races between a fetch and an invalidation."""

import math

import pytest

from asyncapy.adapters import key_cache
from asyncapy.adapters.key_cache import CachedKeyStore, KeyCache, digest
from asyncapy.adapters.memory import MemoryKeyStore
from asyncapy.domain.ports import run_to_completion

A, B = digest("key-a"), digest("key-b")


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(key_cache, "_monotonic", lambda: now[0])
    return now


def linked(size: int = 4) -> KeyCache:
    cache = KeyCache(size)
    cache.link_up(key_cache._monotonic())
    return cache


def test_a_push_cache_trusts_nothing_until_its_link_is_up(clock):
    cache = KeyCache(4)
    assert not cache.trusted
    assert cache.begin(A) is None  # nothing fetched before the link may be kept
    cache.fill(cache.begin(A), True, "1")
    assert cache.lookup(A) is None
    cache.link_up(clock[0])
    cache.fill(cache.begin(A), True, '{"n": 1}')
    assert cache.lookup(A) == (True, '{"n": 1}')
    assert (cache.hits, cache.misses) == (1, 1)


def test_answers_are_served_only_within_the_window_of_the_last_proof(clock):
    cache = linked()
    cache.fill(cache.begin(A), False, None)
    cache.alive(clock[0], window=0.25)
    clock[0] += 0.2
    assert cache.lookup(A) == (False, None)
    clock[0] += 0.1
    assert cache.lookup(A) is None and not cache.trusted  # silent link: no proof lately
    cache.alive(clock[0], window=0.25)
    assert cache.lookup(A) == (False, None)  # kept: the link was never lost


def test_link_down_drops_everything_and_fetches_in_flight(clock):
    cache = linked()
    cache.fill(cache.begin(A), True, "1")
    token = cache.begin(B)
    cache.link_down()
    assert len(cache) == 0 and not cache.trusted
    cache.link_up(clock[0])
    cache.fill(token, True, "2")  # fetched across the outage: not kept
    assert cache.lookup(B) is None


def test_an_invalidation_during_a_fetch_keeps_its_answer_out(clock):
    cache = linked()
    first = cache.begin(A)
    second = cache.begin(A)
    cache.invalidate(A)
    cache.fill(first, True, "old")
    cache.fill(second, True, "old")
    assert cache.lookup(A) is None
    cache.fill(cache.begin(A), True, "new")  # a fetch begun after it is kept
    assert cache.lookup(A) == (True, "new")
    assert cache._fetching == {} and cache._stale == set()


def test_an_abandoned_fetch_leaves_nothing_behind(clock):
    cache = linked()
    cache.abandon(cache.begin(A))
    assert cache._fetching == {} and cache.lookup(A) is None


def test_each_table_is_a_bounded_lru(clock):
    cache = linked(size=3)
    names = [digest(f"k{n}") for n in range(5)]
    for name in names[:3]:
        cache.fill(cache.begin(name), True, "m")
    assert cache.lookup(names[0])  # now the most recently used
    cache.fill(cache.begin(names[3]), True, "m")
    assert cache.lookup(names[1]) is None  # the least recently used went
    for n in range(100):  # absent answers never push present ones out
        name = digest(f"wrong{n}")
        cache.fill(cache.begin(name), False, None)
    assert cache.stats()["present"] == 3 and cache.stats()["absent"] == 3
    assert cache.lookup(names[0]) and cache.lookup(names[3])


def test_a_key_changing_answer_moves_between_tables(clock):
    cache = linked()
    cache.fill(cache.begin(A), False, None)
    cache.fill(cache.begin(A), True, "1")
    assert cache.stats()["absent"] == 0 and cache.lookup(A) == (True, "1")


def test_ttl_mode_serves_an_answer_for_ttl_seconds(clock):
    cache = KeyCache(4, ttl=2)
    assert cache.trusted
    cache.fill(cache.begin(A), True, "1")
    clock[0] += 1.9
    assert cache.lookup(A) == (True, "1")
    clock[0] += 0.2
    assert cache.lookup(A) is None


@pytest.mark.parametrize("size", [0, -1, 2.5, "10", True, None])
def test_the_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="cache_size must be a positive integer"):
        KeyCache(size)


@pytest.mark.parametrize("ttl", [0, -1, math.inf, "1"])
def test_the_ttl_must_be_a_positive_number(ttl):
    with pytest.raises(ValueError, match="ttl"):
        KeyCache(4, ttl=ttl)


def test_a_store_without_push_needs_a_ttl():
    with pytest.raises(ValueError, match="MemoryKeyStore pushes no invalidations: give a ttl"):
        CachedKeyStore(MemoryKeyStore())
    with pytest.raises(TypeError):
        CachedKeyStore(object())  # type: ignore[arg-type]


def test_ttl_wrapper_sees_its_own_writes_at_once_and_others_after_the_ttl(clock):
    backend = MemoryKeyStore()
    cached = CachedKeyStore(backend, ttl=5)
    run_to_completion(cached.put("k", {"v": 1}))
    assert run_to_completion(cached.get("k")) == {"v": 1}
    run_to_completion(backend.put("k", {"v": 2}))  # another process, no push
    assert run_to_completion(cached.get("k")) == {"v": 1}
    clock[0] += 5.1
    assert run_to_completion(cached.get("k")) == {"v": 2}
    run_to_completion(cached.delete("k"))
    assert run_to_completion(cached.contains("k")) is False
    assert "ttl=5s" in repr(cached)
