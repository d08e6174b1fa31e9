"""Rate limits stored with an API key (asyncapy.domain.keylimits): the record's layout,
its round trip, and how a malformed or ambiguous one is read."""

from __future__ import annotations

import json

import pytest

from asyncapy.domain.keylimits import LIMIT_FIELD, METADATA_FIELD, KeyLimit, key_limit, unwrap, wrap
from asyncapy.domain.ratelimit import Rate


def test_a_key_without_a_limit_is_stored_as_in_0_5():
    for metadata in (None, {"user": "alice"}, [1, 2], "text", 3):
        assert wrap(metadata, None) is metadata
        assert unwrap(metadata) == (metadata, None)


@pytest.mark.parametrize("metadata", [None, {"user": "alice"}, {LIMIT_FIELD: 1}, [1], "x"])
def test_a_limited_key_round_trips_through_json(metadata):
    limit = key_limit("100/s", 50)
    record = json.loads(json.dumps(wrap(metadata, limit)))
    assert record == {LIMIT_FIELD: {"rate": "100/s", "burst": 50}, METADATA_FIELD: metadata}
    assert unwrap(record) == (metadata, KeyLimit(Rate(100, 1), 50))
    assert str(limit) == "100/s burst 50"


def test_key_limit_checks_its_arguments_by_name():
    assert key_limit(None) is None and key_limit(None, 5) is None
    assert key_limit(Rate(5, 60)) == KeyLimit(Rate(5, 60), 0)
    with pytest.raises(ValueError, match=r"^rate_limit: 'fast' is not a rate"):
        key_limit("fast")
    with pytest.raises(ValueError, match=r"^rate_burst: -1 is not a burst"):
        key_limit("1/s", -1)


@pytest.mark.parametrize(
    "stored", [{"rate": "fast", "burst": 0}, {"rate": "1/s"}, {"rate": "1/s", "burst": -1}, "1/s", None]
)
def test_a_malformed_stored_limit_is_an_error_never_dropped(stored):
    with pytest.raises(ValueError, match="stored rate|malformed"):
        unwrap({LIMIT_FIELD: stored, METADATA_FIELD: {}})


def test_only_the_two_reserved_names_together_make_a_record():
    for metadata in ({LIMIT_FIELD: {"rate": "1/s", "burst": 0}}, {METADATA_FIELD: 1, "other": 2},
                     {LIMIT_FIELD: {"rate": "1/s", "burst": 0}, METADATA_FIELD: 1, "x": 0}):
        assert unwrap(metadata) == (metadata, None)
