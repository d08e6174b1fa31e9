"""The Redis rate limiter: limits exact across every process that shares one Redis.

Each key's state is one Redis string, its theoretical arrival time in microseconds
(``<prefix>rate:{<key>}``; the braces are a Cluster hash tag, so a key's state lives
on the master serving its slot and different keys spread over the Cluster). Every
decision is one server-side Lua script, :data:`_GCRA`, a line-for-line copy of
:func:`asyncapy.domain.ratelimit.gcra`, run with the Redis server's own ``TIME``:
processes on several machines, whatever their clocks say, take from one allowance
in one order, so a client spread over them gets at most ``rate * time + burst + 1``.
The string expires (``PX``) when its TAT passes, so Redis holds only keys active
now.

Calls travel through the batching front the stores use
(:class:`~asyncapy.adapters.redis_batching._RedisAdapter`): every decision asked for
while the previous batch was out goes in the next, one round trip (per Cluster node),
on one Redis node, Sentinel and Cluster alike. Failures are
:class:`~asyncapy.domain.errors.StoreUnavailable`, like the stores'.

Keys appear in Redis key names as given: pass an address group or a digest, never a
secret such as an API key itself.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from asyncapy.domain.ports import RateLimiter
from asyncapy.domain.ratelimit import Decision, Rate, check_burst, check_cost, parse_rate

from .redis import DEFAULT_PREFIX, _where
from .redis_batching import _RedisAdapter
from .redis_calls import _Call

__all__ = ["RedisRateLimiter"]

# KEYS[1]: the key's TAT; ARGV: interval (us), burst, cost. Returns {allowed, retry
# after (us), remaining}. Numbers are doubles in Lua: integers exact up to 2^53, and
# Redis returns them as integers; the TAT is written with %.0f, as tostring() would
# print 16 digits in exponent form.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local base = tat
if base < now then base = now end
local new_tat = base + cost * interval
local horizon = now + (burst + 1) * interval
if new_tat > horizon then
  return {0, new_tat - horizon, math.floor((horizon - base) / interval)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, 0, math.floor((horizon - new_tat) / interval)}
"""


class RedisRateLimiter(_RedisAdapter, RateLimiter):
    """Rate limits by key in Redis, shared by every process using the same Redis.

    :param client: a redis-py client (see :func:`asyncapy.adapters.redis.connect`):
        one node, Sentinel or Cluster.
    :param prefix: prefix of the Redis keys (without ``{`` or ``}``).
    """

    def __init__(self, client: Any, prefix: str = DEFAULT_PREFIX) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a rate limiter's prefix must not hold { or }: the keys carry a hash tag")
        super().__init__(client, prefix)
        self._gcra = self._script(_GCRA)

    def _name(self, key: str) -> str:
        if type(key) is not str:
            raise TypeError(f"a rate-limit key must be a string, not {type(key).__name__}")
        return f"{self.prefix}rate:{{{key}}}"

    def _call(self, key: str, rate: Any, burst: int, cost: int) -> _Call:
        rate = parse_rate(rate, name="rate")
        check_cost(cost, check_burst(burst, name="burst"))
        name = self._name(key)
        return _Call((("EVALSHA", self._gcra.sha, 1, name, rate.interval_us, burst, cost),), name)

    @staticmethod
    def _decision(call: _Call) -> Decision:
        allowed, retry_us, remaining = call.result()[0]
        return Decision(bool(allowed), retry_us / 1_000_000, int(remaining))

    async def acquire(self, key: str, rate: Union[Rate, str], burst: int, cost: int = 1) -> Decision:
        call = self._call(key, rate, burst, cost)
        await self._run_calls([call])
        return self._decision(call)

    async def acquire_many(self, requests: Sequence[tuple[str, Union[Rate, str], int, int]]) -> list[Decision]:
        calls = [self._call(*request) for request in requests]
        if not calls:
            return []
        await self._run_calls(calls)
        return [self._decision(call) for call in calls]

    def __repr__(self) -> str:
        return f"RedisRateLimiter({_where(self.redis)})"
