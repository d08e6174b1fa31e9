"""The failed-key-check throttle: an address that keeps presenting unknown API keys is
answered ``ERR_RATE_LIMITED`` before its checks reach the key store.

Every unknown key is a store call (the key cache only holds keys that exist), so a
client spraying random keys would turn each of its packets into a Redis command. The
throttle charges each *failed* check to the client's address group (an IPv4 address,
an IPv6 /64, as ``session_limit`` groups them) over the same GCRA as the rate limits
(:mod:`domain.ratelimit`): ``rate`` failures a second in the long run, ``burst`` more
at once. Once an address has used that up, its further checks are refused without a
store call until the GCRA lets one more failure in; a good key from that address is
refused meanwhile too (it cannot be told from a bad one without the store call), a
good key from any other address is not affected. Checks that succeed cost nothing.

Pure and per process: the state is a bounded :class:`~domain.ratelimit.GcraTable`,
the time an argument (microseconds, any monotonic clock). Across ``N`` processes an
address gets at most ``N`` times the allowance, which is enough to keep a spray from
reaching the store: 20,000 bad keys from one address at 10/s, burst 20, cost the
store about 21 + 10 per second and process.

The serving layer calls it around a key check::

    decision = throttle.check(group, now_us)
    if not decision.allowed:
        reply ERR_RATE_LIMITED with decision.retry_after   # no store call
    elif the store says the key is unknown:
        throttle.failed(group, now_us)
"""

from __future__ import annotations

from .ratelimit import Decision, GcraTable, Rate, check_burst, parse_rate

__all__ = ["KeyFailureThrottle", "DEFAULT_KEY_FAILURE_LIMIT", "DEFAULT_KEY_FAILURE_BURST"]

DEFAULT_KEY_FAILURE_LIMIT = "10/s"
"""Failed key checks an address may make, in the long run, by default."""

DEFAULT_KEY_FAILURE_BURST = 20
"""Failed key checks an address may make at once above that, by default."""


class KeyFailureThrottle:
    """Failed API-key checks per address group, ``rate`` with ``burst``.

    :param rate: a :class:`~domain.ratelimit.Rate` or its text (``"10/s"``).
    :param burst: failures allowed at once above the rate (an integer of at least 0).
    :param capacity: the most address groups remembered at once (see
        :class:`~domain.ratelimit.GcraTable`: one forgotten early may fail again).
    """

    __slots__ = ("rate", "burst", "_interval", "_table", "refused", "failures")

    def __init__(
        self,
        rate: object = DEFAULT_KEY_FAILURE_LIMIT,
        burst: int = DEFAULT_KEY_FAILURE_BURST,
        *,
        capacity: int = 100_000,
    ) -> None:
        self.rate: Rate = parse_rate(rate, name="key_failure_limit")
        self.burst: int = check_burst(burst, name="key_failure_burst")
        self._interval = self.rate.interval_us
        self._table = GcraTable(capacity)
        self.failures = 0
        """Failed checks recorded (for a metric)."""
        self.refused = 0
        """Checks refused without a store call (for a metric)."""

    def check(self, group: str, now: int) -> Decision:
        """Whether ``group`` may have a key checked at ``now`` (microseconds): refused
        while one more failure would be over its allowance; nothing is charged."""
        outcome = self._table.peek(group, now, self._interval, self.burst)
        if not outcome.allowed:
            self.refused += 1
        return outcome.decision()

    def failed(self, group: str, now: int) -> Decision:
        """Charge one failed check to ``group`` at ``now``. The answer says whether the
        failure fitted the allowance (it is counted either way; the next
        :meth:`check` is refused once it does not)."""
        self.failures += 1
        return self._table.acquire(group, now, self._interval, self.burst).decision()

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"<KeyFailureThrottle {self.rate} burst {self.burst}, {len(self._table)} addresses>"
