"""``APIKeyFactory``: issue, look up, reissue and revoke API keys.

The synchronous methods (``issue``, ``get``, ``revoke``, ``reissue``, ``update``,
``key in factory``) are the AsyncAPY 0.5 API and work from any script; ``issue`` also
takes a key's own rate limit (``rate_limit``, ``rate_burst``), stored with the key
(:mod:`asyncapy.domain.keylimits`) and read back with ``rate_limit(key)``. Inside the
server, the ``Filters.APIFactory`` filter uses the async twins (``acontains`` ...),
which never block the event loop.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import weakref
from typing import Any, Optional, Union

import trio

from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.adapters.memory import MemoryKeyStore
from asyncapy.domain.keylimits import KeyLimit, key_limit
from asyncapy.domain.keylimits import unwrap as unwrap_key_record
from asyncapy.domain.keylimits import wrap as wrap_key_record
from asyncapy.domain.ports import KeyStore, run_to_completion
from asyncapy.domain.ratelimit import Rate

from .metered import metered_key_store
from .metrics import watch_key_cache
from .stores import open_key_store

__all__ = ["APIKeyFactory", "KEY_ALPHABET", "fingerprint", "where_keys_live"]

KEY_ALPHABET = string.ascii_letters + string.digits + "-_"
"""The URL-safe alphabet keys are drawn from (the one of base64url)."""

_FIRST_ALPHABET = string.ascii_letters + string.digits
# A key's first character is never "-": a key that looks like an option would need
# "--" before it on every command line (``asyncapy keys get KEY``).


def fingerprint(key: str) -> str:
    """A short, non-reversible tag of ``key`` for logs: never log the key itself."""
    return hashlib.sha256(str(key).encode("utf-8", "surrogatepass")).hexdigest()[:12]


_factories: "weakref.WeakSet[APIKeyFactory]" = weakref.WeakSet()


def where_keys_live(prefix: str = "") -> str:
    """Where the API keys of this process's factories live, for the startup log:
    ``prefix`` and each distinct store once (no credentials), or ``""`` when the
    process has no ``APIKeyFactory``."""
    stores = list(dict.fromkeys(_describe(factory.store) for factory in list(_factories)))
    return prefix + "; ".join(stores) if stores else ""


def _metered(store: KeyStore) -> KeyStore:
    """``store`` as a factory keeps it: timed into the recorder of the server that
    serves this process, once one counts (:func:`asyncapy.metrics.published`), chosen
    here, when the factory is made, so that nothing is rewired when a server starts.

    A :class:`~asyncapy.adapters.key_cache.CachedKeyStore` is metered inside: the store
    behind the cache is timed (what a look-up the cache could not answer costs), and
    the cache's own counts become ``asyncapy_key_cache_hits_total`` and
    ``_misses_total``. An in-memory store is left as it is: its calls take no time
    worth a histogram, and ``APIKeyFactory`` reads it directly."""
    if isinstance(store, CachedKeyStore):
        watch_key_cache(store.cache)
        store.store = metered_key_store(store.store)
        return store
    if isinstance(store, MemoryKeyStore):
        return store
    return metered_key_store(store)


def _describe(store: KeyStore) -> str:
    if isinstance(store, MemoryKeyStore):
        return "memory (this process only)"
    return repr(store)


class APIKeyFactory:
    """Manage API keys and their metadata.

    Keys come from :mod:`secrets` (a CSPRNG) over a 64-symbol URL-safe alphabet, so a
    32-character key carries 192 bits of entropy. Every method that takes a key raises
    ``KeyError`` when the key does not exist.

    Subclasses may override the documented synchronous methods; the API-key filter then
    calls the overridden method in a worker thread so the event loop never blocks.

    :param size: the length of issued keys, in characters (default 32, at least 16).
    :param store: where keys live: ``'memory://'`` for an in-memory store private to
        this factory, a ``redis://`` URL shared by every process using it, a
        ``sqlite:///PATH`` URL for a file that survives restarts and is shared by the
        processes of one machine (``sqlite:///keys.db`` relative to the working
        directory, ``sqlite:////abs/keys.db`` absolute), or any
        :class:`asyncapy.domain.ports.KeyStore` object (your own adapter). ``None``
        (the default) is the process's default store: the one ``asyncapy run
        --store`` names, else the ``ASYNCAPY_STORE`` environment variable, else memory
        (:func:`asyncapy.stores.default_store`).
    :param cache_size: with a Redis store, how many keys this process keeps in its
        coherent cache, present and absent each (keyword-only; a positive integer;
        default ``ASYNCAPY_KEY_CACHE_SIZE`` or 20000). A Redis URL opens the store
        behind a :class:`~asyncapy.adapters.key_cache.CachedKeyStore`; a store object
        is used as it is.
    """

    def __init__(
        self, size: int = 32, store: Union[None, str, KeyStore] = None, *, cache_size: Optional[int] = None
    ) -> None:
        if type(size) is not int or size < 16:
            raise ValueError(f"size must be an integer of at least 16, not {size!r}")
        self.size = size
        self.store: KeyStore = _metered(open_key_store(store, cache_size=cache_size))
        _factories.add(self)

    # -- the synchronous API (0.5) ----------------------------------------------------
    def issue(self, metadata: Any = None, *, rate_limit: Union[None, str, Rate] = None, rate_burst: int = 0) -> str:
        """Create, store and return a new key carrying ``metadata``.

        :param rate_limit: the key's own rate limit, ``N/s``, ``N/m`` or ``N/h``
            (keyword-only; None, the default: none), stored with the key so that every
            process enforces it (see ``docs/guide-rate-limits.md``).
        :param rate_burst: requests the key may make at once above ``rate_limit``.
        """
        return run_to_completion(self.aissue(metadata, rate_limit=rate_limit, rate_burst=rate_burst))

    def get(self, key: str) -> Any:
        """The metadata of ``key`` (without its rate limit: see :meth:`rate_limit`)."""
        return run_to_completion(self.aget(key))

    def rate_limit(self, key: str) -> Optional[KeyLimit]:
        """The rate limit stored with ``key`` (None: it has none)."""
        return run_to_completion(self.arate_limit(key))

    def set_rate_limit(self, key: str, rate_limit: Union[None, str, Rate], *, rate_burst: int = 0) -> None:
        """Give ``key`` the rate limit ``rate_limit`` with ``rate_burst`` (None: none),
        keeping its metadata."""
        run_to_completion(self.aset_rate_limit(key, rate_limit, rate_burst=rate_burst))

    def revoke(self, key: str) -> None:
        """Delete ``key``: it stops working at once."""
        run_to_completion(self.arevoke(key))

    def reissue(self, key: str) -> str:
        """Replace ``key`` with a new one that keeps its metadata; return the new key."""
        return run_to_completion(self.areissue(key))

    def update(self, key: str, metadata: Any) -> None:
        """Replace the metadata of ``key`` (its rate limit stays)."""
        run_to_completion(self.aupdate(key, metadata))

    def __contains__(self, key: object) -> bool:
        return type(key) is str and run_to_completion(self.store.contains(key))

    # -- the async API (inside the server) -------------------------------------------
    def new_key(self) -> str:
        """A fresh random key of :attr:`size` characters (not stored), drawn from
        :data:`KEY_ALPHABET`; the first is a letter or a digit, so that a key never
        looks like a command-line option."""
        return secrets.choice(_FIRST_ALPHABET) + "".join(
            secrets.choice(KEY_ALPHABET) for _ in range(self.size - 1)
        )

    async def aissue(self, metadata: Any = None, *, rate_limit: Union[None, str, Rate] = None, rate_burst: int = 0) -> str:
        """Async :meth:`issue`."""
        limit = key_limit(rate_limit, rate_burst)  # checked before anything is stored
        key = self.new_key()
        await self.store.put(key, wrap_key_record(metadata, limit))
        return key

    async def aget(self, key: str) -> Any:
        """Async :meth:`get`."""
        return unwrap_key_record(await self.store.get(key))[0]

    async def arate_limit(self, key: str) -> Optional[KeyLimit]:
        """Async :meth:`rate_limit`: what the server awaits for a key's limit (answered
        from the key cache, like the key check, with a Redis store)."""
        return unwrap_key_record(await self.store.get(key))[1]

    async def aset_rate_limit(self, key: str, rate_limit: Union[None, str, Rate], *, rate_burst: int = 0) -> None:
        """Async :meth:`set_rate_limit`. A read then a write: a concurrent
        :meth:`update` of the same key may be lost."""
        limit = key_limit(rate_limit, rate_burst)
        metadata, _ = unwrap_key_record(await self.store.get(key))
        await self.store.update(key, wrap_key_record(metadata, limit))

    async def arevoke(self, key: str) -> None:
        """Async :meth:`revoke`."""
        await self.store.delete(key)

    async def areissue(self, key: str) -> str:
        """Async :meth:`reissue`."""
        new = self.new_key()
        await self.store.replace(key, new)
        return new

    async def aupdate(self, key: str, metadata: Any) -> None:
        """Async :meth:`update`. A key with a rate limit is read first, to keep it."""
        _, limit = unwrap_key_record(await self.store.get(key))
        await self.store.update(key, wrap_key_record(metadata, limit))

    async def acontains(self, key: object) -> bool:
        """Async ``key in factory``: what the API-key filter awaits.

        If a subclass overrides ``__contains__`` (the 0.5 way to plug in a database),
        that method runs in a worker thread; otherwise the store answers directly,
        with no thread hop for the in-memory store.
        """
        if type(key) is not str:
            return False
        if type(self).__contains__ is not APIKeyFactory.__contains__:
            return await trio.to_thread.run_sync(self.__contains__, key)
        return await self.store.contains(key)

    @property
    def _keys(self) -> dict[str, Any]:
        # 0.5 subclasses reached into the key dict; keep that working for the memory store.
        if isinstance(self.store, MemoryKeyStore):
            return self.store._keys
        raise AttributeError("_keys exists only with the in-memory store")

    @_keys.setter
    def _keys(self, keys: dict[str, Any]) -> None:
        if not isinstance(self.store, MemoryKeyStore):
            raise AttributeError("_keys exists only with the in-memory store")
        self.store._keys = keys

    def __repr__(self) -> str:
        return f"APIKeyFactory(size={self.size}, store={self.store!r})"
