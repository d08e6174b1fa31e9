"""The ``redis+sentinel://`` and ``redis+cluster://`` store URLs: accepted forms, and a
clear ``ConfigError`` naming ``store`` and the accepted forms, password masked, for
malformed ones: the reason and one good URL. Nothing connects here."""

from __future__ import annotations

import pytest

from asyncapy.adapters.redis_cluster import ClusterClient
from asyncapy.adapters.redis_urls import _parse_multi, check_url, connect, wait_replicas
from asyncapy.adapters.store_urls import example
from asyncapy.config import ConfigError, validate
from asyncapy.stores import open_key_store, open_session_store


@pytest.mark.parametrize(
    "url, hosts, service, db",
    [
        ("redis+sentinel://s1:26379,s2:26380,s3/mymaster", [("s1", 26379), ("s2", 26380), ("s3", 26379)], "mymaster", 0),
        ("redis+sentinel://:pw@10.0.0.1:5000/svc/3", [("10.0.0.1", 5000)], "svc", 3),
        ("redis+sentinel://u:p%2Fw@[::1]:26379,[fe80::1]/svc/", [("::1", 26379), ("fe80::1", 26379)], "svc", 0),
        ("redis+cluster://n1:7000,n2:7001", [("n1", 7000), ("n2", 7001)], "", 0),
        ("REDIS+CLUSTER://n1", [("n1", 6379)], "", 0),
    ],
)
def test_good_urls_are_read(url, hosts, service, db):
    check_url(url)
    parts = _parse_multi(url)
    assert (parts.hosts, parts.service, parts.db) == (hosts, service, db)
    assert validate("store", url) == url


def test_credentials_are_unquoted_and_go_to_the_master():
    parts = _parse_multi("redis+sentinel://alice:p%2Fw%40rd@h:1/svc")
    assert (parts.username, parts.password) == ("alice", "p/w@rd")


def test_wait_replicas_is_a_sentinel_query_parameter():
    assert wait_replicas("redis+sentinel://h:1/svc?wait_replicas=1") == 1
    assert wait_replicas("redis+sentinel://h:1/svc") == 0
    assert wait_replicas("redis://h:1/0") == 0


@pytest.mark.parametrize(
    "url, reason",
    [
        ("redis+sentinel://h:1", "service name is missing"),
        ("redis+sentinel://h:1/", "service name is missing"),
        ("redis+sentinel:///svc", "no HOST"),
        ("redis+sentinel://h:0/svc", "port"),
        ("redis+sentinel://h:99999/svc", "port"),
        ("redis+sentinel://h:x/svc", "port"),
        ("redis+sentinel://h:1,/svc", "host"),
        ("redis+sentinel://h:1/svc/abc", "database"),
        ("redis+sentinel://h:1/svc/1/2", "more than /SERVICE/DB"),
        ("redis+sentinel://h:1/svc?wait_replicas=x", "wait_replicas"),
        ("redis+sentinel://h:1/svc?db=2", "unknown query parameter 'db'"),
        ("redis+sentinel://[::1/svc", "IPv6"),
        ("redis+cluster://n1:7000/0", "a path"),
        ("redis+cluster://n1:7000?wait_replicas=1", "unknown query parameter"),
        ("redis+cluster://", "no HOST"),
        ("redis+cluster://u:secret@h:1/x@y", "'@' after the hosts"),
        ("redis+cluster://u:sec#ret@h:1", "'#'"),
    ],
)
def test_malformed_urls_name_the_setting_the_reason_and_the_forms(url, reason):
    with pytest.raises(ValueError) as refused:
        check_url(url)
    assert reason in str(refused.value)
    with pytest.raises(ConfigError) as error:
        validate("store", url)
    message = str(error.value)
    assert "store" in message and reason in message
    # one good URL of the same scheme, and a short line: the grammar is in --help
    assert "e.g. " + example(url) in message and len(message) < 300
    for secret in ("secret", "sec#ret"):
        assert secret not in message


@pytest.mark.parametrize("opener", [open_session_store, open_key_store])
def test_the_store_openers_refuse_them_too(opener):
    with pytest.raises(ConfigError) as error:
        opener("redis+sentinel://:hunter2@h:1")
    assert "hunter2" not in str(error.value) and "service name" in str(error.value)


def test_connecting_does_not_reach_the_network():
    """A server may start while its store is down, as with one node."""
    cluster = connect("redis+cluster://127.0.0.1:1,127.0.0.1:2")
    assert isinstance(cluster, ClusterClient)
    assert repr(cluster) == "ClusterClient(redis+cluster://127.0.0.1:1,127.0.0.1:2)"
    sentinel = connect("redis+sentinel://:pw@127.0.0.1:1/svc/2")
    assert sentinel.asyncapy_location == "redis+sentinel://127.0.0.1:1/svc/2"


def test_a_cluster_slot_is_its_hash_tag():
    assert ClusterClient.slot("asyncapy:sessions:{10.0.0.1}") == ClusterClient.slot("asyncapy:session-data:{10.0.0.1}")
    assert ClusterClient.slot("asyncapy:{key}:" + "a" * 64) == ClusterClient.slot("asyncapy:{key}:" + "b" * 64)
