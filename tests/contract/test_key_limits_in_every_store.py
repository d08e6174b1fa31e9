"""Per-key rate limits through ``APIKeyFactory`` over every shipped key store: memory,
SQLite, fakeredis, and a real redis-server, Cluster and Sentinel set behind the
coherent cache (the store ``APIKeyFactory(store=URL)`` opens), and the command line.

The limit is stored with the key (asyncapy.domain.keylimits): ``issue(metadata)`` still
works as in 0.5, ``get`` returns the metadata alone, and the limit survives updates and
reissues and goes with a revocation, whatever the store.
"""

from __future__ import annotations

import json

import pytest

from asyncapy import APIKeyFactory
from asyncapy.adapters.redis import RedisKeyStore
from asyncapy.domain.keylimits import KeyLimit
from asyncapy.domain.ratelimit import Rate
from tests.contract.test_redis_stores import fake_client
from tests.e2e.test_cli_keys import asyncapy

STORES = ["memory", "sqlite", "fakeredis", "redis", "cluster", "sentinel"]


@pytest.fixture(params=STORES)
async def factory(request, tmp_path):
    kind = request.param
    if kind == "memory":
        store = "memory://"
    elif kind == "sqlite":
        store = f"sqlite:///{tmp_path / 'keys.db'}"
    elif kind == "fakeredis":
        store = RedisKeyStore(fake_client())
    else:
        store = request.getfixturevalue({"redis": "redis_url", "cluster": "cluster_url", "sentinel": "sentinel_url"}[kind])
    factory = APIKeyFactory(store=store)
    yield factory
    await factory.store.aclose()


async def test_a_key_issued_with_a_limit_keeps_it_and_its_metadata_apart(factory):
    key = await factory.aissue({"user": "alice"}, rate_limit="100/s", rate_burst=50)
    assert await factory.aget(key) == {"user": "alice"}
    assert await factory.arate_limit(key) == KeyLimit(Rate(100, 1), 50)
    assert await factory.acontains(key)


async def test_issue_without_a_limit_is_0_5s(factory):
    key = await factory.aissue({"user": "bob"})
    assert await factory.arate_limit(key) is None
    assert await factory.store.get(key) == {"user": "bob"}  # stored exactly as before


async def test_the_limit_survives_update_and_reissue_and_goes_with_revoke(factory):
    key = await factory.aissue("m", rate_limit="10/m", rate_burst=1)
    await factory.aupdate(key, {"plan": "pro"})
    assert await factory.aget(key) == {"plan": "pro"}
    assert await factory.arate_limit(key) == KeyLimit(Rate(10, 60), 1)
    new = await factory.areissue(key)
    assert await factory.arate_limit(new) == KeyLimit(Rate(10, 60), 1)
    with pytest.raises(KeyError):
        await factory.arate_limit(key)
    await factory.arevoke(new)
    with pytest.raises(KeyError):
        await factory.arate_limit(new)


async def test_a_limit_can_be_changed_and_removed(factory):
    key = await factory.aissue([1, 2])
    await factory.aset_rate_limit(key, "5/h", rate_burst=2)
    assert await factory.arate_limit(key) == KeyLimit(Rate(5, 3600), 2)
    await factory.aset_rate_limit(key, None)
    assert await factory.arate_limit(key) is None
    assert await factory.aget(key) == [1, 2]
    with pytest.raises(KeyError):
        await factory.aset_rate_limit("no-such-key", "1/s")


@pytest.mark.parametrize("rate, burst, message", [("fast", 0, "rate_limit: 'fast'"), ("1/s", -1, "rate_burst: -1")])
async def test_bad_limits_are_refused_before_anything_is_stored(factory, rate, burst, message):
    with pytest.raises(ValueError, match=message):
        await factory.aissue({"x": 1}, rate_limit=rate, rate_burst=burst)


def test_the_synchronous_api_takes_the_limit_too():
    factory = APIKeyFactory(store="memory://")
    key = factory.issue({"user": "carol"}, rate_limit="1/s", rate_burst=0)
    assert factory.get(key) == {"user": "carol"}
    assert factory.rate_limit(key) == KeyLimit(Rate(1, 1), 0)
    factory.set_rate_limit(key, "2/s", rate_burst=3)
    assert factory.rate_limit(key) == KeyLimit(Rate(2, 1), 3)
    factory.update(key, None)
    assert factory.get(key) is None and factory.rate_limit(key) == KeyLimit(Rate(2, 1), 3)
    assert factory.get(factory.issue("positional, as 0.5")) == "positional, as 0.5"


async def test_the_command_line_issues_a_key_with_its_limit(tmp_path):
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    issued = await asyncapy("keys", "issue", "--store", store, "--metadata", '{"user": "dave"}',
                            "--rate-limit", "100/s", "--rate-burst", "50")
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.decode().strip()
    factory = APIKeyFactory(store=store)
    assert factory.rate_limit(key) == KeyLimit(Rate(100, 1), 50)
    shown = await asyncapy("keys", "get", "--store", store, "--no-pretty", key)
    assert json.loads(shown.stdout) == {"user": "dave"}
    for flags, error in ((["--rate-limit", "fast"], "--rate-limit: 'fast' is not a rate; write N/s, N/m or N/h"),
                         (["--rate-limit", "1/s", "--rate-burst", "-1"], "--rate-burst: -1 is not a burst")):
        refused = await asyncapy("keys", "issue", "--store", store, *flags)
        assert refused.returncode == 2 and error in refused.stderr.decode() and not refused.stdout
