"""``asyncapy.domain.addresses.session_group``: the key ``session_limit`` counts by."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncapy.domain.addresses import DEFAULT_IPV6_PREFIX, session_group

ipv6 = st.integers(0, (1 << 128) - 1).map(ipaddress.IPv6Address).filter(lambda a: a.ipv4_mapped is None)
prefixes = st.integers(0, 128)


def test_ipv4_is_its_own_group_and_mapped_ipv4_is_ipv4():
    assert session_group("10.1.2.3") == "10.1.2.3"
    assert session_group("::ffff:10.1.2.3") == "10.1.2.3"
    assert session_group("10.1.2.3", 128) == "10.1.2.3"


def test_ipv6_is_grouped_by_its_slash_64_by_default():
    assert DEFAULT_IPV6_PREFIX == 64
    assert session_group("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert session_group("2001:db8:1:2:ffff::1") == session_group("2001:db8:1:2::9")
    assert session_group("2001:db8:1:3::1") != session_group("2001:db8:1:2::1")
    assert session_group("::1") == "::/64"


def test_other_prefixes_and_zones():
    assert session_group("2001:db8::1", 128) == "2001:db8::1"
    assert session_group("2001:db8:aaaa:bbbb::1", 48) == "2001:db8:aaaa::/48"
    assert session_group("2001:db8::1", 0) == "::/0"
    assert session_group("fe80::1%eth0") == "fe80::/64"


def test_what_is_not_an_ip_address_is_its_own_group():
    assert session_group("a-test-peer") == "a-test-peer"


@pytest.mark.parametrize("prefix", [-1, 129, 64.0, "64", None])
def test_a_bad_prefix_is_refused(prefix):
    with pytest.raises(ValueError, match="ipv6_prefix"):
        session_group("2001:db8::1", prefix)


@given(ipv6, prefixes)
def test_the_group_is_the_network_of_the_prefix(address, prefix):
    group = session_group(str(address), prefix)
    if prefix == 128:
        assert group == str(address)
    else:
        assert group == str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@given(ipv6, ipv6, prefixes)
def test_two_addresses_share_a_group_exactly_when_their_prefixes_are_equal(a, b, prefix):
    same = int(a) >> (128 - prefix) == int(b) >> (128 - prefix)
    assert (session_group(str(a), prefix) == session_group(str(b), prefix)) == same


# -- the one home of IPv4-mapped unwrapping -----------------------------------------------
from asyncapy.domain.addresses import canonical_address, parse_address, unmapped_network  # noqa: E402


def test_parse_address_unwraps_ipv4_mapped_ipv6_and_refuses_what_is_no_address():
    assert parse_address("::ffff:10.1.2.3") == ipaddress.IPv4Address("10.1.2.3")
    assert parse_address(ipaddress.IPv6Address("::ffff:10.1.2.3")) == ipaddress.IPv4Address("10.1.2.3")
    assert parse_address("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert parse_address("not an address") is None
    assert parse_address(None) is None


def test_canonical_address_is_text_and_leaves_made_up_peers_alone():
    assert canonical_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert canonical_address("2001:DB8::0001") == "2001:db8::1"
    assert canonical_address("test-client") == "test-client"


def test_a_mapped_network_is_the_ipv4_network_it_maps():
    assert unmapped_network(ipaddress.ip_network("::ffff:10.0.0.0/104")) == ipaddress.ip_network("10.0.0.0/8")
    assert unmapped_network(ipaddress.ip_network("2001:db8::/32")) == ipaddress.ip_network("2001:db8::/32")


def test_every_room_that_reads_an_address_agrees_on_mapped_clients():
    """Filters, the PROXY protocol's trust check and the session grouping all ask
    asyncapy.domain.addresses: a client is the same client on either socket family."""
    from asyncapy.domain.proxy import TrustedProxies
    from asyncapy.filters import Filters

    mapped = "::ffff:10.0.0.5"
    assert mapped in TrustedProxies("10.0.0.0/8")
    assert "10.0.0.5" in TrustedProxies("::ffff:10.0.0.0/104")
    assert session_group(mapped) == canonical_address(mapped) == "10.0.0.5"

    class Peer:
        address = mapped
        ip = None

    assert Filters.Ip("10.0.0.0/8").check(Peer(), None)


@given(ipv6)
def test_canonical_address_round_trips_through_parse_address(address):
    text = canonical_address(str(address))
    assert parse_address(text) == address
