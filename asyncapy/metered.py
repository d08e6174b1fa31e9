"""Metrics around a port or a seam: stores that time their calls, handlers that time
their runs.

Cross-cutting concerns wrap; they are not sprinkled through the session loop. A
:class:`MeteredSessionStore` is a :class:`~asyncapy.domain.ports.SessionStore` like the
one it wraps, so the server, the test client and the contract suite see no difference;
each call is timed into ``asyncapy_store_duration_seconds{operation}``, and a call that
raises (other than a ``KeyError`` meaning "no such key") counts in
``asyncapy_store_errors_total{operation}``. :func:`metered_dispatcher` returns a
dispatcher whose handlers time themselves into
``asyncapy_handler_duration_seconds{handler}``.

Every function here hands back what it was given when the recorder is off
(:data:`asyncapy.metrics.NULL_RECORDER`) or when it is already metered, so wiring it
in twice, or for a server without metrics, costs nothing.

The wrappers add no checkpoint of their own: a store whose coroutines never suspend
(the memory stores, whose atomicity rests on that) still never suspends.
"""

from __future__ import annotations

import bisect
import functools
import time
from typing import Any, Awaitable, Callable, Optional

from asyncapy.domain.dispatch import Dispatcher, Handler
from asyncapy.domain.ports import KeyStore, SessionRecord, SessionStore

from .metrics import KEY_OPERATIONS, Recorder, Timings, key_store_metered, published

__all__ = [
    "MeteredSessionStore",
    "MeteredKeyStore",
    "metered_session_store",
    "metered_key_store",
    "metered_handler",
    "metered_dispatcher",
]

_perf_counter = time.perf_counter
_bisect_left = bisect.bisect_left


class _Timer:
    """Times store calls of one operation into a recorder."""

    __slots__ = ("operation", "timings", "recorder")

    def __init__(self, recorder: Recorder, operation: str) -> None:
        self.operation = operation
        self.timings: Timings = recorder.store_timings(operation)
        self.recorder = recorder

    async def call(self, awaitable: Awaitable[Any], not_errors: tuple = ()) -> Any:
        start = _perf_counter()
        try:
            return await awaitable
        except not_errors:
            raise
        except Exception:
            self.recorder.store_error(self.operation)
            raise
        finally:
            self.timings.observe(_perf_counter() - start)


class _PublishedTimer:
    """Times store calls of one operation into the recorder :func:`published` names at
    each call: a key store metered when its factory is made, before any server chose
    whether to count; nothing is timed while no server counts."""

    __slots__ = ("operation",)

    def __init__(self, operation: str) -> None:
        self.operation = operation

    async def call(self, awaitable: Awaitable[Any], not_errors: tuple = ()) -> Any:
        recorder = published()
        if not recorder.enabled:
            return await awaitable
        timings = recorder.store_timings(self.operation)
        start = _perf_counter()
        try:
            return await awaitable
        except not_errors:
            raise
        except Exception:
            recorder.store_error(self.operation)
            raise
        finally:
            timings.observe(_perf_counter() - start)


class MeteredSessionStore(SessionStore):
    """``inner``, with ``admit``, ``release`` and ``sessions`` timed and their failures
    counted in ``recorder``. ``maintain`` and ``aclose`` pass through untimed (the
    first runs for as long as the server does); other attributes are ``inner``'s."""

    def __init__(self, inner: SessionStore, recorder: Recorder) -> None:
        self.inner = inner
        """The store that does the work."""
        self.recorder = recorder
        """Where the timings go."""
        self._admit = _Timer(recorder, "admit")
        self._release = _Timer(recorder, "release")
        self._sessions = _Timer(recorder, "sessions")

    async def admit(self, record: SessionRecord, limit: int) -> bool:
        """``inner.admit``, timed as ``admit``."""
        return await self._admit.call(self.inner.admit(record, limit))

    async def release(self, record: SessionRecord) -> None:
        """``inner.release``, timed as ``release``."""
        return await self._release.call(self.inner.release(record))

    async def sessions(self, address: str) -> list[SessionRecord]:
        """``inner.sessions``, timed as ``sessions``."""
        return await self._sessions.call(self.inner.sessions(address))

    async def maintain(self) -> None:
        """``inner.maintain`` (untimed: it runs for as long as the server)."""
        await self.inner.maintain()

    async def aclose(self) -> None:
        """``inner.aclose``."""
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names this class lacks (``redis``, ``lease``...): the log
        # line naming the store, and code written against the adapter, keep working.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return repr(self.inner)


class MeteredKeyStore(KeyStore):
    """``inner``, with every call timed (operations ``key_put``, ``key_get``...) and its
    failures counted in ``recorder``, or, without one, in the recorder of the server
    that serves this process when it counts (:func:`asyncapy.metrics.published`: how an
    API-key factory meters its store when it is made); a ``KeyError`` (no such key) is
    an answer, not a failure. Other attributes are ``inner``'s."""

    def __init__(self, inner: KeyStore, recorder: Optional[Recorder] = None) -> None:
        self.inner = inner
        """The store that does the work."""
        self.recorder = recorder
        """Where the timings go (None: the published recorder, at each call)."""
        self._timers: dict = {}
        for name in KEY_OPERATIONS:
            self._timers[name] = _Timer(recorder, f"key_{name}") if recorder is not None else _PublishedTimer(f"key_{name}")
        if recorder is None:
            key_store_metered()

    async def put(self, key: str, metadata: Any) -> None:
        """``inner.put``, timed as ``key_put``."""
        return await self._timers["put"].call(self.inner.put(key, metadata), (KeyError,))

    async def get(self, key: str) -> Any:
        """``inner.get``, timed as ``key_get``."""
        return await self._timers["get"].call(self.inner.get(key), (KeyError,))

    async def delete(self, key: str) -> None:
        """``inner.delete``, timed as ``key_delete``."""
        return await self._timers["delete"].call(self.inner.delete(key), (KeyError,))

    async def contains(self, key: str) -> bool:
        """``inner.contains``, timed as ``key_contains``."""
        return await self._timers["contains"].call(self.inner.contains(key), (KeyError,))

    async def update(self, key: str, metadata: Any) -> None:
        """``inner.update``, timed as ``key_update``."""
        return await self._timers["update"].call(self.inner.update(key, metadata), (KeyError,))

    async def replace(self, old_key: str, new_key: str) -> None:
        """``inner.replace``, timed as ``key_replace``."""
        return await self._timers["replace"].call(self.inner.replace(old_key, new_key), (KeyError,))

    async def aclose(self) -> None:
        """``inner.aclose``."""
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        """``len(inner)``, for a store that has one (how many keys an SQLite file holds)."""
        return len(self.inner)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return repr(self.inner)


def metered_session_store(store: SessionStore, recorder: Recorder) -> SessionStore:
    """``store`` timed into ``recorder``; ``store`` itself when metrics are off or it is
    metered already."""
    if not recorder.enabled or isinstance(store, MeteredSessionStore):
        return store
    return MeteredSessionStore(store, recorder)


def metered_key_store(store: KeyStore, recorder: Optional[Recorder] = None) -> KeyStore:
    """``store`` timed into ``recorder`` (None: the published one, see
    :class:`MeteredKeyStore`); ``store`` itself when that recorder is off or the store
    is metered already."""
    if isinstance(store, MeteredKeyStore) or (recorder is not None and not recorder.enabled):
        return store
    return MeteredKeyStore(store, recorder)


def metered_handler(function: Callable, name: str, recorder: Recorder) -> Callable:
    """An async function running ``function`` and timing each run into handler
    ``name``'s histogram, however it ends (a raise, a cancellation). Named like
    ``function``, so logs and ``client.handler.name`` do not change."""
    timings = recorder.handler_timings(name)
    counts = timings.counts
    bounds = timings.bounds

    @functools.wraps(function)
    async def metered(*args: Any) -> Any:
        start = _perf_counter()
        try:
            return await function(*args)
        finally:
            elapsed = _perf_counter() - start
            counts[_bisect_left(bounds, elapsed)] += 1
            timings.total += elapsed

    metered.__asyncapy_metered__ = True  # type: ignore[attr-defined]
    return metered


def metered_dispatcher(dispatcher: Dispatcher, recorder: Recorder) -> Dispatcher:
    """A dispatcher like ``dispatcher`` (same groups, order and filters) whose handlers
    time their runs into ``recorder``; ``dispatcher`` itself when metrics are off.

    Build it when serving starts (handlers are registered by then): handlers
    registered on the original afterwards are not in the copy.
    """
    if not recorder.enabled:
        return dispatcher
    metered = Dispatcher()
    for group, handlers in dispatcher.groups:
        for handler in handlers:
            function = handler.function
            if not getattr(function, "__asyncapy_metered__", False):
                function = metered_handler(function, handler.name, recorder)
            metered.register(Handler(function, handler.filters), group)
    return metered
