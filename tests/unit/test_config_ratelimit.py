"""The fair-share settings (``rate_limit``, ``rate_burst``, ``key_failure_limit``,
``key_failure_burst``) in the one settings table: defaults, normalised values, and a
:class:`ConfigError` naming the setting and what it accepts, from Python and from a
config file alike."""

from __future__ import annotations

import pytest

from asyncapy.config import SETTINGS, ConfigError, load_config, validate
from asyncapy.domain.ratelimit import Rate


def test_rate_limits_are_off_and_the_key_failure_throttle_on_by_default():
    assert SETTINGS["rate_limit"].default is None
    assert SETTINGS["rate_burst"].default == 0
    assert SETTINGS["key_failure_limit"].default == Rate(10, 1)
    assert SETTINGS["key_failure_burst"].default == 20


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("rate_limit", "100/s", Rate(100, 1)),
        ("rate_limit", "600/m", Rate(600, 60)),
        ("rate_limit", " 5000/h", Rate(5000, 3600)),
        ("rate_limit", None, None),
        ("rate_limit", Rate(3, 1), Rate(3, 1)),
        ("rate_burst", 50, 50),
        ("key_failure_limit", None, None),
        ("key_failure_limit", "2/s", Rate(2, 1)),
        ("key_failure_burst", 0, 0),
    ],
)
def test_good_values_are_normalised(key, value, expected):
    assert validate(key, value) == expected


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("rate_limit", "fast", ""),
        ("rate_limit", "100", ""),
        ("rate_limit", "100/d", ""),
        ("rate_limit", 100, ""),
        ("rate_limit", "0/s", " (a rate allows at least 1 request per period)"),
        ("rate_limit", "2000000/s", " (faster than 1000000/s, the fastest rate)"),
        ("rate_burst", -1, ""),
        ("rate_burst", 2.5, ""),
        ("rate_burst", None, ""),
        ("key_failure_limit", "often", ""),
        ("key_failure_burst", -5, ""),
    ],
    ids=repr,
)
def test_a_bad_value_names_the_setting_and_what_is_accepted(key, value, reason):
    with pytest.raises(ConfigError) as caught:
        validate(key, value)
    accepted = SETTINGS[key].accepted
    assert str(caught.value) == f"invalid {key}: {value!r}{reason}; accepted: {accepted}"
    if key.endswith("limit"):
        assert "N/s, N/m or N/h" in accepted
    else:
        assert "an integer of at least 0" in accepted


def test_a_config_file_sets_and_checks_them(tmp_path):
    good = tmp_path / "good.ini"
    good.write_text("[AsyncAPY]\nrate_limit = 100/s\nrate_burst = 50\nkey_failure_limit =\nkey_failure_burst = 5\n")
    assert load_config(good) == {
        "rate_limit": Rate(100, 1), "rate_burst": 50, "key_failure_limit": None, "key_failure_burst": 5,
    }
    bad = tmp_path / "bad.ini"
    bad.write_text("[AsyncAPY]\nrate_limit = fast\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert str(caught.value).startswith(f"invalid rate_limit in {bad}: 'fast'; accepted: nothing (no limit) or a rate")
