"""The in-process rate limiter: the embedded default, for a single server process.

Its coroutine never suspends, so each decision is atomic with respect to the other
tasks of the event loop (and it can be driven from synchronous code with
:func:`asyncapy.domain.ports.run_to_completion`). Memory is bounded: a key is
forgotten once its TAT has passed, and at most ``capacity`` keys are kept (see
:class:`~asyncapy.domain.ratelimit.GcraTable`).
"""

from __future__ import annotations

import time
from typing import Callable, Union

from asyncapy.domain.ports import RateLimiter
from asyncapy.domain.ratelimit import Decision, GcraTable, Rate, check_burst, check_cost, parse_rate

__all__ = ["MemoryRateLimiter"]


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryRateLimiter(RateLimiter):
    """Rate limits of this process, by key, in memory.

    :param capacity: the most keys held at once (100,000 by default, a few MiB).
    :param clock: the time in whole microseconds, monotonic (tests pass their own).
    """

    def __init__(self, *, capacity: int = 100_000, clock: Callable[[], int] = _monotonic_us) -> None:
        self._table = GcraTable(capacity)
        self._clock = clock

    async def acquire(self, key: str, rate: Union[Rate, str], burst: int, cost: int = 1) -> Decision:
        rate = parse_rate(rate, name="rate")
        check_cost(cost, check_burst(burst, name="burst"))
        return self._table.acquire(key, self._clock(), rate.interval_us, burst, cost).decision()

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"MemoryRateLimiter({len(self._table)} keys, capacity {self._table.capacity})"
