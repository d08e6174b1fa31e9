"""The failed-key-check throttle (asyncapy.domain.throttle) and the bounded table of
TATs under it (asyncapy.domain.ratelimit.GcraTable)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncapy.domain.ratelimit import GcraTable, Rate
from asyncapy.domain.throttle import DEFAULT_KEY_FAILURE_BURST, DEFAULT_KEY_FAILURE_LIMIT, KeyFailureThrottle

S = 1_000_000  # microseconds in a second
T0 = 10**12


def spray(throttle: KeyFailureThrottle, group: str, tries: int, start: int, spacing: int) -> int:
    """``tries`` bad keys from ``group``, ``spacing`` us apart: how many reach the store."""
    store_calls = 0
    for n in range(tries):
        now = start + n * spacing
        if throttle.check(group, now).allowed:
            store_calls += 1
            throttle.failed(group, now)
    return store_calls


def test_the_defaults_are_10_a_second_burst_20():
    throttle = KeyFailureThrottle()
    assert (str(throttle.rate), throttle.burst) == (DEFAULT_KEY_FAILURE_LIMIT, DEFAULT_KEY_FAILURE_BURST) == ("10/s", 20)


def test_20000_bad_keys_in_4_5_s_reach_the_store_at_most_burst_plus_rate_times_time():
    throttle = KeyFailureThrottle()
    calls = spray(throttle, "198.51.100.7", 20_000, T0, 225)  # 20,000 in 4.5 s
    assert calls == 21 + 44  # burst + 1 at once, then 10 a second (the last try at 4.4998 s)
    assert throttle.failures == calls and throttle.refused == 20_000 - calls


def test_another_address_is_served_throughout_and_successes_cost_nothing():
    throttle = KeyFailureThrottle("10/s", 20)
    spray(throttle, "198.51.100.7", 1_000, T0, 10)
    now = T0 + 10_000
    assert not throttle.check("198.51.100.7", now).allowed
    for n in range(1_000):  # good keys from elsewhere: checked, never charged
        assert throttle.check("203.0.113.9", now + n).allowed
    assert len(throttle) == 1


def test_a_refusal_says_when_to_retry_and_the_address_recovers():
    throttle = KeyFailureThrottle("10/s", 0)
    assert throttle.failed("a", T0).allowed
    refused = throttle.check("a", T0)
    assert not refused.allowed and refused.retry_after == pytest.approx(0.1)
    assert throttle.check("a", T0 + S // 10).allowed


@pytest.mark.parametrize(
    "rate, burst, message",
    [("fast", 20, "key_failure_limit: 'fast' is not a rate"), ("10/s", -1, "key_failure_burst: -1 is not a burst")],
)
def test_bad_settings_are_refused_by_name(rate, burst, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        KeyFailureThrottle(rate, burst)


def test_idle_keys_are_forgotten_once_their_tat_has_passed():
    table = GcraTable()
    interval = Rate(100, 1).interval_us
    for n in range(1_000):
        table.acquire(f"k{n}", T0, interval, 0)
    assert len(table) == 1_000
    later = T0 + interval  # every TAT has passed
    for n in range(600):
        table.acquire("busy", later + n * interval, interval, 0)
    assert len(table) == 1  # each call swept two idle keys: all gone, "busy" stays
    assert table.tat("busy") > later


def test_the_table_never_holds_more_than_its_capacity():
    table = GcraTable(capacity=50)
    for n in range(500):
        assert table.acquire(f"k{n}", T0, 1_000_000, 5).allowed
    assert len(table) == 50
    with pytest.raises(ValueError):
        GcraTable(0)


def test_peek_stores_nothing_and_a_refusal_stores_nothing():
    table = GcraTable()
    assert table.peek("k", T0, 100, 0).allowed and len(table) == 0
    assert table.acquire("k", T0, 100, 0).allowed
    tat = table.tat("k")
    assert not table.acquire("k", T0, 100, 0).allowed
    assert table.tat("k") == tat


@settings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.integers(0, 300_000), min_size=1, max_size=200), burst=st.integers(0, 30))
def test_store_calls_of_a_spray_are_bounded_by_the_gcra(gaps, burst):
    """However a single address spaces its bad keys, the store sees at most
    ``rate * elapsed + burst + 1`` of them."""
    throttle = KeyFailureThrottle("10/s", burst)
    now, calls = T0, 0
    for gap in gaps:
        now += gap
        if throttle.check("x", now).allowed:
            calls += 1
            throttle.failed("x", now)
    elapsed = now - T0
    assert calls * (S // 10) <= elapsed + (burst + 1) * (S // 10)
