"""Rates and the GCRA (asyncapy.domain.ratelimit): parsing, and the bound every window
keeps over any sequence of arrivals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncapy.domain.ratelimit import (
    MAX_RATE_PER_SECOND,
    Decision,
    Rate,
    check_burst,
    check_cost,
    gcra,
    parse_rate,
)


@pytest.mark.parametrize(
    "text, count, period",
    [("100/s", 100, 1), ("600/m", 600, 60), ("5000/h", 5000, 3600), (" 7 / s ", 7, 1), ("1/h", 1, 3600),
     (f"{MAX_RATE_PER_SECOND}/s", MAX_RATE_PER_SECOND, 1)],
)
def test_rates_are_parsed(text, count, period):
    rate = parse_rate(text)
    assert rate == Rate(count, period)
    assert parse_rate(str(rate)) == rate
    assert parse_rate(rate) is rate


@pytest.mark.parametrize("value", ["fast", "", "100", "100/d", "-1/s", "1.5/s", "100/sec", "/s", "10/s/s", 100, None, b"1/s"])
def test_bad_rates_say_what_is_accepted(value):
    with pytest.raises(ValueError) as caught:
        parse_rate(value)
    assert str(caught.value) == f"rate_limit: {value!r} is not a rate; write N/s, N/m or N/h, e.g. 100/s"


def test_a_zero_or_too_fast_rate_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^key_failure_limit: '0/s' allows nothing"):
        parse_rate("0/s", name="key_failure_limit")
    with pytest.raises(ValueError, match="faster than 1000000/s"):
        parse_rate(f"{MAX_RATE_PER_SECOND + 1}/s")
    with pytest.raises(ValueError):
        Rate(0, 1)
    with pytest.raises(ValueError):
        Rate(1, 2)


def test_the_emission_interval_is_whole_microseconds_rounded_up():
    assert Rate(100, 1).interval_us == 10_000
    assert Rate(3, 1).interval_us == 333_334  # never looser than written
    assert Rate(1, 3600).interval_us == 3_600_000_000
    assert Rate(MAX_RATE_PER_SECOND, 1).interval_us == 1
    assert Rate(60, 60).per_second == 1.0


@pytest.mark.parametrize("value", [-1, 1.0, "3", None, True])
def test_bad_bursts_are_refused_by_name(value):
    with pytest.raises(ValueError, match=r"^rate_burst: .* is not a burst; write an integer of at least 0"):
        check_burst(value)
    assert check_burst(0) == 0 and check_burst(20) == 20


def test_a_cost_above_burst_plus_one_could_never_pass():
    assert check_cost(3, 2) == 3
    for bad in (0, 4, 1.0, True):
        with pytest.raises(ValueError):
            check_cost(bad, 2)


def test_a_fresh_key_gets_burst_plus_one_at_once_then_one_per_interval():
    interval, burst, now = 1000, 4, 10**12
    tat, allowed = 0, []
    for _ in range(8):
        outcome = gcra(tat, now, interval, burst)
        allowed.append(outcome.allowed)
        tat = outcome.tat
    assert allowed == [True] * 5 + [False] * 3
    refused = gcra(tat, now, interval, burst)
    assert refused.retry_after_us == interval and refused.remaining == 0
    assert refused.decision() == Decision(False, 0.001, 0)
    assert gcra(tat, now + interval - 1, interval, burst).allowed is False
    later = gcra(tat, now + interval, interval, burst)
    assert later.allowed and later.remaining == 0


def test_remaining_counts_down_and_a_refusal_leaves_the_state_alone():
    outcome = gcra(0, 5_000, 100, 2)
    assert (outcome.allowed, outcome.remaining) == (True, 2)
    refused = gcra(outcome.tat, 5_000, 100, 2, cost=3)
    assert not refused.allowed and refused.tat == outcome.tat and refused.remaining == 2
    assert refused.retry_after_us == 100


def test_a_state_whose_tat_has_passed_decides_as_a_forgotten_one():
    for tat in (0, 1, 999, 1000):
        assert gcra(tat, 1000, 7, 3) == gcra(0, 1000, 7, 3)
    assert gcra(1001, 1000, 7, 3) != gcra(0, 1000, 7, 3)


arrivals = st.lists(st.tuples(st.integers(0, 5_000), st.integers(1, 3)), min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    gaps=arrivals,
    interval=st.integers(1, 2_000),
    burst=st.integers(0, 20),
    window=st.integers(0, 50_000),
)
def test_no_window_ever_allows_more_than_rate_times_window_plus_burst_plus_one(gaps, interval, burst, window):
    """Over any arrival sequence (costs 1 to 3) and any window [t, t + W], the cost
    allowed is at most ``W / T + burst + 1``: the GCRA's bound, exactly, in integers."""
    now, tat, allowed = 10**9, 0, []
    for gap, cost in gaps:
        now += gap
        if cost > burst + 1:
            cost = burst + 1
        outcome = gcra(tat, now, interval, burst, cost)
        assert outcome.tat >= tat
        if outcome.allowed:
            allowed.append((now, cost))
            tat = outcome.tat
            assert outcome.retry_after_us == 0
        else:
            assert outcome.tat == tat and outcome.retry_after_us > 0
            # ...and waiting exactly retry_after is enough, a microsecond less is not.
            assert gcra(tat, now + outcome.retry_after_us, interval, burst, cost).allowed
            assert not gcra(tat, now + outcome.retry_after_us - 1, interval, burst, cost).allowed
    for start, _ in allowed:
        total = sum(cost for at, cost in allowed if start <= at <= start + window)
        assert total * interval <= window + (burst + 1) * interval


@settings(max_examples=100, deadline=None)
@given(interval=st.integers(1, 1_000), burst=st.integers(0, 10), steps=st.integers(1, 200))
def test_a_client_at_the_rate_is_never_refused(interval, burst, steps):
    """Exactly one request per interval is always allowed, whatever the burst."""
    now, tat = 10**9, 0
    for _ in range(steps):
        outcome = gcra(tat, now, interval, burst)
        assert outcome.allowed
        tat = outcome.tat
        now += interval


@pytest.mark.parametrize(
    "seconds, shown", [(0.1, 0.1), (0.000001, 0.001), (2.0, 2), (3599.9994, 3600), (0.0, 0), (0.1234, 0.124)]
)
def test_the_rate_limited_reply_rounds_retry_after_up_to_the_millisecond(seconds, shown):
    from asyncapy.domain.codecs import JSON, ZIPROTO
    from asyncapy.domain.ratelimit import rate_limited_payload

    payload = rate_limited_payload(seconds)
    assert payload == {"status": "failure", "error": "ERR_RATE_LIMITED", "retry_after": shown}
    assert type(payload["retry_after"]) is type(shown)
    for codec in (JSON, ZIPROTO):
        assert codec.decode(codec.encode(payload)) == payload
