"""Store selection: ``None`` / ``"memory://"`` / ``"redis://..."`` / ``"sqlite:///..."`` -> an adapter.

The composition root's one place that knows which adapters exist. A URL names where
sessions or keys live; an object implementing the port is used as it is. Redis
clients are shared per URL within a process, so a server and the API-key factories of
one process use one connection pool. A ``sqlite://`` URL names a file of API keys
(:mod:`asyncapy.adapters.sqlite`): a key store only; given as a server's store, its
sessions stay in the process. Which URL schemes exist, and every text that lists them,
come from one table: :mod:`asyncapy.adapters.store_urls`.

A key store opened from a Redis URL is wrapped in a
:class:`~asyncapy.adapters.key_cache.CachedKeyStore`: key checks are answered from this
process's memory, kept coherent by Redis (see docs/guide-scaling-out.md).

The default key store
---------------------
``APIKeyFactory()`` without ``store=`` opens :func:`default_store`: the store
``asyncapy run --store`` names (:func:`set_default_store`, called before the
application is imported), else the ``ASYNCAPY_STORE`` environment variable, else
memory. An explicit ``store=`` always wins.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional, Union

from asyncapy.adapters import store_urls
from asyncapy.adapters.memory import MemoryKeyStore, MemorySessionStore
from asyncapy.domain.ports import KeyStore, RateLimiter, SessionStore

from .config import SETTINGS, ConfigError, validate

__all__ = [
    "open_session_store",
    "open_key_store",
    "open_rate_limiter",
    "redis_client",
    "check_store_url",
    "STORE_ACCEPTED",
    "KEY_STORE_ACCEPTED",
    "STORE_ENV",
    "CACHE_SIZE_ENV",
    "default_store",
    "set_default_store",
    "key_cache_size",
]

STORE_ENV = "ASYNCAPY_STORE"
"""The environment variable naming the default store (``asyncapy run``, ``asyncapy
keys`` and every ``APIKeyFactory()`` without ``store=``)."""

CACHE_SIZE_ENV = "ASYNCAPY_KEY_CACHE_SIZE"
"""The environment variable giving the default ``cache_size`` of API-key factories."""

STORE_ACCEPTED = f"None, a {store_urls.listing()} URL, or a SessionStore object"
"""What a ``store`` setting accepts, for error messages (from the scheme table:
:data:`asyncapy.adapters.store_urls.SCHEMES`)."""

KEY_STORE_ACCEPTED = f"None, a {store_urls.listing()} URL, or a KeyStore object"
"""What an ``APIKeyFactory``'s ``store`` accepts, for error messages."""

_default: Optional[str] = None
"""What ``asyncapy run --store`` named, if anything (see :func:`set_default_store`)."""

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def check_store_url(url: str) -> None:
    """Refuse (:class:`ValueError`) a ``url`` that names no store
    (:func:`asyncapy.adapters.store_urls.check`): the message says what is wrong and
    gives one good URL, without quoting ``url``, which may carry a password."""
    store_urls.check(url)


def _scheme(url: Any) -> store_urls.Scheme:
    """Validate a store URL (``ConfigError`` naming ``store``); its scheme."""
    validate("store", url)  # checked: scheme_of() knows it
    return store_urls.scheme_of(url)  # type: ignore[return-value]


def redis_client(url: str) -> Any:
    """The process-wide redis-py client of ``url`` (created on first use)."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            from asyncapy.adapters.redis_urls import connect

            try:
                client = _clients[url] = connect(url)
            except ValueError as exc:  # its message never quotes the URL; ConfigError redacts it
                raise ConfigError("store", url, SETTINGS["store"].accepted, reason=str(exc)) from None
        return client


def set_default_store(url: Optional[str]) -> None:
    """Make ``url`` the store of every ``APIKeyFactory()`` created from now on without
    ``store=`` (``None`` goes back to ``ASYNCAPY_STORE``). ``asyncapy run --store``
    calls it before importing the application."""
    global _default
    _default = None if url is None else validate("store", url)


def default_store() -> Optional[str]:
    """The default store URL: :func:`set_default_store`'s, else ``ASYNCAPY_STORE``'s
    (validated: ``ConfigError`` naming the variable), else ``None`` (memory)."""
    if _default is not None:
        return _default
    value = os.environ.get(STORE_ENV)
    if not value:
        return None
    url: Optional[str] = validate("store", value, STORE_ENV)
    return url


def key_cache_size(size: Optional[int] = None) -> int:
    """``size``, or ``ASYNCAPY_KEY_CACHE_SIZE``, or the default; validated: a positive
    integer, else ``ConfigError`` naming ``cache_size`` (or the variable)."""
    from asyncapy.adapters.key_cache import DEFAULT_SIZE

    accepted = f"a positive integer: the most API keys cached per process (default {DEFAULT_SIZE})"
    if size is None:
        text = os.environ.get(CACHE_SIZE_ENV)
        if not text:
            return DEFAULT_SIZE
        try:
            size = int(text)
        except ValueError:
            raise ConfigError("cache_size", text, accepted, CACHE_SIZE_ENV) from None
        if size < 1:
            raise ConfigError("cache_size", text, accepted, CACHE_SIZE_ENV)
        return size
    if type(size) is not int or size < 1:
        raise ConfigError("cache_size", size, accepted)
    return size


def open_session_store(store: Union[None, str, SessionStore], lease: float = 30.0) -> SessionStore:
    """The :class:`SessionStore` that ``store`` names (see :data:`STORE_ACCEPTED`).

    A ``sqlite://`` URL holds API keys only: the sessions stay in this process (as with
    ``memory://``), so ``asyncapy run --store sqlite:///keys.db`` serves with its keys in
    the file."""
    if store is None:
        return MemorySessionStore()
    if isinstance(store, SessionStore):
        return store
    if not isinstance(store, str):
        raise ConfigError("store", store, STORE_ACCEPTED)
    scheme = _scheme(store)
    if scheme.name == "memory" or not scheme.sessions:  # sqlite: API keys only, sessions stay here
        return MemorySessionStore()
    from asyncapy.adapters.redis import RedisSessionStore

    return RedisSessionStore(redis_client(store), lease=lease)


def open_key_store(store: Union[None, str, KeyStore], *, cache_size: Optional[int] = None) -> KeyStore:
    """The :class:`KeyStore` that ``store`` names (see :data:`KEY_STORE_ACCEPTED`);
    ``None`` means :func:`default_store`. A Redis URL opens a
    :class:`~asyncapy.adapters.redis.RedisKeyStore` behind a coherent cache of
    ``cache_size`` keys (:func:`key_cache_size`)."""
    size = key_cache_size(cache_size)
    if store is None:
        store = default_store()
        if store is None:
            return MemoryKeyStore()
    if isinstance(store, KeyStore):
        return store
    if not isinstance(store, str):
        raise ConfigError("store", store, KEY_STORE_ACCEPTED)
    scheme = _scheme(store).name
    if scheme == "memory":
        return MemoryKeyStore()
    if scheme == "sqlite":
        from asyncapy.adapters.sqlite import SQLiteKeyStore

        return SQLiteKeyStore.from_url(store)  # checked: only opening the file can fail
    from asyncapy.adapters.key_cache import CachedKeyStore
    from asyncapy.adapters.redis import RedisKeyStore
    from asyncapy.adapters.redis_urls import wait_replicas

    client = redis_client(store)  # validated: wait_replicas() cannot fail now
    return CachedKeyStore(RedisKeyStore(client, wait_replicas=wait_replicas(store)), size=size)


def open_rate_limiter(store: Union[None, str, SessionStore]) -> RateLimiter:
    """The :class:`~asyncapy.domain.ports.RateLimiter` beside the session store
    ``store`` names: a Redis URL's (the same client, so every process sharing the
    store shares the limits, exact across them), else one in this process's memory
    (memory, SQLite, or a store object of the application's)."""
    scheme = store_urls.scheme_of(store) if isinstance(store, str) else None
    if isinstance(store, str) and scheme is not None and scheme.name in store_urls.REDIS_SCHEMES:
        from asyncapy.adapters.redis_ratelimit import RedisRateLimiter

        return RedisRateLimiter(redis_client(store))
    from asyncapy.adapters.memory_ratelimit import MemoryRateLimiter

    return MemoryRateLimiter()
