"""Filters that guard handlers: ``Filter`` (the base) and the built-in ``Filters``.

Pass filters to ``@server.add_handler(...)``; a handler is called only when all of its
filters pass. Combine them with ``&``, ``|`` and ``~``::

    @server.add_handler(Filters.Ip("10.0.0.0/8") | Filters.Ip("::1"), Filters.Fields(q=None))
    async def query(client, packet): ...
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any, Callable, Iterable, Optional, Union

from asyncapy.domain.addresses import IPAddress, IPNetwork, parse_address, unmapped_network
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.filtering import CheckResult, Filter

from .util import APIKeyFactory, fingerprint

logger: logging.Logger = logging.getLogger("asyncapy.filters")

__all__ = ["Filter", "Filters"]

_Address = IPAddress
_Network = IPNetwork

normalise_address = parse_address
"""The 0.6 name of :func:`asyncapy.domain.addresses.parse_address`, kept for callers."""


class Filters:
    """The built-in filters: :class:`Ip`, :class:`Fields` and :class:`APIFactory`."""

    class Ip(Filter):
        """Let through only clients whose IP address is listed.

        The filter can be updated at runtime: :meth:`add`, :meth:`remove`, or assign
        :attr:`ips` a new list.

        :param ips: one entry or an iterable of entries; an entry is an IPv4 or IPv6
            address (``"10.1.2.3"``, ``"::1"``) or network (``"10.0.0.0/8"``).
            IPv4-mapped IPv6 addresses (``::ffff:10.1.2.3``) match their IPv4 form.
        :raises ValueError: on anything that is not an address or network.
        """

        def __init__(self, ips: Union[str, Iterable[str]]) -> None:
            self.ips = ips

        @property
        def ips(self) -> frozenset[str]:
            """The entries currently allowed, as strings."""
            return frozenset(map(str, self._addresses | set(self._networks)))

        @ips.setter
        def ips(self, ips: Union[str, Iterable[str]]) -> None:
            if isinstance(ips, str):
                ips = [ips]
            elif not isinstance(ips, Iterable):
                raise ValueError(
                    f"ips must be an IP address, a network, or a list of them, not {ips!r}"
                )
            addresses: set[_Address] = set()
            networks: list[_Network] = []
            for entry in ips:
                parsed = self._parse(entry)
                if isinstance(parsed, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                    networks.append(parsed)
                else:
                    addresses.add(parsed)
            self._addresses = addresses
            self._networks = networks

        @staticmethod
        def _parse(entry: Any) -> Union[_Address, _Network]:
            if not isinstance(entry, str):
                raise ValueError(f"not an IP address or network: {entry!r}")
            if "/" in entry:
                try:
                    network = ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"not an IP address or network: {entry!r}") from None
                if network.prefixlen != network.max_prefixlen:
                    return unmapped_network(network)
                entry = str(network.network_address)  # a /32 or /128: one address
            address = parse_address(entry)
            if address is None:
                raise ValueError(f"not an IP address or network: {entry!r}")
            return address

        def add(self, entry: str) -> None:
            """Allow one more address or network."""
            parsed = self._parse(entry)
            if isinstance(parsed, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                if parsed not in self._networks:
                    self._networks = [*self._networks, parsed]
            else:
                self._addresses = self._addresses | {parsed}

        def remove(self, entry: str) -> None:
            """Stop allowing an address or network; ``KeyError`` if it was not allowed."""
            parsed = self._parse(entry)
            if parsed in self._addresses:
                self._addresses = self._addresses - {parsed}
            elif parsed in self._networks:
                self._networks = [n for n in self._networks if n != parsed]
            else:
                raise KeyError(entry)

        def check(self, client: Any, packet: Any) -> bool:
            address = getattr(client, "ip", None)
            if address is None:
                address = parse_address(client.address)
                if address is None:
                    return False
            if address in self._addresses:
                return True
            for network in self._networks:
                if address in network:
                    return True
            return False

        def __repr__(self) -> str:
            return f"Filters.Ip({sorted(self.ips)!r})"

    class Fields(Filter):
        """Let through only packets with exactly these fields.

        Each keyword names a field the payload must have; no other field may be
        present. Its value is ``None`` (any value) or a regular expression that must
        match (:func:`re.match`) ``str(value)``. Patterns are compiled once, here.

        :raises re.error: if a pattern does not compile.
        """

        def __init__(self, **fields: Optional[str]) -> None:
            compiled: dict[str, Optional[Callable[[str], Optional[re.Match[str]]]]] = {}
            for name, pattern in fields.items():
                if pattern is None:
                    compiled[name] = None
                elif isinstance(pattern, (str, re.Pattern)):
                    compiled[name] = re.compile(pattern).match
                else:
                    raise TypeError(
                        f"field {name!r}: expected None or a regex string, not {pattern!r}"
                    )
            self.fields = fields
            self._matchers = tuple(compiled.items())
            self._count = len(compiled)

        def check(self, client: Any, packet: Any) -> bool:
            if len(packet) != self._count:
                return False
            for name, match in self._matchers:
                if name not in packet:
                    return False
                if match is not None and match(str(packet[name])) is None:
                    return False
            return True

        def __repr__(self) -> str:
            return f"Filters.Fields({self.fields!r})"

    class APIFactory(Filter):
        """Let through only packets whose ``field_name`` holds a valid API key.

        The lookup is asynchronous: it never blocks the event loop, whatever store or
        subclass the factory uses. When the store cannot be reached, the check is not
        made, so it neither passes nor fails: the filter raises
        :class:`~asyncapy.errors.StoreUnavailable`, the packet goes no further and the
        client gets ``ERR_UNAVAILABLE`` ("retry later", never "your key is bad"),
        with one warning line in the log naming the key by its fingerprint.

        Served by a server, the check also applies the server's limits
        (docs/guide-rate-limits.md): an address that has failed too many key checks
        lately (``key_failure_limit``) is answered ``ERR_RATE_LIMITED`` without a
        store call, and a key issued with its own ``rate_limit`` is charged one
        request, ``ERR_RATE_LIMITED`` when it is over it.

        :param factory: the :class:`~asyncapy.util.APIKeyFactory` (or a subclass).
        :param field_name: the payload field carrying the key.
        """

        def __init__(self, factory: APIKeyFactory, field_name: str) -> None:
            if not isinstance(factory, APIKeyFactory):
                raise TypeError(f"factory must be an APIKeyFactory, not {factory!r}")
            if not isinstance(field_name, str):
                raise TypeError(f"field_name must be a string, not {field_name!r}")
            self.factory = factory
            self.field_name = field_name

        def check(self, client: Any, packet: Any) -> CheckResult:
            key = packet.get(self.field_name)
            if type(key) is not str:
                return False
            return self._lookup(client, key)

        async def _lookup(self, client: Any, key: str) -> bool:
            # The server's limits (asyncapy.limits): an address that failed too many
            # checks is refused before the store is asked, and a key issued with a
            # rate limit is charged; either refusal is ERR_RATE_LIMITED.
            limits = getattr(client, "_limits", None)
            if limits is not None:
                limits.before_key_check(client.address)
            try:
                found = await self.factory.acontains(key)
            except StoreUnavailable as exc:
                # Neither pass nor fail: an unchecked key gets nowhere, and the client
                # is told to retry (the server answers ERR_UNAVAILABLE and logs this).
                raise StoreUnavailable(f"API key {fingerprint(key)} not checked: {exc}") from None
            if limits is not None:
                if not found:
                    limits.key_check_failed(client.address, fingerprint(key))
                else:
                    await limits.charge_key(self.factory, key)
            return found

        def __repr__(self) -> str:
            return f"Filters.APIFactory({self.factory!r}, {self.field_name!r})"
