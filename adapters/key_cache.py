"""A per-process cache of API-key answers in front of any key store, kept coherent.

Why
---
Every packet behind ``Filters.APIFactory`` asks the key store whether its key exists.
With the keys in Redis that question costs a thread hop and a round trip per packet,
twenty times the work of serving the packet from memory. Keys change rarely (issued,
reissued, updated, revoked) and are read constantly: the answers belong in this
process's memory, provided that a change made anywhere is seen here at once.

What is cached
--------------
Both answers, by the key's SHA-256 (the clear key is never held): *present* with the
key's metadata (as JSON text, so every reader gets its own copy), and *absent*, so a
flood of one wrong key is one store call, not a flood. Present and absent answers live
in two LRU tables of ``size`` entries each: a spray of random wrong keys evicts other
wrong keys, never the valid keys in use. Memory is bounded by ``2 * size`` entries
(docs/guide-scaling-out.md gives the measured figure at :data:`DEFAULT_SIZE`).

How it stays coherent
---------------------
Two ways, chosen by the wrapped store:

* **push** (a store with a ``track(cache)`` method, such as
  :class:`asyncapy.adapters.redis.RedisKeyStore`): the store tells the cache of every
  change (:meth:`KeyCache.invalidate`), of the loss of its invalidation link
  (:meth:`KeyCache.link_down`: every entry is dropped and nothing is answered from
  memory until the link is back, :meth:`KeyCache.link_up`), and proves the link alive
  regularly (:meth:`KeyCache.alive`). An answer is served from memory only while the
  last proof is younger than the tracker's ``window``: a link that dies silently (a
  network cut, no reset) stops the cache within that window, before the loss is even
  detected.
* **TTL** (any other store, e.g. your SQL store): an answer is served for ``ttl``
  seconds after it was fetched, so a change made elsewhere is seen within ``ttl``.

In both, a change made through this wrapper is seen by this process at once, and an
answer fetched while a change raced with it is handed to its caller but not kept: a
key invalidated while its answer is in flight is marked stale, and the cache has an
*epoch*, bumped by every link event and every flush; a fetched answer is stored only
if its key was not marked and the epoch did not move while it was in flight.

Threads
-------
A push store's tracker runs in a thread of its own and calls :meth:`KeyCache.invalidate`
from there. Writes to the tables (fill, invalidate, clear) hold a lock; a lookup, the
hot path, takes none: a lookup racing an invalidation returns the answer of an instant
before, which is what it would have returned a microsecond earlier.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from typing import Any, Optional

from asyncapy.domain.ports import BLOCKING, KeyStore

__all__ = ["CachedKeyStore", "KeyCache", "DEFAULT_SIZE", "digest"]

DEFAULT_SIZE = 20_000
"""Default bound of each table (present keys, absent keys)."""

_monotonic = time.monotonic
_sha256 = hashlib.sha256


def digest(key: str) -> bytes:
    """The SHA-256 of ``key`` (UTF-8): how the cache, and Redis, name a key."""
    return _sha256(key.encode("utf-8", "surrogatepass")).digest()


def check_size(size: Any, setting: str = "cache_size") -> int:
    """``size`` if it is a positive integer; else ``ValueError`` naming ``setting``."""
    if type(size) is not int or size < 1:
        raise ValueError(
            f"{setting} must be a positive integer (the most API keys cached per process, "
            f"present and absent each; default {DEFAULT_SIZE}), not {size!r}"
        )
    return size


class KeyCache:
    """Two bounded LRU tables of key answers (present with metadata, absent), and the
    state that says whether they may be trusted.

    :param size: the bound of each table (at least 1).
    :param ttl: seconds an answer is served after it was fetched; ``None`` for a
        push-invalidated cache, which trusts nothing until :meth:`link_up`.
    """

    def __init__(self, size: int = DEFAULT_SIZE, ttl: Optional[float] = None) -> None:
        self.size: int = check_size(size)
        if ttl is not None and (type(ttl) not in (int, float) or not 0 < ttl < math.inf):
            raise ValueError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
        self.ttl = ttl
        self._present: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self._absent: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self._epoch = 0
        self._fetching: dict[bytes, int] = {}  # fetches in flight, by key
        self._stale: set[bytes] = set()  # keys invalidated while being fetched
        # Push mode starts untrusted: nothing is served until the tracker's link is up.
        self._up = ttl is not None
        self._valid_until = math.inf if ttl is not None else -math.inf
        self.hits = 0
        """Lookups answered from memory."""
        self.misses = 0
        """Lookups that went to the store (not cached, expired, or cache not trusted)."""

    # -- the hot path ---------------------------------------------------------------
    def lookup(self, name: bytes) -> Optional[tuple[bool, Optional[str]]]:
        """``(True, metadata JSON)``, ``(False, None)``, or ``None`` when the answer
        must come from the store. Counts a hit or a miss."""
        now = _monotonic()
        if now < self._valid_until:
            entry = self._present.get(name)
            if entry is not None and now < entry[0]:
                try:
                    self._present.move_to_end(name)
                except KeyError:  # invalidated meanwhile, by the tracker's thread
                    pass
                self.hits += 1
                return True, entry[1]
            expires = self._absent.get(name)
            if expires is not None and now < expires:
                try:
                    self._absent.move_to_end(name)
                except KeyError:
                    pass
                self.hits += 1
                return False, None
        self.misses += 1
        return None

    # -- filling ----------------------------------------------------------------------
    def begin(self, name: bytes) -> Optional[tuple[int, float, bytes]]:
        """Call before fetching the answer for ``name`` from the store; pass the result
        to :meth:`fill` (or :meth:`abandon`). ``None`` when nothing fetched now may be
        kept (the link is down)."""
        if not self._up:
            return None
        with self._lock:
            self._fetching[name] = self._fetching.get(name, 0) + 1
            return self._epoch, _monotonic(), name

    def _end(self, token: tuple[int, float, bytes]) -> bool:
        """Close the fetch of ``token`` (lock held); whether its answer may be kept."""
        epoch, _, name = token
        left = self._fetching.pop(name) - 1
        stale = name in self._stale
        if left:
            self._fetching[name] = left
        elif stale:
            self._stale.discard(name)
        return epoch == self._epoch and not stale

    def abandon(self, token: Optional[tuple[int, float, bytes]]) -> None:
        """The fetch begun with ``token`` failed: nothing to keep."""
        if token is not None:
            with self._lock:
                self._end(token)

    def fill(self, token: Optional[tuple[int, float, bytes]], present: bool, metadata: Optional[str]) -> None:
        """Keep an answer fetched since :meth:`begin`, unless its key was invalidated
        (or the link went down, or the store was flushed) while it was in flight."""
        if token is None:
            return
        _, started, name = token
        expires = started + self.ttl if self.ttl is not None else math.inf
        with self._lock:
            if not self._end(token):
                return
            if present:
                self._absent.pop(name, None)
                self._present[name] = (expires, metadata)  # type: ignore[assignment]
                self._present.move_to_end(name)
                if len(self._present) > self.size:
                    self._present.popitem(last=False)
            else:
                self._present.pop(name, None)
                self._absent[name] = expires
                self._absent.move_to_end(name)
                if len(self._absent) > self.size:
                    self._absent.popitem(last=False)

    # -- invalidation (any thread) ----------------------------------------------------
    def invalidate(self, name: bytes) -> None:
        """Forget the answer for the key whose digest is ``name`` (it changed); an
        answer for it in flight will not be kept either."""
        with self._lock:
            self._present.pop(name, None)
            self._absent.pop(name, None)
            if name in self._fetching:
                self._stale.add(name)

    def invalidate_all(self) -> None:
        """Forget every answer (the store was emptied, e.g. ``FLUSHDB``)."""
        with self._lock:
            self._epoch += 1
            self._present.clear()
            self._absent.clear()

    def discard_fetches(self) -> None:
        """Keep none of the answers in flight now: they may come from a node the link
        does not watch (a key of a slot being migrated, read after an ``ASK``)."""
        with self._lock:
            self._epoch += 1

    def link_down(self) -> None:
        """The invalidation link is lost: forget everything and answer nothing from
        memory until :meth:`link_up`."""
        with self._lock:
            self._up = False
            self._valid_until = -math.inf
            self._epoch += 1
            self._present.clear()
            self._absent.clear()

    def link_up(self, since: float) -> None:
        """Invalidations flow again, for every change after ``since`` (a
        :func:`time.monotonic` instant taken before tracking was enabled)."""
        with self._lock:
            self._epoch += 1  # nothing fetched before tracking began may be kept
            self._present.clear()
            self._absent.clear()
            self._up = True
        self.alive(since)

    def alive(self, since: float, window: float = 0.25) -> None:
        """Every change made before ``since`` has been delivered: answers may be
        served from memory until ``since + window``."""
        if self._up:
            until = since + window
            if until > self._valid_until:
                self._valid_until = until

    @property
    def trusted(self) -> bool:
        """Whether answers are being served from memory right now."""
        return _monotonic() < self._valid_until

    def __len__(self) -> int:
        return len(self._present) + len(self._absent)

    def stats(self) -> dict:
        """Counts for metrics and benchmarks: hits, misses, entries, trusted."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "present": len(self._present),
            "absent": len(self._absent),
            "trusted": self.trusted,
        }


class CachedKeyStore(KeyStore):
    """A :class:`~asyncapy.domain.ports.KeyStore` answering lookups from a
    :class:`KeyCache` kept coherent with ``store``.

    ``contains`` and ``get`` are served from memory when the cache is trusted and holds
    the answer; everything else goes to ``store``, and every write through this wrapper
    invalidates the keys it touched. ``APIKeyFactory(store="redis://...")`` wraps its
    Redis store in one; wrap your own store yourself
    (``APIKeyFactory(store=CachedKeyStore(MyStore(), ttl=2))``).

    :param store: the store holding the keys. If it has a ``track(cache)`` method
        (push invalidation, as :class:`~asyncapy.adapters.redis.RedisKeyStore`), it is
        called on the first lookup and must return an object with a ``close()``
        method; otherwise ``ttl`` is required.
    :param size: the bound of each table of the cache (present keys, absent keys); a
        positive integer, :data:`DEFAULT_SIZE` by default.
    :param ttl: seconds an answer is trusted without push invalidation. With a
        push store, ``None`` (the default) uses the push; a number forces TTL mode.
    """

    def __init__(self, store: KeyStore, *, size: int = DEFAULT_SIZE, ttl: Optional[float] = None) -> None:
        if not isinstance(store, KeyStore):
            raise TypeError(f"store must be a KeyStore, not {store!r}")
        push = ttl is None and callable(getattr(store, "track", None))
        if ttl is None and not push:
            raise ValueError(
                f"{type(store).__name__} pushes no invalidations: give a ttl (seconds a "
                "cached answer may be served after a change made elsewhere)"
            )
        self.store = store
        """The wrapped store."""
        self.cache: KeyCache = KeyCache(size, ttl)
        """The answers, with their hit and miss counts."""
        self._push = push
        self._tracker: Any = None
        self._tracker_lock = threading.Lock()
        self._closed = False

    def _track(self) -> None:
        with self._tracker_lock:
            if self._tracker is None and not self._closed:
                self._tracker = self.store.track(self.cache)  # type: ignore[attr-defined]

    async def _lookup(self, key: str, counted: bool = False) -> tuple[bool, Optional[str], Any]:
        """(present, metadata JSON, metadata object or None) of ``key``; ``counted``:
        the caller looked in the cache already (and counted the miss)."""
        name = digest(key)
        if not counted:
            answer = self.cache.lookup(name)
            if answer is not None:
                return answer[0], answer[1], None
        if self._push and self._tracker is None and not BLOCKING.get():
            self._track()  # from async code only: a script or a CLI call starts no thread
        token = self.cache.begin(name)
        try:
            metadata = await self.store.get(key)
            text = json.dumps(metadata)
        except KeyError:
            self.cache.fill(token, False, None)
            return False, None, None
        except BaseException:
            self.cache.abandon(token)
            raise
        self.cache.fill(token, True, text)
        return True, text, metadata

    async def contains(self, key: str) -> bool:
        if type(key) is not str:
            return False
        answer = self.cache.lookup(digest(key))  # the hot path: a hit awaits nothing more
        if answer is not None:
            return answer[0]
        return (await self._lookup(key, counted=True))[0]

    async def get(self, key: str) -> Any:
        if type(key) is not str:
            raise KeyError(key)
        present, text, metadata = await self._lookup(key)
        if not present:
            raise KeyError(key)
        return metadata if metadata is not None else json.loads(text)  # type: ignore[arg-type]

    async def put(self, key: str, metadata: Any) -> None:
        try:
            await self.store.put(key, metadata)
        finally:
            self._invalidate(key)

    async def delete(self, key: str) -> None:
        try:
            await self.store.delete(key)
        finally:
            self._invalidate(key)

    async def update(self, key: str, metadata: Any) -> None:
        try:
            await self.store.update(key, metadata)
        finally:
            self._invalidate(key)

    async def replace(self, old_key: str, new_key: str) -> None:
        try:
            await self.store.replace(old_key, new_key)
        finally:
            self._invalidate(old_key)
            self._invalidate(new_key)

    def _invalidate(self, key: Any) -> None:
        if type(key) is str:
            self.cache.invalidate(digest(key))

    async def aclose(self) -> None:
        """Stop the tracker (if any) and close the wrapped store. Idempotent."""
        with self._tracker_lock:
            tracker, self._tracker = self._tracker, None
            self._closed = True
        if tracker is not None:
            tracker.close()
        self.cache.link_down() if self._push else self.cache.invalidate_all()
        await self.store.aclose()

    def __repr__(self) -> str:
        how = "push" if self._push else f"ttl={self.cache.ttl:g}s"
        return f"CachedKeyStore({self.store!r}, size={self.cache.size}, {how})"
