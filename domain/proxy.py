"""The PROXY protocol (versions 1 and 2, HAProxy's specification), sans I/O.

A TCP load balancer in front of the servers hides every client behind its own address.
With the PROXY protocol it sends, before any byte of the client's, one header saying
whom the connection is for. :class:`ProxyParser` reads that header from the first
bytes of a connection and says who the client is; the rest of the stream (already
AsyncAProto bytes, when the client spoke at once) comes back untouched in
:attr:`ProxyHeader.leftover`, for the :class:`~domain.connection.Connection`.

Bytes in, one event out, like the framer: :data:`NEED_DATA`, a :class:`ProxyHeader`,
or a :class:`ProxyError` (close the connection). The outcome depends only on the bytes,
never on how they were cut into reads: every check is decided on a prefix that no
later byte can change (the signature byte by byte, the v2 length from byte 16, the v1
line at its CRLF), so a header fed one byte at a time parses exactly as a whole one.

What the specification asks of a receiver, and how it is met here:

- v1 is one US-ASCII line, ``PROXY TCP4|TCP6|UNKNOWN ...\\r\\n``, of at most 107 bytes
  with its CRLF; fields separated by exactly one space; IPv4 addresses as four decimal
  numbers without leading zeros, ports as decimal numbers from 0 to 65535 without
  leading zeros; a lone CR or LF is no line end. ``UNKNOWN`` (anything may follow it
  up to the CRLF) means: use the real connection's addresses.
- v2 is the 12-byte signature, the version (2) and command (LOCAL or PROXY), the family
  and transport, a 16-bit length, then the address block and TLVs. LOCAL (a health
  check by the proxy itself) and the UNSPEC family or transport mean: use the real
  connection's addresses. Unassigned versions, commands, families and transports
  are refused, and so is an address block shorter than its family needs.
- TLVs are skipped, but their framing must fit the header exactly, and a CRC32C TLV
  is verified (the specification requires it of a receiver that supports it).
- A header longer than ``max_length`` (4096 bytes by default: an AF_UNIX header with
  its 216 address bytes and a few TLVs fits many times over) is refused as soon as
  its length field is read, so a peer cannot make the server buffer more.

Which peers may send a header at all is :class:`TrustedProxies`' question: the
specification forbids guessing whether a header is present, and believing one from an
untrusted peer would let anyone claim any address.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union, final

from .addresses import IPNetwork, parse_address, unmapped_network
from .framing import NEED_DATA, _NeedData

__all__ = [
    "NEED_DATA",
    "ProxyHeader",
    "ProxyError",
    "ProxyParser",
    "TrustedProxies",
    "UNKNOWN_CLIENT",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "DEFAULT_MAX_LENGTH",
    "crc32c",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every version 2 header starts with."""

V1_PREFIX = b"PROXY "
"""What every version 1 header starts with."""

V1_MAX_LENGTH = 107
"""The longest v1 line, CRLF included (``PROXY UNKNOWN`` with two full IPv6 addresses
and ports): a line without its CRLF by then is invalid."""

DEFAULT_MAX_LENGTH = 4096
"""The longest v2 header (16 fixed bytes, addresses, TLVs) a parser accepts by default."""

_V2_FIXED = 16
_FAMILIES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_ADDRESS_SIZES = {"INET": 12, "INET6": 36, "UNIX": 216}
_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_PP2_TYPE_CRC32C = 0x03

_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}\Z")
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
_V1_PORT = re.compile(r"(?:0|[1-9][0-9]{0,4})\Z")


class ProxyHeader(NamedTuple):
    """A complete, valid PROXY header, and the bytes that followed it.

    ``family`` is ``"INET"`` or ``"INET6"`` when the header names the client's TCP (or
    UDP) address; then :attr:`source` and :attr:`source_port` are the client's. It is
    ``"UNIX"`` for a client of the proxy on a Unix socket (the paths are given, but a
    path is no network address), and ``"UNKNOWN"`` when the header carries no address
    to use: v1 ``UNKNOWN``, v2 ``LOCAL`` (then :attr:`local` is true), or v2's UNSPEC
    family or transport. :meth:`client` applies these rules.
    """

    version: int
    """1 (the text line) or 2 (binary)."""
    family: str
    """``"INET"``, ``"INET6"``, ``"UNIX"`` or ``"UNKNOWN"``."""
    source: Optional[str]
    """The client's address (an IP address in canonical text, or a Unix socket path),
    or None when the header carries none."""
    source_port: Optional[int]
    """The client's port; None for ``UNIX`` and ``UNKNOWN``."""
    destination: Optional[str]
    """The address the client connected to (the proxy's listener), or None."""
    destination_port: Optional[int]
    """The port the client connected to, or None."""
    local: bool
    """True for a v2 LOCAL header: the proxy's own connection (a health check)."""
    leftover: bytes
    """The bytes received after the header: the start of the AsyncAProto stream, to
    feed to the session's ``Connection`` as they are."""

    def client(self, peer: Any) -> Any:
        """The address the header names: ``(source, source_port)`` for an IPv4 or IPv6
        client, else ``peer``, the specification's fallback for LOCAL, UNKNOWN, UNSPEC
        and UNIX (the server does not take it: it gives such a session
        :data:`UNKNOWN_CLIENT`, see :attr:`has_client`)."""
        if self.family in ("INET", "INET6"):
            return (self.source, self.source_port)
        return peer


    @property
    def has_client(self) -> bool:
        """True when the header names an IPv4 or IPv6 client address. A LOCAL header
        (a balancer's health check), UNKNOWN, UNSPEC and UNIX name none: the peer is
        then the proxy itself, and a session served as the proxy's address would pass
        an address check meant for the proxy's host (``Filters.Ip("127.0.0.1")`` with
        a balancer on the same machine)."""
        return self.family in ("INET", "INET6")


UNKNOWN_CLIENT = "unknown"
"""The client address of a session whose PROXY header names none (LOCAL, UNKNOWN,
UNSPEC, UNIX): no IP address, so no ``Filters.Ip`` matches it, and every such session
counts in this one ``session_limit`` group."""


@final  # so that a type checker narrows ``type(event) is ProxyError`` both ways
class ProxyError(NamedTuple):
    """The connection did not start with a valid PROXY header: close it."""

    reason: str
    """What was wrong, for the log (the peer is sent nothing)."""


class ProxyParser:
    """Reads one PROXY header (v1 or v2) from the first bytes of a connection.

    Feed bytes with :meth:`receive_data` (``b""`` means the peer closed), then call
    :meth:`next_event`. Once the event is a :class:`ProxyHeader` or a
    :class:`ProxyError` it is final: :meth:`next_event` returns it again, and
    feeding more bytes is a programming error (they belong to the ``Connection``).
    """

    __slots__ = ("max_length", "_buffer", "_closed", "_event")

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if type(max_length) is not int or max_length < V1_MAX_LENGTH:
            raise ValueError(f"max_length must be an integer of at least {V1_MAX_LENGTH}, got {max_length!r}")
        self.max_length: int = max_length
        """The longest v2 header accepted, in bytes."""
        self._buffer = bytearray()
        self._closed = False
        self._event: Union[ProxyHeader, ProxyError, None] = None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer; ``b""`` says the peer closed."""
        if self._event is not None:
            raise RuntimeError("the PROXY header is already parsed: feed the stream to the Connection")
        if not data:
            self._closed = True
        elif self._closed:
            raise RuntimeError("data after the end of the stream")
        else:
            self._buffer += data

    def next_event(self) -> Union[ProxyHeader, ProxyError, _NeedData]:
        """The :class:`ProxyHeader`, a :class:`ProxyError`, or :data:`NEED_DATA`."""
        if self._event is not None:
            return self._event
        buffer = bytes(self._buffer)
        if buffer[:1] == b"P":
            event = _parse_v1(buffer)
        else:
            event = _parse_v2(buffer, self.max_length)
        if event is NEED_DATA:
            if not self._closed:
                return NEED_DATA
            event = ProxyError(f"the peer closed the connection after {len(buffer)} bytes of a PROXY header")
        self._event = event
        self._buffer = bytearray()
        return event


# -- version 1 -----------------------------------------------------------------------------------
def _parse_v1(buffer: bytes) -> Union[ProxyHeader, ProxyError, _NeedData]:
    if not V1_PREFIX.startswith(buffer[: len(V1_PREFIX)]):
        return _not_a_header(buffer, V1_PREFIX)
    # The line ends at the first CR or LF, which must be a CRLF within 107 bytes: a
    # break at byte 107 or later ends no valid line, so it is not even looked for (and
    # the reason given cannot depend on how many bytes had come).
    end = _first_line_break(buffer)
    if end < 0:
        if len(buffer) >= V1_MAX_LENGTH:
            return ProxyError(f"PROXY v1 line without CRLF in its first {V1_MAX_LENGTH} bytes")
        return NEED_DATA
    if buffer[end] == 0x0A:
        return ProxyError("PROXY v1 line ended by a lone LF (CRLF required)")
    if end + 1 >= len(buffer):
        return NEED_DATA  # the CR's LF may come next
    if buffer[end + 1] != 0x0A:
        return ProxyError("PROXY v1 line ended by a lone CR (CRLF required)")
    leftover = buffer[end + 2 :]
    try:
        line = buffer[:end].decode("ascii")
    except UnicodeDecodeError:
        return ProxyError("PROXY v1 line with a byte that is not US-ASCII")
    fields = line.split(" ")
    if fields[1] == "UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF is found"
        return ProxyHeader(1, "UNKNOWN", None, None, None, None, False, leftover)
    if fields[1] not in ("TCP4", "TCP6"):
        return ProxyError(f"PROXY v1 protocol {fields[1][:10]!r} (accepted: TCP4, TCP6, UNKNOWN)")
    if len(fields) != 6:
        return ProxyError(
            f"PROXY v1 {fields[1]} line with {len(fields) - 2} fields after the protocol "
            "(4 expected, separated by exactly one space)"
        )
    family = "INET" if fields[1] == "TCP4" else "INET6"
    addresses = []
    for text in fields[2:4]:
        address = _v1_address(text, family)
        if address is None:
            kind = "IPv4" if family == "INET" else "IPv6"
            return ProxyError(f"PROXY v1 {fields[1]} address {text[:45]!r} is not a valid {kind} address")
        addresses.append(address)
    ports = []
    for text in fields[4:6]:
        if not _V1_PORT.match(text) or int(text) > 65535:
            return ProxyError(f"PROXY v1 port {text[:10]!r} (a decimal number from 0 to 65535, no leading zeros)")
        ports.append(int(text))
    return ProxyHeader(1, family, addresses[0], ports[0], addresses[1], ports[1], False, leftover)


def _first_line_break(buffer: bytes) -> int:
    """The index of the first CR or LF among the bytes where a CRLF can still end the
    line within :data:`V1_MAX_LENGTH` bytes; -1 if none."""
    cr = buffer.find(b"\r", 0, V1_MAX_LENGTH - 1)
    lf = buffer.find(b"\n", 0, V1_MAX_LENGTH - 1)
    if cr < 0:
        return lf
    return cr if lf < 0 else min(cr, lf)


def _v1_address(text: str, family: str) -> Optional[str]:
    try:
        if family == "INET":
            return str(ipaddress.IPv4Address(text)) if _V1_IPV4.match(text) else None
        # Hex digits, colons (and the dots of an embedded IPv4 tail); no zone index.
        return str(ipaddress.IPv6Address(text)) if _V1_IPV6.match(text) else None
    except ValueError:
        return None


def _not_a_header(buffer: bytes, expected: bytes) -> ProxyError:
    # The bytes up to the first one that differs: what decided, whatever follows it.
    first = next(i for i, (got, want) in enumerate(zip(buffer, expected)) if got != want)
    return ProxyError(
        f"the connection does not start with a PROXY header (first bytes {buffer[: first + 1].hex(' ')}); "
        "the proxy must send one (HAProxy: send-proxy or send-proxy-v2 on the server line)"
    )


# -- version 2 -----------------------------------------------------------------------------------
def _parse_v2(buffer: bytes, max_length: int) -> Union[ProxyHeader, ProxyError, _NeedData]:
    if not V2_SIGNATURE.startswith(buffer[:12]):
        return _not_a_header(buffer, V2_SIGNATURE)
    if len(buffer) < 13:
        return NEED_DATA
    version, command = buffer[12] >> 4, buffer[12] & 0x0F
    if version != 2:
        return ProxyError(f"PROXY v2 header of version {version} (only 2 is defined)")
    if command > 1:
        return ProxyError(f"PROXY v2 command {command} (accepted: 0 LOCAL, 1 PROXY)")
    if len(buffer) < _V2_FIXED:
        return NEED_DATA
    length = _V2_FIXED + int.from_bytes(buffer[14:16], "big")
    if length > max_length:
        return ProxyError(f"PROXY v2 header of {length} bytes (at most {max_length})")
    if len(buffer) < length:
        return NEED_DATA
    block = buffer[_V2_FIXED:length]
    leftover = buffer[length:]
    family = _FAMILIES.get(buffer[13] >> 4)
    transport = _TRANSPORTS.get(buffer[13] & 0x0F)
    if command == 0:
        # LOCAL: "discard the protocol block including the family which is ignored".
        used = 0
    else:
        if family is None:
            return ProxyError(f"PROXY v2 address family {buffer[13] >> 4} (accepted: 0 to 3)")
        if transport is None:
            return ProxyError(f"PROXY v2 transport protocol {buffer[13] & 0x0F} (accepted: 0 to 2)")
        used = 0 if family == "UNSPEC" or transport == "UNSPEC" else _ADDRESS_SIZES[family]
        if len(block) < used:
            return ProxyError(f"PROXY v2 {family} address block of {len(block)} bytes ({used} needed)")
    problem = _check_tlvs(buffer[:length], used)
    if problem:
        return ProxyError(problem)
    if command == 0:
        return ProxyHeader(2, "UNKNOWN", None, None, None, None, True, leftover)
    if used == 0 or family is None:  # past LOCAL (command 0), family is known
        return ProxyHeader(2, "UNKNOWN", None, None, None, None, False, leftover)
    if family == "UNIX":
        source, destination = _unix_path(block[:108]), _unix_path(block[108:216])
        return ProxyHeader(2, "UNIX", source, None, destination, None, False, leftover)
    size = 4 if family == "INET" else 16
    make = ipaddress.IPv4Address if family == "INET" else ipaddress.IPv6Address
    source, destination = str(make(block[:size])), str(make(block[size : 2 * size]))
    source_port = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    destination_port = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    return ProxyHeader(2, family, source, source_port, destination, destination_port, False, leftover)


def _check_tlvs(header: bytes, used: int) -> str:
    """'' if the TLVs after the address block fit the header exactly (a CRC32C one
    matching), else what is wrong.

    A LOCAL or UNSPEC header's block is skipped whole: its address information is to
    be ignored, so where its addresses end is unknown.
    """
    if used == 0:
        return ""
    at = _V2_FIXED + used
    while at < len(header):
        if at + 3 > len(header):
            return f"PROXY v2 TLV header cut short ({len(header) - at} of 3 bytes)"
        kind, size = header[at], int.from_bytes(header[at + 1 : at + 3], "big")
        if at + 3 + size > len(header):
            return f"PROXY v2 TLV of type 0x{kind:02x} and {size} bytes runs past the header"
        if kind == _PP2_TYPE_CRC32C:
            if size != 4:
                return f"PROXY v2 CRC32C TLV of {size} bytes (4 expected)"
            expected = int.from_bytes(header[at + 3 : at + 7], "big")
            zeroed = header[: at + 3] + b"\x00\x00\x00\x00" + header[at + 7 :]
            if crc32c(zeroed) != expected:
                return "PROXY v2 header fails its CRC32C checksum"
        at += 3 + size
    return ""


def _unix_path(raw: bytes) -> str:
    # A sun_path: NUL-terminated (an abstract socket starts with a NUL; keep its name).
    if raw[:1] == b"\x00":
        return "@" + raw[1:].split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B) of ``data``: the PROXY v2 checksum."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- who may send a header -----------------------------------------------------------------------
_Network = IPNetwork


class TrustedProxies:
    """The proxies whose PROXY headers are believed: IP addresses and CIDR networks.

    Built from strings (``"10.0.0.5"``, ``"10.0.0.0/8"``, ``"::1"``, ``"fd00::/8"``) or
    one string of them separated by commas or spaces (a config file's or the command
    line's form). A bad entry raises ``ValueError`` naming it; so does a network with
    host bits set (``10.0.0.5/8``), which would otherwise trust more than was written.
    Host names are refused: trust must not depend on what a DNS answer says.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.5``, what a dual-stack socket reports
    for an IPv4 peer) match the IPv4 entries, and mapped entries match IPv4 peers.
    """

    __slots__ = ("networks",)

    def __init__(self, entries: Union[str, Iterable[Any]] = ()) -> None:
        if isinstance(entries, (bytes, bytearray)):
            raise ValueError(entries)
        if isinstance(entries, str):
            entries = [part for part in re.split(r"[\s,]+", entries) if part]
        networks: list[IPNetwork] = []
        for entry in entries:
            network = unmapped_network(_parse_network(entry))
            if network not in networks:
                networks.append(network)
        self.networks: tuple[IPNetwork, ...] = tuple(networks)
        """The trusted networks (a single address is a /32 or /128 network)."""

    def __contains__(self, peer: Any) -> bool:
        """Whether ``peer`` (an IP address, as text or ``ipaddress`` object; or a
        ``(host, port, ...)`` tuple as sockets give) is a trusted proxy. Anything that
        is no IP address (a Unix socket path, None) is not."""
        if isinstance(peer, tuple):
            peer = peer[0] if peer else None
        if isinstance(peer, str):
            peer = peer.split("%", 1)[0]  # a link-local peer's zone index
        elif not isinstance(peer, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        address = parse_address(peer)
        if address is None:
            return False
        return any(address in network for network in self.networks)

    def covers_everything(self) -> Optional[str]:
        """``'IPv4'`` or ``'IPv6'`` when the entries together cover every address of
        that family (``0.0.0.0/0``, ``::/0``, or networks that add up to it, such as
        ``0.0.0.0/1`` and ``128.0.0.0/1``), else None. Trusting every peer lets any
        of them forge its address, which is why the server refuses it unless told it
        is meant (see ``insecure_trust_any_proxy``)."""
        # One family at a time: collapse_addresses takes networks of one version.
        v4 = [n for n in self.networks if isinstance(n, ipaddress.IPv4Network)]
        if v4 and sum(n.num_addresses for n in ipaddress.collapse_addresses(v4)) == 1 << 32:
            return "IPv4"
        v6 = [n for n in self.networks if isinstance(n, ipaddress.IPv6Network)]
        if v6 and sum(n.num_addresses for n in ipaddress.collapse_addresses(v6)) == 1 << 128:
            return "IPv6"
        return None

    def __iter__(self) -> Iterator[str]:
        """The entries in canonical text, single addresses without their prefix."""
        for network in self.networks:
            full = network.prefixlen == network.max_prefixlen
            yield str(network.network_address) if full else str(network)

    def __len__(self) -> int:
        return len(self.networks)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, TrustedProxies):
            return self.networks == other.networks
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self)!r})"


def _parse_network(entry: Any) -> _Network:
    if isinstance(entry, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        entry = str(entry)
    if not isinstance(entry, str):
        raise ValueError(entry)
    text = entry.strip()
    if not text or "%" in text:
        raise ValueError(entry)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValueError(entry) from None
