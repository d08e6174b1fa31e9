"""The ports: what the core needs from the outside world, as abstract async classes.

* :class:`SessionStore` admits sessions under a per-address limit and lists them.
  One store may be shared by many server processes (Redis), so admission is a single
  atomic operation of the store, never a read-then-write by the caller.
* :class:`KeyStore` keeps API-key records: a key and its metadata.
* :class:`RateLimiter` decides, per key, whether a request fits its rate (the GCRA of
  :mod:`domain.ratelimit`); one limiter may be shared by many processes (Redis), so the
  decision and the update of the key's state are one atomic operation of the limiter.

Adapters live in :mod:`adapters`; the contract every adapter must pass is
:mod:`asyncapy.testing.contracts` (importable by users for their own adapters).

Every method is a coroutine. Adapters must not block the event loop; an adapter whose
backend is blocking I/O offloads it to a worker thread when running under an event
loop. A coroutine of an adapter that completes without ever suspending (the in-memory
stores, or a blocking adapter called outside an event loop) can also be driven from
synchronous code with :func:`run_to_completion`, which is how the synchronous
``APIKeyFactory`` methods use a key store from a plain script.
"""

from __future__ import annotations

import abc
import contextvars
from typing import Any, Awaitable, Sequence, TypeVar, Union

import attrs

from .ratelimit import Decision, Rate, check_burst, check_cost, parse_rate

__all__ = ["SessionRecord", "SessionStore", "KeyStore", "RateLimiter", "run_to_completion", "BLOCKING"]

T = TypeVar("T")


@attrs.frozen
class SessionRecord:
    """What a store knows of one live session."""

    session_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The session's UUID4, as a string."""
    address: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The client's IP address."""
    date: float = attrs.field(converter=float)
    """UNIX timestamp of the session's creation."""
    server_id: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    """Which server process owns the session (for stores shared by several)."""


class SessionStore(abc.ABC):
    """Live sessions by client address, with atomic limit-checked admission."""

    @abc.abstractmethod
    async def admit(self, record: SessionRecord, limit: int) -> bool:
        """Add ``record`` unless its address already holds ``limit`` live sessions.

        ``limit`` 0 means no limit. Returns whether the session was admitted. The check
        and the insert are one atomic step. Raises
        :class:`~domain.errors.StoreUnavailable` when the backend cannot be reached.
        """

    @abc.abstractmethod
    async def release(self, record: SessionRecord) -> None:
        """Forget ``record``; releasing an unknown session is not an error."""

    @abc.abstractmethod
    async def sessions(self, address: str) -> list[SessionRecord]:
        """The live sessions of ``address``, oldest first."""

    async def maintain(self) -> None:
        """Background upkeep for as long as a server runs (it is cancelled at the end).

        A shared store renews the leases of this process's live sessions here; the
        default has nothing to do and returns at once.
        """

    async def aclose(self) -> None:
        """Release the store's resources (connections, threads). Idempotent."""


class KeyStore(abc.ABC):
    """API keys and their metadata (any JSON-serialisable value, or None)."""

    @abc.abstractmethod
    async def put(self, key: str, metadata: Any) -> None:
        """Store ``key`` with ``metadata``, replacing any previous metadata."""

    @abc.abstractmethod
    async def get(self, key: str) -> Any:
        """The metadata of ``key``; ``KeyError`` if there is no such key."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; ``KeyError`` if there is no such key."""

    @abc.abstractmethod
    async def contains(self, key: str) -> bool:
        """Whether ``key`` exists."""

    async def update(self, key: str, metadata: Any) -> None:
        """Replace the metadata of an existing ``key``; ``KeyError`` if it does not exist.

        Shared adapters override this with one atomic check-and-set.
        """
        if not await self.contains(key):
            raise KeyError(key)
        await self.put(key, metadata)

    async def replace(self, old_key: str, new_key: str) -> None:
        """Move the metadata of ``old_key`` to ``new_key`` and remove ``old_key``.

        ``KeyError`` if ``old_key`` does not exist. Adapters shared between processes
        override this to make it one atomic step; this default is correct for
        single-process stores that never suspend between the steps.
        """
        metadata = await self.get(old_key)
        await self.put(new_key, metadata)
        await self.delete(old_key)

    async def aclose(self) -> None:
        """Release the store's resources. Idempotent."""


class RateLimiter(abc.ABC):
    """Rate limits by key (a client's address group, an API key...), decided by the GCRA.

    Each key has one small state, its theoretical arrival time (see
    :mod:`domain.ratelimit`); a key whose state has passed is forgotten, so memory
    follows the keys active now. Calls made at the same time by many tasks are
    independent: a shared adapter sends them together (one round trip for a batch).
    """

    @abc.abstractmethod
    async def acquire(self, key: str, rate: Union[Rate, str], burst: int, cost: int = 1) -> Decision:
        """Take ``cost`` requests from ``key``'s allowance of ``rate`` with ``burst``
        (see :func:`domain.ratelimit.gcra`) if they fit, in one atomic step.

        ``rate`` is a :class:`~domain.ratelimit.Rate` (or its text, ``"100/s"``),
        ``burst`` an integer of at least 0, ``cost`` an integer from 1 to ``burst + 1``
        (``ValueError`` otherwise, before anything is sent). The answer says whether
        they were taken and, if not, :attr:`~domain.ratelimit.Decision.retry_after`
        seconds until they would be. A refusal takes nothing. Raises
        :class:`~domain.errors.StoreUnavailable` when a shared backend cannot be
        reached (the caller decides whether to fail open or closed).
        """

    async def acquire_many(self, requests: Sequence[tuple[str, Union[Rate, str], int, int]]) -> list[Decision]:
        """:meth:`acquire` for each ``(key, rate, burst, cost)`` of ``requests``, in
        order, each decided on its own (one refused does not give back another's):
        what a packet under both a per-address and a per-key limit needs. A shared
        adapter sends them in one round trip; this default awaits them in turn. Every
        request is checked before any is made: a bad one is a ``ValueError`` and
        nothing is taken.
        """
        for _key, rate, burst, cost in requests:
            check_cost(cost, check_burst(burst, name="burst"))
            parse_rate(rate, name="rate")
        return [await self.acquire(*request) for request in requests]

    async def aclose(self) -> None:
        """Release the limiter's resources. Idempotent."""


BLOCKING: contextvars.ContextVar[bool] = contextvars.ContextVar("asyncapy_blocking", default=False)
"""True while :func:`run_to_completion` drives a store call for synchronous code.

Adapters whose backend is blocking I/O read it: when set, they call the backend
directly instead of offloading to a worker thread (which would need to suspend).
"""


def run_to_completion(awaitable: Awaitable[T]) -> T:
    """Run a store coroutine to completion from synchronous code and return its result.

    :data:`BLOCKING` is set meanwhile, so adapters do their I/O in this thread without
    suspending. Called from inside an event loop this blocks the loop for the call's
    duration: async code should await the async API instead. Raises
    ``RuntimeError`` if the coroutine suspends anyway (an adapter that ignores
    :data:`BLOCKING`).
    """
    token = BLOCKING.set(True)
    coro: Any = awaitable.__await__()
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value  # what the awaitable returned
        return result
    finally:
        BLOCKING.reset(token)
    coro.close()
    raise RuntimeError(
        "this store operation suspended while driven synchronously; its adapter must "
        "honour domain.ports.BLOCKING (or call the async API from async code)"
    )
