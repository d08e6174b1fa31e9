"""The rate-limiter contract has teeth: deliberately broken limiters fail it.

Each mutant below breaks one rule of the :class:`~asyncapy.domain.ports.RateLimiter`
port; the contract test guarding that rule is called directly against it and must
fail, while it passes against the shipped in-memory limiter. A last test runs the
contract the way a user would, in a fresh pytest session without ``trio_mode``.
"""

import sys

import pytest
import trio
import trio.lowlevel

if sys.version_info < (3, 11):  # built in since 3.11; trio depends on the backport before
    from exceptiongroup import BaseExceptionGroup

from asyncapy.adapters.memory_ratelimit import MemoryRateLimiter, _monotonic_us
from asyncapy.domain.ratelimit import Decision, gcra, parse_rate
from asyncapy.testing.ratelimit_contracts import RateLimiterContract

pytest_plugins = ["pytester"]


class ReadThenWriteLimiter(MemoryRateLimiter):
    """Decides on a state read before yielding, writes after: the race the port forbids."""

    async def acquire(self, key, rate, burst, cost=1):
        rate = parse_rate(rate)
        now = _monotonic_us()
        tat = self._table.tat(key)
        await trio.lowlevel.checkpoint()
        outcome = gcra(tat, now, rate.interval_us, burst, cost)
        if outcome.allowed:
            self._table._tats[key] = outcome.tat
        return outcome.decision()


class NoBurstLimiter(MemoryRateLimiter):
    async def acquire(self, key, rate, burst, cost=1):
        return await super().acquire(key, rate, 0, 1)


class OneKeyLimiter(MemoryRateLimiter):
    """Every client shares one allowance."""

    async def acquire(self, key, rate, burst, cost=1):
        return await super().acquire("everyone", rate, burst, cost)


class ChargingRefusalsLimiter(MemoryRateLimiter):
    """A refused request still moves the state on."""

    async def acquire(self, key, rate, burst, cost=1):
        rate = parse_rate(rate)
        now = _monotonic_us()
        base = max(self._table.tat(key), now)
        outcome = gcra(self._table.tat(key), now, rate.interval_us, burst, cost)
        self._table._tats[key] = base + cost * rate.interval_us
        return outcome.decision()


class SilentRefusalLimiter(MemoryRateLimiter):
    async def acquire(self, key, rate, burst, cost=1):
        decision = await super().acquire(key, rate, burst, cost)
        return decision if decision.allowed else Decision(False, 0.0, decision.remaining)


class FrozenClockLimiter(MemoryRateLimiter):
    def __init__(self):
        super().__init__(clock=lambda: 10**12)


class LaxLimiter(MemoryRateLimiter):
    """Takes any cost and burst it is given."""

    async def acquire(self, key, rate, burst, cost=1):
        rate = parse_rate(rate)
        return self._table.acquire(key, _monotonic_us(), rate.interval_us, max(0, int(burst)), max(1, int(cost))).decision()


MUTANTS = [
    (ReadThenWriteLimiter, "test_concurrent_calls_on_one_key_take_exactly_the_allowance", {}),
    (NoBurstLimiter, "test_a_new_key_gets_burst_plus_one_at_once", {"burst": 4}),
    (OneKeyLimiter, "test_keys_are_independent", {}),
    (ChargingRefusalsLimiter, "test_a_refusal_takes_nothing", {}),
    (SilentRefusalLimiter, "test_a_refusal_says_when_to_retry", {}),
    (FrozenClockLimiter, "test_the_allowance_refills_at_the_rate", {}),
    (LaxLimiter, "test_bad_arguments_are_a_value_error_and_take_nothing", {"rate": "1/h", "burst": 2, "cost": 4}),
]


@pytest.mark.parametrize(("mutant", "test_name", "params"), MUTANTS, ids=lambda v: getattr(v, "__name__", None))
async def test_the_contract_rejects(mutant, test_name, params):
    contract = RateLimiterContract()
    with pytest.raises((AssertionError, pytest.fail.Exception, BaseExceptionGroup)):
        await getattr(contract, test_name)(limiter=mutant(), **params)
    await getattr(contract, test_name)(limiter=MemoryRateLimiter(), **params)


USER_TEST_FILE = '''
import pytest
from asyncapy.adapters.memory_ratelimit import MemoryRateLimiter
from asyncapy.testing.ratelimit_contracts import RateLimiterContract

class TestMine(RateLimiterContract):
    @pytest.fixture
    def limiter(self):
        return MemoryRateLimiter()
'''


def test_the_contract_runs_for_a_user_without_trio_mode(pytester):
    pytester.makepyfile(test_user_limiter=USER_TEST_FILE)
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    counts = result.parseoutcomes()
    assert counts.get("passed", 0) > 20 and set(counts) == {"passed"}, result.stdout.str()
