"""The PROXY header target of the fuzz campaign: ``python -m fuzz --target proxy``.

An input is one config byte followed by the first bytes of a connection (see
:func:`config_of`). They go through :class:`asyncapy.domain.proxy.ProxyParser` whole
and cut into pieces, and the event is held to these properties:

``proxy-escape``
    Feeding bytes and asking for the event raises nothing.
``proxy-outcome``
    The event is a ``ProxyHeader``, a ``ProxyError`` or ``NEED_DATA``; never
    ``NEED_DATA`` once the peer closed.
``proxy-split``
    The event does not depend on how the bytes were cut into reads.
``proxy-bounded``
    The parser never waits for more than it may hold: ``NEED_DATA`` only while fewer
    bytes than the longest header it accepts came (107 for a v1 line, which starts
    with ``P``; ``max_length`` for v2).
``proxy-leftover``
    A header's ``leftover`` is exactly the bytes after it: the header is a v1 line
    ending in CRLF within 107 bytes, or a v2 header of 16 bytes plus its length field,
    within ``max_length``.
``proxy-model``
    A header naming an IPv4 or IPv6 client names the addresses and ports its bytes
    carry (read here from the specification's layout, not with the parser's code), and
    written again by this module's own encoder it parses to the same fields.

Seeds are valid headers of every kind (v1 TCP4/TCP6/UNKNOWN, v2 PROXY and LOCAL over
every family, with TLVs and a CRC32C), near misses, and each followed by AsyncAProto
bytes; the campaign's mutations (bit flips, splices of other seeds, interesting
lengths) do the rest.
"""

from __future__ import annotations

import ipaddress
import random
import re
import struct
import zlib
from typing import Any, NamedTuple, Optional

from asyncapy.domain.proxy import (
    NEED_DATA,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    crc32c,
)

from . import oracle
from .campaign import Campaign, Summary, _where

__all__ = ["Config", "config_of", "config_byte", "check", "corpus", "encode_v1", "encode_v2", "ProxyCampaign"]

MAX_LENGTHS = (4096, V1_MAX_LENGTH, 232, 65535 + 16)
"""The parser's ``max_length`` choices: the default, the least, an AF_UNIX header
exactly, and the largest a v2 length field can say."""

SPLITS = ("random", "bytewise", "whole", "random")


class Config(NamedTuple):
    """How one input is run, decoded from its first byte."""

    split: str
    eof: bool
    """Whether the peer closes after the bytes."""
    max_length: int


def config_of(byte: int) -> Config:
    """The :class:`Config` that the config byte ``byte`` selects."""
    return Config(SPLITS[byte & 3], bool(byte & 4), MAX_LENGTHS[(byte >> 3) & 3])


def config_byte(split_index: int = 0, eof: bool = False, max_length_index: int = 0) -> int:
    """The config byte selecting these choices (the inverse of :func:`config_of`)."""
    return split_index | (4 if eof else 0) | (max_length_index << 3)


# -- an encoder of our own, from the specification -----------------------------------------------
def encode_v1(family: str, source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    """A v1 line: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n``."""
    protocol = {"INET": "TCP4", "INET6": "TCP6"}[family]
    return f"PROXY {protocol} {source} {destination} {source_port} {destination_port}\r\n".encode()


def encode_v2(
    family: str = "INET",
    source: str = "127.0.0.2",
    destination: str = "127.0.0.1",
    source_port: int = 1,
    destination_port: int = 2,
    tlvs: bytes = b"",
    command: int = 1,
    family_byte: Optional[int] = None,
) -> bytes:
    """A v2 header; ``family_byte`` overrides the family/transport byte."""
    if family in ("INET", "INET6"):
        block = (
            ipaddress.ip_address(source).packed
            + ipaddress.ip_address(destination).packed
            + struct.pack(">HH", source_port, destination_port)
        )
        fam = 0x11 if family == "INET" else 0x21
    elif family == "UNIX":
        block = source.encode().ljust(108, b"\x00") + destination.encode().ljust(108, b"\x00")
        fam = 0x31
    else:
        block, fam = b"", 0x00
    if family_byte is not None:
        fam = family_byte
    body = block + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack(">H", len(body)) + body


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">H", len(value)) + value


def _with_crc(header: bytes) -> bytes:
    return header[:-4] + struct.pack(">I", crc32c(header))


# -- the seeds -----------------------------------------------------------------------------------
def corpus() -> list[bytes]:
    """Every seed: a config byte, then the first bytes of a connection."""
    packet = b"\x00\x00\x00\x10\x16\x00" + b'{"foo": "bar"}'
    full6 = "ffff:" * 7 + "ffff"
    headers = [
        encode_v1("INET", "192.168.0.1", "192.168.0.11", 56324, 443),
        encode_v1("INET", "255.255.255.255", "0.0.0.0", 65535, 0),
        encode_v1("INET6", "2001:db8::1", "::1", 1, 65535),
        encode_v1("INET6", full6, full6, 65535, 65535),
        encode_v1("INET6", "::ffff:10.0.0.1", "::1", 5, 6),
        b"PROXY UNKNOWN\r\n",
        f"PROXY UNKNOWN {full6} {full6} 65535 65535\r\n".encode(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY UNKNOWN " + b"x" * 100,
        encode_v2("INET", "127.0.0.2", "127.0.0.1", 50000, 8081),
        encode_v2("INET6", "2001:db8::7", "::1", 1, 2),
        encode_v2("INET", family_byte=0x12),
        encode_v2("INET6", "::2", "::3", family_byte=0x22),
        encode_v2("UNIX", "/run/a.sock", "\x00abstract"),
        encode_v2("UNSPEC"),
        encode_v2("UNSPEC", command=0),
        encode_v2("INET", command=0),
        encode_v2("INET", tlvs=_tlv(0x01, b"h2") + _tlv(0x02, b"api.example") + _tlv(0x05, b"u" * 128)),
        encode_v2("INET", tlvs=_tlv(0x20, b"\x01\x00\x00\x00\x00" + _tlv(0x21, b"TLSv1.3"))),
        _with_crc(encode_v2("INET", tlvs=_tlv(0x04, b"pad") + _tlv(0x03, b"\x00" * 4))),
        encode_v2("INET", tlvs=_tlv(0x03, b"\x00" * 4)),  # a wrong checksum
        encode_v2("INET", tlvs=b"\x01\x00"),
        encode_v2("INET", family_byte=0x41),
        encode_v2("INET", family_byte=0x13),
        encode_v2("INET", command=2),
        V2_SIGNATURE + b"\x21\x11\xff\xff",
        V2_SIGNATURE + b"\x21\x11\x0f\xe0",
        V2_SIGNATURE[:7],
        packet,
        b"GET / HTTP/1.1\r\n",
    ]
    seeds: list[bytes] = []
    for n, header in enumerate(headers):
        for after in (b"", packet):
            seeds.append(bytes([config_byte(n % 4, False, n % 3)]) + header + after)
        for split in range(4):
            seeds.append(bytes([config_byte(split, True, 0)]) + header)
        seeds.append(bytes([config_byte(1, True, 0)]) + header[: len(header) // 2])
    return seeds


# -- the properties ------------------------------------------------------------------------------
class ProxyOutcome(NamedTuple):
    """What an input did: its behaviour, and whether it parsed to a header."""

    signature: tuple
    header: bool


def _event(stream: bytes, cuts: list, eof: bool, max_length: int) -> Any:
    parser = ProxyParser(max_length)
    start = 0
    for end in cuts + [len(stream)]:
        if end > start:
            parser.receive_data(stream[start:end])
            event = parser.next_event()
            if event is not NEED_DATA:
                if type(event) is ProxyHeader:  # the rest would go to the Connection
                    event = event._replace(leftover=event.leftover + stream[end:])
                return event
            start = end
    if eof:
        parser.receive_data(b"")
    return parser.next_event()


def _cuts(length: int, config: Config, rng: random.Random) -> list:
    if config.split == "whole" or length < 2:
        return []
    if config.split == "bytewise" and length <= 8192:
        return list(range(1, length))
    return sorted(rng.sample(range(1, length), min(12, length - 1)))


def check(data: bytes, seen: Any = None) -> ProxyOutcome:
    """Run one input; raise :class:`fuzz.oracle.Finding` if a property breaks."""
    config = config_of(data[0] if data else 0)
    stream = data[1:]
    try:
        whole = _event(stream, [], config.eof, config.max_length)
        pieces = _event(stream, _cuts(len(stream), config, random.Random(zlib.crc32(data))), config.eof, config.max_length)
    except Exception as exc:
        raise oracle.Finding("proxy-escape", f"{type(exc).__name__}: {exc}") from exc
    if whole != pieces:
        raise oracle.Finding("proxy-split", f"whole: {whole!r}; in pieces: {pieces!r}")
    if whole is NEED_DATA:
        if config.eof:
            raise oracle.Finding("proxy-outcome", "NEED_DATA after the peer closed")
        if len(stream) >= (V1_MAX_LENGTH if stream[:1] == b"P" else config.max_length):
            raise oracle.Finding("proxy-bounded", f"NEED_DATA after {len(stream)} bytes")
        return ProxyOutcome(("need", config.eof), False)
    if type(whole) is ProxyError:
        reason = re.sub(r"'.*'|\".*\"|\(.*\)|\d+", "#", whole.reason)  # the kind, not the values
        return ProxyOutcome(("error", reason), False)
    if type(whole) is not ProxyHeader:
        raise oracle.Finding("proxy-outcome", f"event {whole!r}")
    _check_header(stream, whole, config)
    return ProxyOutcome(("header", whole.version, whole.family, whole.local), True)


def _check_header(stream: bytes, header: ProxyHeader, config: Config) -> None:
    if not stream.endswith(header.leftover):
        raise oracle.Finding("proxy-leftover", "the leftover is not what followed the header")
    used = len(stream) - len(header.leftover)
    if header.version == 1:
        good = stream.startswith(b"PROXY ") and used <= V1_MAX_LENGTH and stream[used - 2 : used] == b"\r\n"
        good = good and b"\r\n" not in stream[: used - 2]
    else:
        length = 16 + int.from_bytes(stream[14:16], "big")
        good = stream.startswith(V2_SIGNATURE) and used == length <= config.max_length
    if not good:
        raise oracle.Finding("proxy-leftover", f"v{header.version} header of {used} bytes from {stream[:used]!r}")
    if header.family in ("INET", "INET6"):
        carried = _carried(stream[:used], header)
        got = (ipaddress.ip_address(header.source), ipaddress.ip_address(header.destination))
        got += (header.source_port, header.destination_port)
        if carried != got:
            raise oracle.Finding("proxy-model", f"{header!r} from {stream[:used]!r}, which carries {carried}")
        args = (header.family, header.source, header.destination, header.source_port, header.destination_port)
        again = encode_v1(*args) if header.version == 1 else encode_v2(*args)
        reparsed = _event(again, [], True, config.max_length)
        if type(reparsed) is not ProxyHeader or reparsed._replace(leftover=b"") != header._replace(leftover=b""):
            raise oracle.Finding("proxy-model", f"{header!r} written again parses as {reparsed!r}")


def _carried(raw: bytes, header: ProxyHeader) -> tuple:
    """(source, destination, source port, destination port) as the header's bytes
    carry them, read here straight from the layout the specification gives."""
    if header.version == 1:
        fields = raw[:-2].decode("ascii").split(" ")
        return (ipaddress.ip_address(fields[2]), ipaddress.ip_address(fields[3]), int(fields[4]), int(fields[5]))
    size = 4 if raw[13] >> 4 == 1 else 16
    source, destination = ipaddress.ip_address(raw[16 : 16 + size]), ipaddress.ip_address(raw[16 + size : 16 + 2 * size])
    ports = struct.unpack(">HH", raw[16 + 2 * size : 20 + 2 * size])
    return (source, destination, *ports)


# -- the campaign over this target ---------------------------------------------------------------
class ProxySummary(Summary):
    """A :class:`fuzz.campaign.Summary` whose report counts headers, not requests."""

    def report(self) -> str:
        lines = super().report().splitlines()
        lines[0] = lines[0].replace("fuzz:", "fuzz (PROXY headers):", 1)
        lines[2] = f"  {self.requests} inputs parsed to a header"
        lines = [line.replace("python -m fuzz --replay", "python -m fuzz --target proxy --replay") for line in lines]
        return "\n".join(line for n, line in enumerate(lines) if n != 3)  # no error replies here


class ProxyCampaign(Campaign):
    """The campaign engine (mutations, corpus, findings) over :func:`check`."""

    def __init__(self, seed: int = 1, findings_dir: Optional[str] = None) -> None:
        super().__init__(seed, findings_dir)
        self.seeds = corpus()
        self.corpus = list(self.seeds)
        self.summary = ProxySummary()
        self.summary.seed = seed

    def one(self, data: bytes) -> None:
        """Run one input, recording its behaviour or its finding."""
        summary = self.summary
        summary.runs += 1
        try:
            outcome = check(data)
        except oracle.Finding as finding:
            cause = finding.__cause__
            where = _where(cause) if cause is not None else ""
            self._record((finding.check, finding.message[:60], where), str(finding), data, finding)
            return
        except Exception as exc:  # an escape from this module's own checks
            self._record(("escape", type(exc).__name__, _where(exc)), f"[escape] {type(exc).__name__}: {exc}", data, exc)
            return
        summary.requests += outcome.header
        if outcome.signature not in self.behaviours:
            self.behaviours.add(outcome.signature)
            if len(self.corpus) < 20_000 and len(data) <= 16 * 1024:
                self.corpus.append(data)

