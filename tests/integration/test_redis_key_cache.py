"""The per-process API-key cache in front of a real Redis (adapters/key_cache.py,
adapters/redis_tracking.py), through ``APIKeyFactory(store=REDIS_URL)``.

The invariants of docs/guide-scaling-out.md, each against a real ``redis-server``:

* a revoke, reissue or update made anywhere (another factory with its own client, as
  in another process; ``asyncapy keys`` in a subprocess; a raw ``DEL``) is honoured
  here within 100 ms; the new key of a reissue works at once;
* when the invalidation link is lost (``CLIENT KILL``, Redis restarted, a silent
  network cut), the cache is dropped and checks go to Redis, failing closed while it
  is unreachable, until the link is back; a Redis that comes back empty never lets an
  old key through;
* memory stays bounded under a spray of random keys, and the valid keys stay cached;
* an ``APIKeyFactory`` subclass overriding ``__contains__`` (the 0.5 way) is the
  source of truth: the cache never answers in its place.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import redis
import trio

from asyncapy import APIKeyFactory, Filters, Packet
from asyncapy.adapters.key_cache import DEFAULT_SIZE, CachedKeyStore
from asyncapy.adapters.redis import DEFAULT_PREFIX, RedisKeyStore, connect
from asyncapy.config import ConfigError
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.testing import open_test_client

ROOT = Path(__file__).resolve().parents[2]
HONOURED_WITHIN = 0.1
"""The bound the guide promises for a change made elsewhere, on loopback."""


def redis_name(key: str) -> str:
    return f"{DEFAULT_PREFIX}key:{hashlib.sha256(key.encode()).hexdigest()}"


async def until(condition: Callable[[], bool], within: float = 5.0) -> float:
    """Wait until ``condition()`` holds (polling every millisecond); the time it took."""
    start = trio.current_time()
    with trio.fail_after(within):
        while not condition():
            await trio.sleep(0.001)
    return trio.current_time() - start


async def honoured(check: Callable, expected: object, within: float = HONOURED_WITHIN) -> float:
    """Poll ``await check()`` until it returns ``expected``; fail past ``within``
    seconds. Returns how long it took."""
    start = trio.current_time()
    while True:
        if await check() == expected:
            return trio.current_time() - start
        elapsed = trio.current_time() - start
        assert elapsed < within, f"still not {expected!r} after {elapsed * 1000:.0f} ms"
        await trio.sleep(0.001)


async def cached_factory(url: str, **kwargs) -> APIKeyFactory:
    """A factory whose cache is linked (tracking on) and trusted."""
    factory = APIKeyFactory(store=url, **kwargs)
    assert isinstance(factory.store, CachedKeyStore)
    await factory.acontains("warm-up: starts the invalidation link")
    await until(lambda: factory.store.cache.trusted)
    return factory


def other_process_factory(url: str) -> APIKeyFactory:
    """A factory with its own client and pool and no cache: as another process."""
    return APIKeyFactory(store=RedisKeyStore(connect(url)))


async def is_hit(factory: APIKeyFactory, key: str) -> bool:
    """Whether checking ``key`` now is answered from memory."""
    before = factory.store.cache.hits
    await factory.acontains(key)
    return factory.store.cache.hits == before + 1


async def cached(factory: APIKeyFactory, key: str) -> bool:
    """Whether ``key``'s answer gets cached: checked until a check is a hit. (A check
    racing the invalidation of a change just made is answered but not kept.)"""
    with trio.fail_after(1):
        while not await is_hit(factory, key):
            await trio.sleep(0.001)
    return True


# -- coherence ---------------------------------------------------------------------------
async def test_changes_made_by_another_process_are_honoured_within_100_ms(redis_url):
    here = await cached_factory(redis_url)
    there = other_process_factory(redis_url)
    key = await there.aissue({"user": "ann"})
    assert await here.acontains(key) is True
    assert await here.aget(key) == {"user": "ann"}
    assert await cached(here, key)

    await there.aupdate(key, {"user": "ann", "plan": "pro"})
    await honoured(lambda: here.aget(key), {"user": "ann", "plan": "pro"})

    new = await there.areissue(key)
    assert await here.acontains(new) is True  # the new key works at once
    await honoured(lambda: here.acontains(key), False)

    assert await cached(here, new)
    await there.arevoke(new)
    await honoured(lambda: here.acontains(new), False)
    await there.store.aclose()
    await here.store.aclose()


async def test_a_raw_del_in_redis_is_honoured_within_100_ms(redis_url):
    here = await cached_factory(redis_url)
    key = await here.aissue("typed into redis-cli")
    assert await here.acontains(key) and await cached(here, key)
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.delete(redis_name(key)) == 1
    await honoured(lambda: here.acontains(key), False)
    await here.store.aclose()


async def test_flushdb_drops_every_cached_answer(redis_url):
    here = await cached_factory(redis_url)
    keys = [await here.aissue(n) for n in range(5)]
    for key in keys:
        assert await here.acontains(key)
    with redis.Redis.from_url(redis_url) as raw:
        raw.flushdb()
    for key in keys:
        await honoured(lambda key=key: here.acontains(key), False)
    await here.store.aclose()


async def test_asyncapy_keys_in_another_process_is_honoured_within_100_ms(redis_url):
    here = await cached_factory(redis_url)
    key = await here.aissue({"user": "cli"})
    assert await here.acontains(key) and await cached(here, key)
    env = {name: value for name, value in os.environ.items() if name != "ASYNCAPY_STORE"}

    async def keys_command(*args: str) -> str:
        done = await trio.run_process(
            [sys.executable, "-m", "asyncapy", "keys", *args, "--store", redis_url],
            cwd=ROOT, capture_stdout=True, capture_stderr=True, env=env,
        )
        assert done.stderr == b"", done.stderr
        return done.stdout.decode().strip()

    await keys_command("update", key, '{"user": "cli", "n": 2}')
    await honoured(lambda: here.aget(key), {"user": "cli", "n": 2})
    new = await keys_command("reissue", key)
    assert await here.acontains(new) is True
    await honoured(lambda: here.acontains(key), False)
    await keys_command("revoke", new)
    await honoured(lambda: here.acontains(new), False)
    await here.store.aclose()


async def test_a_change_made_here_is_seen_here_at_once(redis_url):
    keys = await cached_factory(redis_url)
    key = await keys.aissue(1)
    assert await keys.acontains(key) and await cached(keys, key)
    await keys.aupdate(key, 2)
    assert await keys.aget(key) == 2
    new = await keys.areissue(key)
    assert await keys.acontains(key) is False
    assert await keys.acontains(new) is True
    await keys.arevoke(new)
    assert await keys.acontains(new) is False
    await keys.store.aclose()


async def test_absent_keys_are_cached_and_a_key_issued_later_works_at_once(redis_url):
    here = await cached_factory(redis_url)
    there = other_process_factory(redis_url)
    wrong = "w" * 32
    assert await here.acontains(wrong) is False
    assert await is_hit(here, wrong)  # a flood of one wrong key is one store call
    await there.store.put(wrong, {"user": "late"})  # the key now exists
    await honoured(lambda: here.acontains(wrong), True)
    await there.store.aclose()
    await here.store.aclose()


async def test_metadata_served_from_memory_is_a_copy(redis_url):
    keys = await cached_factory(redis_url)
    key = await keys.aissue({"scopes": ["read"]})
    first = await keys.aget(key)
    first["scopes"].append("write")
    assert await keys.aget(key) == {"scopes": ["read"]}
    await keys.store.aclose()


# -- the invalidation link lost ----------------------------------------------------------
async def test_client_kill_drops_the_cache_and_checks_go_to_redis_until_the_link_is_back(redis_url):
    here = await cached_factory(redis_url)
    tracker = here.store._tracker
    key = await here.aissue("k")
    assert await here.acontains(key) and await cached(here, key)
    with redis.Redis.from_url(redis_url) as raw:
        killed = raw.client_kill_filter(_type="pubsub")
        assert killed >= 1
        # The cache is dropped as soon as the tracker reads the reset...
        await until(lambda: tracker.links >= 2 or len(here.store.cache) == 0, within=1)
        # ...and meanwhile every answer comes from Redis, right ones included.
        raw.delete(redis_name(key))
    await honoured(lambda: here.acontains(key), False)
    await until(lambda: tracker.links >= 2 and here.store.cache.trusted)
    other = await here.aissue("again")
    assert await here.acontains(other) and await cached(here, other)
    await here.store.aclose()


async def test_redis_restarted_empty_never_lets_an_old_key_through(own_redis, caplog):
    here = await cached_factory(own_redis.url)
    key = await here.aissue({"user": "old"})
    assert await here.acontains(key) and await cached(here, key)

    own_redis.stop()
    # Fail closed while Redis is down: the cached answer is not served...
    await until(lambda: not here.store.cache.trusted, within=HONOURED_WITHIN)
    assert len(here.store.cache) == 0
    with pytest.raises(StoreUnavailable):
        await here.acontains(key)
    # ...and the API-key filter lets nothing through: the packet is answered
    # ERR_UNAVAILABLE (the filter raises StoreUnavailable), never passed.
    with pytest.raises(StoreUnavailable):
        await Filters.APIFactory(here, "key").check(None, {"key": key})

    own_redis.start()  # the same port, no data
    await until(lambda: here.store.cache.trusted)
    assert await here.acontains(key) is False
    assert await here.acontains(key) is False  # cached absent now
    fresh = await here.aissue({"user": "new"})
    assert await here.acontains(fresh) is True
    assert "API-key cache off" in caplog.text and "on again" in caplog.text
    await here.store.aclose()


class FreezableProxy:
    """A TCP proxy to Redis that can go silent: while frozen it reads and drops every
    byte both ways without closing anything, as a network cut would look."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.frozen.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


async def test_a_silent_network_cut_stops_the_cache_within_its_window(redis_server, redis_url):
    proxy = FreezableProxy(redis_server.port)
    try:
        here = await cached_factory(f"redis://127.0.0.1:{proxy.port}/0")
        tracker = here.store._tracker
        key = await here.aissue("cut")
        assert await here.acontains(key) and await cached(here, key)

        proxy.frozen.set()
        with redis.Redis.from_url(redis_url) as raw:  # revoked where we cannot hear it
            raw.delete(redis_name(key))
        cut = trio.current_time()
        # The last proof of the link ages out: no answer from memory past the window.
        await until(lambda: not here.store.cache.trusted, within=1)
        assert trio.current_time() - cut <= tracker.window + 0.1
        with pytest.raises(StoreUnavailable):  # to Redis, which does not answer: closed
            await here.acontains(key)
        # The tracker declares the link dead and rebuilds it once the network is back.
        proxy.frozen.clear()
        await until(lambda: tracker.links >= 2 and here.store.cache.trusted, within=10)
        assert await here.acontains(key) is False
        await here.store.aclose()
    finally:
        proxy.close()


# -- bounds ------------------------------------------------------------------------------
async def test_memory_stays_bounded_under_a_spray_of_random_keys(redis_url):
    here = await cached_factory(redis_url, cache_size=100)
    valid = [await here.aissue({"n": n}) for n in range(50)]
    for key in valid:
        assert await here.acontains(key) and await cached(here, key)
    for _ in range(2000):
        assert await here.acontains(secrets.token_urlsafe(24)) is False
    stats = here.store.cache.stats()
    assert stats["absent"] == 100 and stats["present"] == 50
    for key in valid:  # the spray evicted wrong keys only
        assert await is_hit(here, key)
    await here.store.aclose()


@pytest.mark.parametrize("size", [0, -1, 1.5, "100", True])
def test_a_bad_cache_size_is_refused_naming_the_setting(redis_url, size):
    with pytest.raises(ValueError, match="cache_size"):
        APIKeyFactory(store=redis_url, cache_size=size)


@pytest.mark.parametrize("text", ["0", "-5", "lots"])
def test_a_bad_cache_size_in_the_environment_is_refused_naming_it(monkeypatch, redis_url, text):
    monkeypatch.setenv("ASYNCAPY_KEY_CACHE_SIZE", text)
    with pytest.raises(ConfigError, match="ASYNCAPY_KEY_CACHE_SIZE"):
        APIKeyFactory(store=redis_url)


def test_the_cache_size_comes_from_the_setting_the_environment_or_the_default(monkeypatch, redis_url):
    monkeypatch.delenv("ASYNCAPY_KEY_CACHE_SIZE", raising=False)
    assert APIKeyFactory(store=redis_url).store.cache.size == DEFAULT_SIZE
    monkeypatch.setenv("ASYNCAPY_KEY_CACHE_SIZE", "500")
    assert APIKeyFactory(store=redis_url).store.cache.size == 500
    assert APIKeyFactory(store=redis_url, cache_size=7).store.cache.size == 7


# -- 0.5 subclasses ------------------------------------------------------------------------
async def test_a_subclass_overriding_contains_is_the_source_of_truth(redis_url):
    """The 0.5 way: ``__contains__`` overridden. Its answer is the filter's, both ways,
    even for keys whose store answer sits in the cache."""

    class Legacy(APIKeyFactory):
        def __contains__(self, key: object) -> bool:
            if key == "magic-key-not-in-any-store":
                return True
            return super().__contains__(key) and not self.get(key).get("banned", False)

    keys = Legacy(store=redis_url)
    good = await keys.aissue({"banned": False})
    banned = await keys.aissue({"banned": True})
    assert await keys.store.contains(banned)  # the store (and its cache) says present

    app_keys = Filters.APIFactory(keys, "key")
    from asyncapy import Server

    app = Server()

    @app.add_handler(app_keys)
    async def granted(client, packet):
        await client.send(Packet({"ok": True}, encoding=client.encoding))

    @app.add_handler()
    async def denied(client, packet):
        await client.send(Packet({"ok": False}, encoding=client.encoding))

    async with open_test_client(app) as client:
        assert await client.request({"key": good}) == {"ok": True}
        assert await client.request({"key": banned}) == {"ok": False}
        assert await client.request({"key": "magic-key-not-in-any-store"}) == {"ok": True}
    await keys.store.aclose()


def test_closing_a_tracker_while_it_reads_ends_its_thread_quietly(redis_url):
    """close() tears the link's connection down from another thread, in the middle of
    the tracker's read: redis-py then fails with whatever it meets (an AttributeError
    on a buffer already gone), and the thread must end without an unhandled exception
    (the suite turns one into an error: pyproject.toml's filterwarnings)."""
    from asyncapy.adapters.key_cache import KeyCache
    from asyncapy.adapters.redis_tracking import KeyTracker

    client = redis.Redis.from_url(redis_url)
    failures: list = []
    previous = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    try:
        for attempt in range(300):
            cache = KeyCache(size=10)
            tracker = KeyTracker(client, "asyncapy:key:", cache, interval=0.0001)
            deadline = time.monotonic() + 2
            while tracker.links == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert tracker.links == 1
            time.sleep(attempt % 7 * 0.0003)  # anywhere in its ping-and-read loop
            tracker.close()
            assert not tracker.running
    finally:
        threading.excepthook = previous
        client.close()
    assert failures == []
