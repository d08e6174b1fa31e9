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

__all__ = ["session_group", "DEFAULT_IPV6_PREFIX"]

DEFAULT_IPV6_PREFIX = 64
"""Bits of an IPv6 address that name one client, unless configured otherwise."""


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
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 4:
        return str(parsed)
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    bits = int(parsed)  # the zone, if any, is not part of the integer
    if ipv6_prefix == 128:
        return str(ipaddress.IPv6Address(bits))
    mask = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
    return f"{ipaddress.IPv6Address(bits & mask)}/{ipv6_prefix}"
