"""The contract suite of the rate-limiter port: what every adapter must do, as pytest tests.

:class:`RateLimiterContract` is a pytest base class, used as the store contracts of
:mod:`asyncapy.testing.contracts` are: subclass it in your own test file and give the
subclass a fixture named ``limiter`` that returns (or yields) a **fresh** adapter with
no key known::

    import pytest
    from asyncapy.testing.ratelimit_contracts import RateLimiterContract

    from myproject.limits import MemcachedRateLimiter

    class TestMemcachedRateLimiter(RateLimiterContract):
        @pytest.fixture
        async def limiter(self):
            limiter = MemcachedRateLimiter(...)
            yield limiter
            await limiter.aclose()

The tests run in real time (a shared adapter keeps the clock of its backend), so they
use slow rates (``1/h``) where nothing may refill during a test and fast ones
(``20/s``) where something must, and never assert how fast a call is. They need
``pytest`` and ``pytest-trio``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from asyncapy.domain.ports import RateLimiter
from asyncapy.domain.ratelimit import Decision, Rate

__all__ = ["RateLimiterContract"]

SLOW = Rate(1, 3600)
"""Nothing refills during a test: one request an hour."""
FAST = Rate(20, 1)
"""Refills within a test: one request every 50 ms."""


@pytest.mark.trio
class RateLimiterContract:
    """The :class:`~asyncapy.domain.ports.RateLimiter` contract.

    Subclass it and provide a ``limiter`` fixture returning a fresh limiter.
    """

    async def test_is_a_rate_limiter(self, limiter: RateLimiter) -> None:
        assert isinstance(limiter, RateLimiter)

    @pytest.mark.parametrize("burst", [0, 1, 4])
    async def test_a_new_key_gets_burst_plus_one_at_once(self, limiter: RateLimiter, burst: int) -> None:
        decisions = [await limiter.acquire("client", SLOW, burst) for _ in range(burst + 3)]
        assert [d.allowed for d in decisions] == [True] * (burst + 1) + [False] * 2
        assert [d.remaining for d in decisions] == list(range(burst, -1, -1)) + [0, 0]
        assert all(type(d) is Decision and d.retry_after == 0.0 for d in decisions[: burst + 1])

    async def test_a_refusal_says_when_to_retry(self, limiter: RateLimiter) -> None:
        assert (await limiter.acquire("client", SLOW, 0)).allowed
        refused = await limiter.acquire("client", SLOW, 0)
        assert not refused.allowed and refused.remaining == 0
        assert 3590 < refused.retry_after <= 3600

    async def test_a_refusal_takes_nothing(self, limiter: RateLimiter) -> None:
        assert await limiter.acquire("client", SLOW, 4, 3) == Decision(True, 0.0, 2)
        refused = await limiter.acquire("client", SLOW, 4, 3)
        assert not refused.allowed and refused.remaining == 2
        assert 3590 < refused.retry_after <= 3600
        assert await limiter.acquire("client", SLOW, 4, 2) == Decision(True, 0.0, 0)
        assert not (await limiter.acquire("client", SLOW, 4)).allowed

    async def test_keys_are_independent(self, limiter: RateLimiter) -> None:
        for _ in range(3):
            await limiter.acquire("203.0.113.7", SLOW, 1)
        assert not (await limiter.acquire("203.0.113.7", SLOW, 1)).allowed
        assert [(await limiter.acquire("2001:db8::/64", SLOW, 1)).allowed for _ in range(3)] == [True, True, False]

    @pytest.mark.parametrize("key", ["", "a{b}c", "}{", "ключ", "with space", "x" * 300, "asyncapy:rate:{x}"])
    async def test_any_string_is_a_key_of_its_own(self, limiter: RateLimiter, key: str) -> None:
        assert (await limiter.acquire(key, SLOW, 0)).allowed
        assert not (await limiter.acquire(key, SLOW, 0)).allowed
        assert (await limiter.acquire(key + "'", SLOW, 0)).allowed

    async def test_rate_and_burst_are_the_callers_at_each_call(self, limiter: RateLimiter) -> None:
        assert (await limiter.acquire("client", SLOW, 0)).allowed
        assert not (await limiter.acquire("client", SLOW, 0)).allowed
        # The same debt under a larger burst: room for more.
        assert await limiter.acquire("client", SLOW, 3) == Decision(True, 0.0, 2)
        assert (await limiter.acquire("client", "1/h", 3)).allowed  # a rate's text is a rate too

    async def test_the_allowance_refills_at_the_rate(self, limiter: RateLimiter) -> None:
        assert (await limiter.acquire("client", FAST, 0)).allowed
        refused = await limiter.acquire("client", FAST, 0)
        if refused.allowed:  # a backend so slow that 50 ms passed between the calls
            refused = await limiter.acquire("client", FAST, 0)
        assert not refused.allowed and 0 < refused.retry_after <= 0.05
        await trio.sleep(refused.retry_after + 0.01)
        assert (await limiter.acquire("client", FAST, 0)).allowed

    async def test_a_key_idle_past_its_debt_starts_afresh(self, limiter: RateLimiter) -> None:
        for _ in range(3):
            assert (await limiter.acquire("client", FAST, 2)).allowed
        await trio.sleep(3 / FAST.per_second + 0.02)
        assert [(await limiter.acquire("client", FAST, 2)).allowed for _ in range(3)] == [True] * 3

    async def test_concurrent_calls_on_one_key_take_exactly_the_allowance(self, limiter: RateLimiter) -> None:
        decisions: list[Decision] = []

        async def one() -> None:
            decisions.append(await limiter.acquire("crowded", SLOW, 9))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        assert sum(d.allowed for d in decisions) == 10
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))

    async def test_acquire_many_decides_each_in_order(self, limiter: RateLimiter) -> None:
        decisions = await limiter.acquire_many(
            [("a", SLOW, 0, 1), ("b", SLOW, 1, 2), ("a", SLOW, 0, 1), ("c", SLOW, 2, 1)]
        )
        assert [(d.allowed, d.remaining) for d in decisions] == [(True, 0), (True, 0), (False, 0), (True, 2)]
        assert await limiter.acquire_many([]) == []
        assert not (await limiter.acquire("b", SLOW, 1)).allowed

    @pytest.mark.parametrize(
        "rate, burst, cost",
        [("fast", 0, 1), ("0/s", 0, 1), (100, 0, 1), (SLOW, -1, 1), (SLOW, 1.5, 1), (SLOW, 2, 0), (SLOW, 2, 4)],
    )
    async def test_bad_arguments_are_a_value_error_and_take_nothing(
        self, limiter: RateLimiter, rate: Any, burst: Any, cost: Any
    ) -> None:
        with pytest.raises(ValueError):
            await limiter.acquire("client", rate, burst, cost)
        with pytest.raises(ValueError):
            await limiter.acquire_many([("other", SLOW, 0, 1), ("client", rate, burst, cost)])
        assert await limiter.acquire("client", SLOW, 0) == Decision(True, 0.0, 0)
        assert await limiter.acquire("other", SLOW, 0) == Decision(True, 0.0, 0)

    async def test_aclose_is_idempotent(self, limiter: RateLimiter) -> None:
        await limiter.acquire("client", SLOW, 0)
        await limiter.aclose()
        await limiter.aclose()
