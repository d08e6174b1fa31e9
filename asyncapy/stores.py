"""Store selection: ``None`` / ``"memory://"`` / ``"redis://..."`` / ``"sqlite:///..."`` -> an adapter.

The composition root's one place that knows which adapters exist. A URL names where
sessions or keys live; an object implementing the port is used as it is. Redis
clients are shared per URL within a process, so a server and the API-key factories of
one process use one connection pool. A ``sqlite://`` URL names a file of API keys
(:mod:`asyncapy.adapters.sqlite`): a key store only, sessions are never kept there.
"""

from __future__ import annotations

import threading
from typing import Any, Union

from asyncapy.adapters.memory import MemoryKeyStore, MemorySessionStore
from asyncapy.domain.ports import KeyStore, SessionStore

from .config import SETTINGS, ConfigError, validate

__all__ = [
    "open_session_store",
    "open_key_store",
    "redis_client",
    "check_store_url",
    "STORE_ACCEPTED",
    "KEY_STORE_ACCEPTED",
]

STORE_ACCEPTED = (
    "None or 'memory://' (this process only), a redis://, rediss:// or unix:// URL, "
    "or a store object implementing the port"
)
"""What a ``store`` setting accepts, for error messages."""

KEY_STORE_ACCEPTED = (
    "None or 'memory://' (this process only), a redis://, rediss:// or unix:// URL, "
    "a sqlite:///PATH URL (a file on this machine), or a KeyStore object"
)
"""What an ``APIKeyFactory``'s ``store`` accepts, for error messages."""

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def check_store_url(url: str) -> None:
    """Refuse (:class:`ValueError`) a ``url`` that names no store: the scheme, then the
    Redis URL's parts (:func:`asyncapy.adapters.redis.check_url`). The message says what
    is wrong without quoting ``url``, which may carry a password."""
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if scheme == "memory" and separator:
        return
    if not separator:
        raise ValueError("no SCHEME:// at its start")
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("the scheme is not memory://, redis://, rediss:// or unix://")
    from asyncapy.adapters.redis import check_url

    check_url(url)


def _is_memory(url: Any) -> bool:
    """Validate a store URL (``ConfigError`` naming ``store``); True for ``memory://``."""
    return validate("store", url).lower().startswith("memory://")


def redis_client(url: str) -> Any:
    """The process-wide redis-py client of ``url`` (created on first use)."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            from asyncapy.adapters.redis import connect

            try:
                client = _clients[url] = connect(url)
            except ValueError as exc:  # its message never quotes the URL; ConfigError redacts it
                raise ConfigError("store", url, SETTINGS["store"].accepted, reason=str(exc)) from None
        return client


def open_session_store(store: Union[None, str, SessionStore], lease: float = 30.0) -> SessionStore:
    """The :class:`SessionStore` that ``store`` names (see :data:`STORE_ACCEPTED`)."""
    if store is None:
        return MemorySessionStore()
    if isinstance(store, SessionStore):
        return store
    if not isinstance(store, str):
        raise ConfigError("store", store, STORE_ACCEPTED)
    if _is_memory(store):
        return MemorySessionStore()
    from asyncapy.adapters.redis import RedisSessionStore

    return RedisSessionStore(redis_client(store), lease=lease)


def open_key_store(store: Union[None, str, KeyStore]) -> KeyStore:
    """The :class:`KeyStore` that ``store`` names (see :data:`STORE_ACCEPTED`)."""
    if store is None:
        return MemoryKeyStore()
    if isinstance(store, KeyStore):
        return store
    if not isinstance(store, str):
        raise ConfigError("store", store, KEY_STORE_ACCEPTED)
    if store[:9].lower() == "sqlite://":
        from asyncapy.adapters.sqlite import URL_FORM, SQLiteKeyStore

        try:
            return SQLiteKeyStore.from_url(store)
        except ValueError as exc:  # its message never quotes the URL
            raise ConfigError("store", store, URL_FORM, reason=str(exc)) from None
    try:
        memory = _is_memory(store)
    except ConfigError as exc:
        raise ConfigError("store", store, KEY_STORE_ACCEPTED, reason=exc.reason) from None
    if memory:
        return MemoryKeyStore()
    from asyncapy.adapters.redis import RedisKeyStore

    return RedisKeyStore(redis_client(store))
