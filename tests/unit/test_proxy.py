"""The PROXY protocol parser (asyncapy.domain.proxy) against HAProxy's specification,
fed whole and cut at every byte, and the trusted-proxy check.

The headers are built here by hand (struct and text), not with the parser's code;
tests/integration/test_real_parts.py checks the parser against headers a real HAProxy
sent.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain.proxy import (
    DEFAULT_MAX_LENGTH,
    NEED_DATA,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    TrustedProxies,
    crc32c,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # the specification's bytes


def v2(command: int = 1, family: int = 1, transport: int = 1, block: bytes = b"", tlvs: bytes = b"", version: int = 2) -> bytes:
    body = block + tlvs
    return SIG + bytes([version << 4 | command, family << 4 | transport]) + struct.pack(">H", len(body)) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack(">HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">H", len(value)) + value


def with_crc(header: bytes) -> bytes:
    """``header`` (whose last TLV is a zeroed CRC32C) with its checksum filled in."""
    return header[:-4] + struct.pack(">I", crc32c(header))


def parse(data: bytes, eof: bool = False, **kwargs):
    parser = ProxyParser(**kwargs)
    if data:  # b"" would say the peer closed
        parser.receive_data(data)
    if eof:
        parser.receive_data(b"")
    return parser.next_event()


def parse_in_pieces(data: bytes, cuts, eof: bool = False):
    """Feed ``data`` cut at ``cuts``, asking for an event after each piece (as a server
    would), and stop at the first final one."""
    parser = ProxyParser()
    start = 0
    for end in [min(cut, len(data)) for cut in cuts] + [len(data)]:
        if end > start:
            parser.receive_data(data[start:end])
            event = parser.next_event()
            if event is not NEED_DATA:
                return event._replace(leftover=event.leftover + data[end:]) if type(event) is ProxyHeader else event
        start = max(start, end)
    if eof:
        parser.receive_data(b"")
    return parser.next_event()


def header(data: bytes) -> ProxyHeader:
    event = parse(data)
    assert type(event) is ProxyHeader, event
    return event


def error(data: bytes, eof: bool = False) -> str:
    event = parse(data, eof)
    assert type(event) is ProxyError, event
    return event.reason


# -- version 1 -----------------------------------------------------------------------------------
def test_v1_tcp4_names_the_client_and_keeps_the_stream():
    event = header(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n\x00\x00\x00\x10\x16\x00{}")
    assert event == ProxyHeader(1, "INET", "192.168.0.1", 56324, "192.168.0.11", 443, False, b"\x00\x00\x00\x10\x16\x00{}")
    assert event.client(("10.0.0.9", 4000)) == ("192.168.0.1", 56324)


def test_v1_tcp6_in_every_legal_spelling_is_canonical():
    event = header(b"PROXY TCP6 2001:DB8::0:1 ::1 1 65535\r\n")
    assert (event.family, event.source, event.destination) == ("INET6", "2001:db8::1", "::1")
    full = "ffff:" * 7 + "ffff"
    assert header(f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()).source == full
    assert header(b"PROXY TCP6 ::ffff:10.0.0.1 ::1 0 0\r\n").source == "::ffff:a00:1"


def test_v1_unknown_uses_the_real_peer_whatever_follows_it():
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n", b"PROXY UNKNOWN anything at all\r\n"):
        event = header(line + b"rest")
        assert (event.family, event.source, event.local, event.leftover) == ("UNKNOWN", None, False, b"rest")
        assert event.client(("10.0.0.9", 4000)) == ("10.0.0.9", 4000)


def test_v1_line_of_107_bytes_is_the_longest():
    full = "ffff:" * 7 + "ffff"
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == V1_MAX_LENGTH == 107
    assert header(worst).family == "UNKNOWN"
    longer = worst.replace(b"UNKNOWN ", b"UNKNOWN  ")
    assert f"first {V1_MAX_LENGTH} bytes" in error(longer)  # its CRLF ends at byte 108
    assert f"first {V1_MAX_LENGTH} bytes" in error(b"PROXY UNKNOWN " + b"x" * 93)  # 107, no CRLF
    assert parse(b"PROXY UNKNOWN " + b"x" * 92) is NEED_DATA  # 106: the CRLF may still come
    assert f"first {V1_MAX_LENGTH} bytes" in error(b"PROXY UNKNOWN " + b"x" * 92 + b"\r")


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx", "lone CR"),
        (b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "lone LF"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "fields"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
        (b"PROXY \r\n", "protocol"),
        (b"PROXY UNKNOWNX\r\n", "protocol"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "IPv6"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "US-ASCII"),
        (b"PROXY TCP4 1.2.3.\xd9\xa1 5.6.7.8 1 2\r\n", "US-ASCII"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "does not start with a PROXY header"),
        (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "does not start with a PROXY header"),
    ],
)
def test_v1_refuses_what_does_not_match_exactly(line, reason):
    assert reason in error(line)


# -- version 2 -----------------------------------------------------------------------------------
def test_v2_signature_is_the_specifications():
    assert V2_SIGNATURE == SIG


def test_v2_tcp_over_ipv4_and_ipv6():
    event = header(v2(block=inet("127.0.0.2", "127.0.0.1", 50000, 8081)) + b"stream")
    assert event == ProxyHeader(2, "INET", "127.0.0.2", 50000, "127.0.0.1", 8081, False, b"stream")
    event = header(v2(family=2, block=inet("2001:db8::7", "::1", 1, 2)))
    assert (event.family, event.source, event.source_port, event.destination) == ("INET6", "2001:db8::7", 1, "::1")
    assert event.client(("10.0.0.9", 4000)) == ("2001:db8::7", 1)


def test_v2_udp_is_read_the_same_way():
    assert header(v2(transport=2, block=inet("10.1.1.1", "10.2.2.2", 3, 4))).source == "10.1.1.1"


def test_v2_local_ignores_family_and_addresses_whatever_they_say():
    for family in (0, 1, 2, 3, 0xF):
        event = header(v2(command=0, family=family, transport=0xF, block=b"\xff" * 20) + b"x")
        assert (event.family, event.local, event.source, event.leftover) == ("UNKNOWN", True, None, b"x")
        assert event.client(("10.0.0.9", 4000)) == ("10.0.0.9", 4000)


def test_v2_unspec_family_or_transport_falls_back_to_the_real_peer():
    for family, transport in ((0, 0), (0, 1), (1, 0), (2, 0), (3, 0)):
        event = header(v2(family=family, transport=transport, block=b"\x01" * 7))
        assert (event.family, event.local) == ("UNKNOWN", False)


def test_v2_unix_gives_the_paths_but_the_real_peer_is_the_client():
    block = b"/run/client.sock".ljust(108, b"\x00") + b"\x00abstract".ljust(108, b"\x00")
    event = header(v2(family=3, block=block))
    assert (event.family, event.source, event.destination, event.source_port) == ("UNIX", "/run/client.sock", "@abstract", None)
    assert event.client(("10.0.0.9", 4000)) == ("10.0.0.9", 4000)


def test_v2_tlvs_are_skipped_and_must_fit():
    block = inet("1.2.3.4", "5.6.7.8", 1, 2)
    tlvs = tlv(0x01, b"h2") + tlv(0x04, b"") + tlv(0x05, b"u" * 128) + tlv(0x20, b"\x01\x00\x00\x00\x00")
    assert header(v2(block=block, tlvs=tlvs) + b"after").leftover == b"after"
    assert "cut short" in error(v2(block=block, tlvs=b"\x01\x00"))
    assert "runs past the header" in error(v2(block=block, tlvs=b"\x01\x00\x05abc"))
    # Extra address bytes of a longer block are no TLV framing: refused as such.
    assert "TLV" in error(v2(block=block + b"\x00"))


def test_v2_crc32c_is_verified():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value
    good = with_crc(v2(block=inet("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x01, b"x") + tlv(0x03, b"\x00" * 4)))
    assert header(good).source == "1.2.3.4"
    bad = good[:-1] + bytes([good[-1] ^ 1])
    assert "CRC32C" in error(bad)
    assert "CRC32C TLV of 3 bytes" in error(v2(block=inet("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x03, b"\x00" * 3)))


@pytest.mark.parametrize(
    "data, reason",
    [
        (v2(version=1, block=inet("1.2.3.4", "5.6.7.8", 1, 2)), "version 1"),
        (v2(version=3), "version 3"),
        (v2(command=2), "command 2"),
        (v2(command=0xF), "command 15"),
        (v2(family=4, block=b"\x00" * 12), "address family 4"),
        (v2(transport=3, block=b"\x00" * 12), "transport protocol 3"),
        (v2(family=1, block=b"\x00" * 11), "INET address block of 11 bytes (12 needed)"),
        (v2(family=2, block=b"\x00" * 12), "INET6 address block of 12 bytes (36 needed)"),
        (v2(family=3, block=b"\x00" * 215), "UNIX address block of 215 bytes (216 needed)"),
        (SIG[:11] + b"X" + b"\x21\x11\x00\x00", "does not start with a PROXY header"),
        (b"\x00\x00\x00\x10\x16\x00{}", "does not start with a PROXY header"),  # AsyncAProto itself
        (b"\x16\x03\x01\x02\x00\x01", "does not start with a PROXY header"),  # a TLS ClientHello
        (b"GET / HTTP/1.1\r\n", "does not start with a PROXY header"),
    ],
)
def test_v2_refuses_unassigned_values(data, reason):
    assert reason in error(data)


def test_an_oversized_v2_header_is_refused_from_its_length_alone():
    fixed = SIG + b"\x21\x11" + struct.pack(">H", DEFAULT_MAX_LENGTH - 16 + 1)
    assert f"{DEFAULT_MAX_LENGTH + 1} bytes (at most {DEFAULT_MAX_LENGTH})" in error(fixed)
    largest = v2(block=inet("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x04, b"\x00" * (DEFAULT_MAX_LENGTH - 16 - 12 - 3)))
    assert len(largest) == DEFAULT_MAX_LENGTH and header(largest).source == "1.2.3.4"
    small = ProxyParser(max_length=200)
    small.receive_data(largest[:16])
    assert "at most 200" in small.next_event().reason
    with pytest.raises(ValueError, match="at least 107"):
        ProxyParser(max_length=100)


# -- the parser's life cycle ---------------------------------------------------------------------
def test_a_header_cut_by_the_peer_closing_is_an_error():
    assert parse(b"PROXY TCP4 1.2.3.4") is NEED_DATA
    assert "closed the connection after 18 bytes" in error(b"PROXY TCP4 1.2.3.4", eof=True)
    assert "after 0 bytes" in error(b"", eof=True)
    assert "after 20 bytes" in error(v2(block=inet("1.2.3.4", "5.6.7.8", 1, 2))[:20], eof=True)


def test_events_are_final_and_the_stream_goes_elsewhere():
    parser = ProxyParser()
    parser.receive_data(b"PROXY UNKNOWN\r\nab")
    event = parser.next_event()
    assert parser.next_event() is event
    with pytest.raises(RuntimeError, match="Connection"):
        parser.receive_data(b"c")
    failed = ProxyParser()
    failed.receive_data(b"HELLO")
    assert failed.next_event() is failed.next_event()
    closed = ProxyParser()
    closed.receive_data(b"")
    with pytest.raises(RuntimeError, match="end of the stream"):
        closed.receive_data(b"x")


# -- every split parses the same -----------------------------------------------------------------
SAMPLES = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET",
    b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n",
    b"PROXY UNKNOWN\r\n\x00\x00\x00\x10",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PROXY UNKNOWN " + b"x" * 100,
    b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",  # CR at byte 107, LF at 108 (fuzz findings)
    b"PROXY UNKNOWN " + b"x" * 92 + b"\rx",
    b"PROXY UNKNOWN " + b"x" * 92 + b"\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    v2(block=inet("127.0.0.2", "127.0.0.1", 50000, 8081)) + b"\x00\x00\x00\x10\x16\x00{}",
    v2(family=2, block=inet("::1", "::2", 1, 2), tlvs=tlv(0x05, b"id")),
    with_crc(v2(block=inet("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x03, b"\x00" * 4))),
    v2(command=0, family=0, transport=0) + b"x",
    v2(family=3, block=b"/s".ljust(216, b"\x00")),
    v2(version=1),
    v2(family=1, block=b"\x00" * 11),
    SIG + b"\x21\x11\xff\xff" + b"\x00" * 40,
    SIG[:7] + b"X",
    b"\x00\x00\x00\x10\x16\x00{}",
]


@pytest.mark.parametrize("data", SAMPLES, ids=range(len(SAMPLES)))
def test_every_cut_and_byte_by_byte_parse_as_the_whole(data):
    whole = parse(data)
    assert parse_in_pieces(data, range(1, len(data))) == whole
    for cut in range(len(data) + 1):
        assert parse_in_pieces(data, [cut]) == whole, cut
        for second in range(cut, min(len(data), cut + 24) + 1):
            assert parse_in_pieces(data, [cut, second]) == whole, (cut, second)


addresses_v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
addresses_v6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
ports = st.integers(0, 65535)


@st.composite
def valid_headers(draw):
    """(bytes of a random valid header + stream, the header it must parse as)."""
    version = draw(st.sampled_from((1, 2)))
    family = draw(st.sampled_from(("INET", "INET6")))
    source, destination = draw(st.tuples(*(2 * [addresses_v4 if family == "INET" else addresses_v6])))
    sport, dport = draw(ports), draw(ports)
    stream = draw(st.binary(max_size=40))
    if version == 1:
        protocol = "TCP4" if family == "INET" else "TCP6"
        data = f"PROXY {protocol} {source} {destination} {sport} {dport}\r\n".encode()
    else:
        tlvs = b"".join(tlv(kind, value) for kind, value in draw(st.lists(st.tuples(st.integers(0, 255).filter(lambda k: k != 3), st.binary(max_size=30)), max_size=4)))
        data = v2(family=1 if family == "INET" else 2, block=inet(source, destination, sport, dport), tlvs=tlvs)
    return data + stream, ProxyHeader(version, family, source, sport, destination, dport, False, stream)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_headers(), st.lists(st.integers(0, 400), max_size=8))
def test_random_valid_headers_parse_to_what_they_carry_at_any_split(case, cuts):
    data, expected = case
    assert parse(data) == expected
    assert parse_in_pieces(data, sorted(cuts)) == expected


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", SIG, SIG + b"\x21", SIG + b"\x21\x11", SIG + b"\x20\x00"]),
    st.binary(max_size=160),
    st.lists(st.integers(0, 200), max_size=6),
    st.booleans(),
)
def test_any_bytes_give_one_outcome_at_any_split(prefix, tail, cuts, eof):
    data = prefix + tail
    whole = parse(data, eof)
    assert parse_in_pieces(data, sorted(cuts), eof) == whole
    assert whole is NEED_DATA or type(whole) in (ProxyHeader, ProxyError)
    if type(whole) is ProxyHeader:  # what follows the header is returned untouched
        assert data.endswith(whole.leftover)


# -- trusted proxies -----------------------------------------------------------------------------
def test_trusted_addresses_and_networks_of_both_families():
    trusted = TrustedProxies(["10.0.0.5", "192.168.0.0/16", "::1", "fd00::/8"])
    for peer in ("10.0.0.5", "192.168.200.1", "::1", "fd12::3", ("10.0.0.5", 4000), ("::1", 4000, 0, 0)):
        assert peer in trusted, peer
    for peer in ("10.0.0.6", "192.169.0.1", "::2", "fe00::1", "", None, "/run/a.sock", ("",), (), 167772165, b"10.0.0.5"):
        assert peer not in trusted, peer
    assert ipaddress.ip_address("10.0.0.5") in trusted
    assert list(trusted) == ["10.0.0.5", "192.168.0.0/16", "::1", "fd00::/8"]
    assert len(trusted) == 4 and trusted == TrustedProxies("10.0.0.5 192.168.0.0/16,::1, fd00::/8")
    assert repr(trusted) == "TrustedProxies(['10.0.0.5', '192.168.0.0/16', '::1', 'fd00::/8'])"


def test_ipv4_mapped_ipv6_matches_both_ways():
    trusted = TrustedProxies("10.0.0.0/8")
    assert "::ffff:10.1.2.3" in trusted and "::ffff:11.1.2.3" not in trusted
    mapped = TrustedProxies("::ffff:172.16.0.0/108, ::ffff:127.0.0.1")
    assert list(mapped) == ["172.16.0.0/12", "127.0.0.1"]
    assert "172.16.9.9" in mapped and "::ffff:172.31.0.1" in mapped and "127.0.0.1" in mapped
    assert "172.32.0.1" not in mapped


def test_a_link_local_peer_with_a_zone_index_matches_its_network():
    assert "fe80::1%eth0" in TrustedProxies("fe80::/10")


@pytest.mark.parametrize(
    "entry", ["10.0.0.5/8", "10.0.0.256", "proxy.example", "10.0.0.0/33", "", "fe80::1%eth0", None, 10, b"10.0.0.5"]
)
def test_a_bad_entry_is_refused_by_name(entry):
    with pytest.raises(ValueError) as caught:
        TrustedProxies([entry])
    assert caught.value.args == (entry,)


def test_duplicates_collapse_and_nothing_trusts_nobody():
    assert list(TrustedProxies(["10.0.0.1", "10.0.0.1/32", "::ffff:10.0.0.1"])) == ["10.0.0.1"]
    empty = TrustedProxies()
    assert len(empty) == 0 and "127.0.0.1" not in empty and list(TrustedProxies(" , ")) == []


# -- trusting everyone, and headers without a client ----------------------------------------
@pytest.mark.parametrize(
    ("entries", "covered"),
    [
        ("0.0.0.0/0", "IPv4"),
        ("::/0", "IPv6"),
        ("::ffff:0:0/96", "IPv4"),
        ("0.0.0.0/1, 128.0.0.0/1", "IPv4"),
        ("10.0.0.0/8, 0.0.0.0/0", "IPv4"),
        ("0.0.0.0/1, 10.0.0.0/8", None),
        ("10.0.0.5, fd00::/8", None),
        ("", None),
    ],
)
def test_covers_everything_names_the_family_every_address_of_which_is_trusted(entries, covered):
    assert TrustedProxies(entries).covers_everything() == covered


def test_only_inet_headers_name_a_client():
    from asyncapy.domain.addresses import parse_address, session_group
    from asyncapy.domain.proxy import UNKNOWN_CLIENT

    assert header(b"PROXY TCP4 198.51.100.1 192.0.2.1 5000 80\r\n").has_client
    assert not header(b"PROXY UNKNOWN\r\n").has_client
    # What the server names such a session: no address, one group of its own.
    assert parse_address(UNKNOWN_CLIENT) is None and session_group(UNKNOWN_CLIENT) == UNKNOWN_CLIENT
