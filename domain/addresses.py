"""Which client a connection counts against: the grouping of addresses for ``session_limit``.

An IPv4 address is one client: a host rarely holds more than one, and many users
behind one NAT already share one. An IPv6 address is not: a host is handed a whole
/64 (and often a /56 or /48) and picks a new address in it for every connection it
likes (privacy extensions, or an attacker's script), so limiting each /128 limits
nothing. ``session_limit`` therefore counts the sessions of an IPv6 *prefix*,
``/64`` by default, as the operators of mail and web servers do.

A pure function of the address and the prefix length, so it is tested without a
socket (``tests/unit/test_addresses.py``) and the server asks it, once per
connection, for the key its session store counts by. Handlers still see the real
address: the group is only the key of the limit.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, Optional, Union

__all__ = [
    "IPAddress",
    "IPNetwork",
    "parse_address",
    "canonical_address",
    "unmapped_network",
    "session_group",
    "DEFAULT_IPV6_PREFIX",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_IPV6_PREFIX = 64
"""Bits of an IPv6 address that name one client, unless configured otherwise."""


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_address(address: Any) -> Optional[IPAddress]:
    """``address`` (text or an ``ipaddress`` object) as an IP address, an IPv4-mapped
    IPv6 address (``::ffff:10.1.2.3``, what a dual-stack socket reports for an IPv4
    peer) as the IPv4 address it maps; None if it is no IP address.

    The one place that unwrapping happens: filters, the PROXY protocol's trust check,
    the transport's peer address and ``session_limit``'s grouping all ask here, so an
    IPv4 client is one client whichever socket family it arrived on. Cached for text
    (clients come back, and parsing costs more than the rest of an accept)."""
    if type(address) is str:
        return _parse_text(address)
    return _parse(address)


def _parse(address: Any) -> Optional[IPAddress]:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


_parse_text = functools.lru_cache(maxsize=4096)(_parse)


@functools.lru_cache(maxsize=4096)
def canonical_address(host: str) -> str:
    """The text sessions are keyed and logged by: :func:`parse_address`'s result as
    text (IPv4-mapped IPv6 as plain IPv4), or ``host`` unchanged if it is no IP
    address (an in-memory test stream's made-up peer)."""
    parsed = _parse_text(host)
    return str(parsed) if parsed is not None else host


def unmapped_network(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) as the IPv4 network it
    maps, any other network unchanged: clients are unwrapped to IPv4 by
    :func:`parse_address`, so a list of allowed networks must be too."""
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


@functools.lru_cache(maxsize=4096)
def session_group(address: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The key ``address``'s sessions are counted under for ``session_limit``.

    - IPv4 (and IPv4-mapped IPv6, ``::ffff:10.1.2.3``): the address itself,
      ``'10.1.2.3'`` (a /32).
    - IPv6: the network of its first ``ipv6_prefix`` bits (0 to 128) in CIDR
      notation, ``'2001:db8:1:2::/64'``; with 128, the address itself, as written
      by :mod:`ipaddress` (``'2001:db8::1'``). A zone (``fe80::1%eth0``) is dropped.
    - Anything that is not an IP address (an in-memory test stream's made-up peer):
      itself, unchanged.

    Cached: clients come back, and parsing an address costs more than the rest of
    an admission.
    """
    if type(ipv6_prefix) is not int or not 0 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be an integer from 0 to 128, not {ipv6_prefix!r}")
    parsed = _parse_text(address)
    if parsed is None:
        return address
    if parsed.version == 4:
        return str(parsed)
    bits = int(parsed)  # the zone, if any, is not part of the integer
    if ipv6_prefix == 128:
        return str(ipaddress.IPv6Address(bits))
    mask = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
    return f"{ipaddress.IPv6Address(bits & mask)}/{ipv6_prefix}"
