"""Rates and the GCRA: how many requests a client may make, decided without I/O.

A rate is written ``N/s``, ``N/m`` or ``N/h`` (:func:`parse_rate`); with it goes a
*burst*, the number of requests allowed at once above the steady rate, as nginx
``limit_req``'s ``burst`` (with ``nodelay``) and redis-cell's ``max_burst``: a client
that has been quiet may send ``burst + 1`` requests at once, then one every
``1 / rate`` seconds. Burst 0 means strictly one request per interval.

The decision is the Generic Cell Rate Algorithm (:func:`gcra`), which keeps a single
number per client, its *theoretical arrival time* (TAT): when the client would be
back to zero debt if every request allowed so far had been spaced exactly one
emission interval ``T = 1 / rate`` apart. A request of cost ``c`` arriving at ``now``:

* moves the TAT to ``max(TAT, now) + c * T``;
* is allowed if that new TAT is at most ``now + (burst + 1) * T``, and the new TAT is
  stored; otherwise it is refused, the TAT left as it was, and the client may retry
  in ``new TAT - (burst + 1) * T - now``.

So over any window of ``W`` seconds at most ``rate * W + burst + 1`` requests are
allowed (``tests/unit/test_ratelimit.py`` checks it over arbitrary arrival sequences),
and the state of a key can be forgotten once its TAT has passed: a forgotten key and
one whose TAT is in the past decide alike.

Times are whole **microseconds** (integers), so that the decision is exact and the
same in Python and in the Redis adapter's Lua script, where ``TIME`` gives
microseconds and numbers are doubles (exact up to 2^53 us, about 285 years since
1970). The emission interval is rounded *up* to a whole microsecond: a limit is never
looser than written (it is at most one part in a million tighter for rates up to
1,000/s).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import attrs

from .errors import ERR_RATE_LIMITED

__all__ = [
    "Rate",
    "Decision",
    "parse_rate",
    "check_burst",
    "check_cost",
    "gcra",
    "Outcome",
    "GcraTable",
    "rate_limited_payload",
    "MAX_RATE_PER_SECOND",
    "PERIODS",
    "RATE_FORMS",
]

PERIODS = {"s": 1, "m": 60, "h": 3600}
"""Seconds in each period a rate may be written in."""

MAX_RATE_PER_SECOND = 1_000_000
"""The fastest rate (one request a microsecond): the emission interval is a whole
number of microseconds."""

RATE_FORMS = "N/s, N/m or N/h, e.g. 100/s"
"""How a rate is written, for error messages and help texts."""

_RATE = re.compile(r"\s*([0-9]+)\s*/\s*([smh])\s*\Z")
_MICROS = 1_000_000


@attrs.frozen
class Rate:
    """A steady rate: ``count`` requests per ``period`` seconds (1, 60 or 3600)."""

    count: int
    """Requests per period (at least 1)."""
    period: int
    """The period in seconds: 1, 60 or 3600."""

    def __attrs_post_init__(self) -> None:
        if type(self.count) is not int or self.count < 1:
            raise ValueError(f"a rate's count must be an integer of at least 1, not {self.count!r}")
        if self.period not in PERIODS.values() or type(self.period) is not int:
            raise ValueError(f"a rate's period must be 1, 60 or 3600 seconds, not {self.period!r}")
        if self.count > MAX_RATE_PER_SECOND * self.period:
            raise ValueError(f"{self} is faster than {MAX_RATE_PER_SECOND}/s, the fastest rate")

    @property
    def interval_us(self) -> int:
        """The emission interval ``T`` in whole microseconds, rounded up."""
        return -(-self.period * _MICROS // self.count)

    @property
    def per_second(self) -> float:
        """Requests per second."""
        return self.count / self.period

    def __str__(self) -> str:
        unit = {seconds: name for name, seconds in PERIODS.items()}[self.period]
        return f"{self.count}/{unit}"


def parse_rate(value: object, *, name: str = "rate_limit") -> Rate:
    """The :class:`Rate` written in ``value`` (``"100/s"``, ``"600/m"``, ``"5000/h"``).

    A :class:`Rate` is returned as it is. Anything else raises ``ValueError`` whose text
    names ``name`` and the accepted forms, for the config layer to show as it is::

        rate_limit: 'fast' is not a rate; write N/s, N/m or N/h, e.g. 100/s
    """
    if isinstance(value, Rate):
        return value
    if isinstance(value, str):
        match = _RATE.match(value)
        if match is not None:
            count = int(match.group(1))
            if count < 1:
                raise ValueError(f"{name}: {value!r} allows nothing; a rate is at least 1 per period ({RATE_FORMS})")
            try:
                return Rate(count, PERIODS[match.group(2)])
            except ValueError:
                raise ValueError(
                    f"{name}: {value!r} is faster than {MAX_RATE_PER_SECOND}/s, the fastest rate"
                ) from None
    raise ValueError(f"{name}: {value!r} is not a rate; write {RATE_FORMS}")


def check_burst(value: object, *, name: str = "rate_burst") -> int:
    """``value`` if it is a valid burst (an integer of at least 0), else ``ValueError``
    naming ``name``."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{name}: {value!r} is not a burst; write an integer of at least 0 (requests allowed at once above the rate)")
    return value


def check_cost(cost: object, burst: int) -> int:
    """``cost`` if a request may ever cost it under ``burst``: an integer from 1 to
    ``burst + 1``, since a larger one could never be allowed; else ``ValueError``."""
    if type(cost) is not int or cost < 1:
        raise ValueError(f"cost must be an integer of at least 1, not {cost!r}")
    if cost > burst + 1:
        raise ValueError(f"cost {cost} can never be allowed with burst {burst} (at most burst + 1 = {burst + 1})")
    return cost


class Decision(NamedTuple):
    """What :func:`gcra` (and a :class:`~domain.ports.RateLimiter`) decided."""

    allowed: bool
    """Whether the request may go on."""
    retry_after: float
    """Seconds until the same request would be allowed (0.0 when allowed)."""
    remaining: int
    """Requests of cost 1 that would still be allowed at once, after this one."""


class Outcome(NamedTuple):
    """:func:`gcra`'s result in microseconds: what to store and what to answer."""

    allowed: bool
    tat: int
    """The TAT to store (unchanged when refused)."""
    retry_after_us: int
    """Microseconds until the request would be allowed (0 when allowed)."""
    remaining: int

    def decision(self) -> Decision:
        """The :class:`Decision` callers see (seconds as a float)."""
        return Decision(self.allowed, self.retry_after_us / _MICROS, self.remaining)


def gcra(tat: int, now: int, interval: int, burst: int, cost: int = 1) -> Outcome:
    """Decide one request of ``cost`` at ``now`` for a key whose stored TAT is ``tat``
    (0 for a key never seen or forgotten), with emission interval ``interval`` and
    ``burst`` (see the module docstring). Every argument is an integer (microseconds
    for the times). Pure: the caller stores :attr:`Outcome.tat`.

    The Redis adapter's script is a line-for-line copy of this function.
    """
    base = tat if tat > now else now
    new_tat = base + cost * interval
    horizon = now + (burst + 1) * interval  # the latest TAT that may be stored now
    if new_tat > horizon:
        return Outcome(False, tat, new_tat - horizon, (horizon - base) // interval)
    return Outcome(True, new_tat, 0, (horizon - new_tat) // interval)


def rate_limited_payload(retry_after: float) -> dict[str, Any]:
    """The payload of the reply to a packet over a limit:
    ``{"status": "failure", "error": "ERR_RATE_LIMITED", "retry_after": seconds}``,
    the seconds rounded *up* to the millisecond (a client that waits that long is
    allowed) and written as a number with at most three decimals (``0.1``, ``2``)."""
    millis = math.ceil(round(retry_after * 1000, 6))
    seconds = millis // 1000 if millis % 1000 == 0 else millis / 1000
    return {"status": "failure", "error": ERR_RATE_LIMITED, "retry_after": seconds}


class GcraTable:
    """The TATs of many keys in one process's memory, bounded: the state behind the
    in-memory :class:`~domain.ports.RateLimiter` and the failed-key-check throttle.

    A key is forgotten once its TAT has passed (it would decide as a new key), found by
    a sweep of a few entries per call, in turn (one still owed goes to the back);
    past ``capacity`` keys the one at the front is dropped even if its TAT has not passed, which lets that key burst
    again (lenient, never stricter), so ``capacity`` should exceed the number of keys
    active within one burst's time. Not thread-safe: one event loop uses it.
    """

    __slots__ = ("capacity", "_tats")

    SWEEP = 2
    """Entries looked at per call: more than one, so that the table shrinks when idle
    keys outnumber new ones."""

    def __init__(self, capacity: int = 100_000) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacity must be an integer of at least 1, not {capacity!r}")
        self.capacity: int = capacity
        """The most keys held at once."""
        self._tats: dict[str, int] = {}

    def tat(self, key: str) -> int:
        """The stored TAT of ``key`` (0: none)."""
        return self._tats.get(key, 0)

    def peek(self, key: str, now: int, interval: int, burst: int, cost: int = 1) -> Outcome:
        """What :meth:`acquire` would decide now, without storing anything."""
        return gcra(self._tats.get(key, 0), now, interval, burst, cost)

    def acquire(self, key: str, now: int, interval: int, burst: int, cost: int = 1) -> Outcome:
        """Decide one request for ``key`` at ``now`` (microseconds) and store its TAT."""
        tats = self._tats
        self._sweep(now)
        outcome = gcra(tats.get(key, 0), now, interval, burst, cost)
        if outcome.allowed:
            tats.pop(key, None)  # to the end: the most recently touched
            tats[key] = outcome.tat
            if len(tats) > self.capacity:
                del tats[next(iter(tats))]
        return outcome

    def _sweep(self, now: int) -> None:
        tats = self._tats
        for _ in range(self.SWEEP):
            if not tats:
                return
            key = next(iter(tats))
            tat = tats.pop(key)
            if tat > now:  # still owed: to the back of the line
                tats[key] = tat

    def __len__(self) -> int:
        return len(self._tats)

    def __repr__(self) -> str:
        return f"<GcraTable {len(self._tats)}/{self.capacity} keys>"
