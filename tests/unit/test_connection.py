"""Connection: every protocol error of protocol.md and the encoding rules, from plain bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain.codecs import JSON, ZIPROTO
from asyncapy.domain.connection import NEED_DATA, Connection, ProtocolError, Request, error_payload
from asyncapy.domain.errors import (
    ALL_CODES,
    ERR_HEADER_INVALID,
    ERR_INTERNAL,
    ERR_PACKET_TOO_LARGE,
    ERR_REQUEST_MALFORMED,
)

JSON_FOO = b'{"foo": "bar"}'
ZIPROTO_FOO = b"\x81\xa3foo\xa3bar"


def packet(payload: bytes, encoding: int, version: int = 22, header_size: int = 4, byteorder: str = "big") -> bytes:
    """One packet's bytes, built by hand."""
    return (len(payload) + 2).to_bytes(header_size, byteorder) + bytes([version, encoding]) + payload


def events_of(connection: Connection, data: bytes) -> list:
    connection.receive_data(data)
    events = []
    while (event := connection.next_event()) is not NEED_DATA:
        events.append(event)
        if type(event) is ProtocolError and event.close:
            break
    return events


def only_event(connection: Connection, data: bytes):
    (event,) = events_of(connection, data)
    return event


# -- valid packets --------------------------------------------------------------------
def test_protocol_md_examples_decode():
    connection = Connection()
    assert events_of(connection, packet(JSON_FOO, 0)) == [Request({"foo": "bar"}, JSON)]
    assert events_of(Connection(), packet(ZIPROTO_FOO, 1)) == [Request({"foo": "bar"}, ZIPROTO)]


@pytest.mark.parametrize("header_size", [2, 4, 8])
@pytest.mark.parametrize("byteorder", ["big", "little"])
def test_every_layout_one_byte_at_a_time(header_size, byteorder):
    connection = Connection(header_size, byteorder)
    data = packet(JSON_FOO, 0, 22, header_size, byteorder) + packet(ZIPROTO_FOO, 1, 22, header_size, byteorder)
    events = []
    for byte in data:
        events += events_of(connection, bytes([byte]))
    assert events == [Request({"foo": "bar"}, JSON), Request({"foo": "bar"}, JSON)]


def test_nothing_before_a_packet_is_complete():
    connection = Connection()
    assert events_of(connection, packet(JSON_FOO, 0)[:-1]) == []
    assert connection.codec is None


# -- ProtocolError rows ---------------------------------------------------------------
@pytest.mark.parametrize("version", [0, 1, 21, 23, 255])
@pytest.mark.parametrize("encoding,codec", [(0, JSON), (1, ZIPROTO)])
def test_wrong_version_is_header_invalid_in_the_declared_encoding(version, encoding, codec):
    connection = Connection()
    error = only_event(connection, packet(JSON_FOO if encoding == 0 else ZIPROTO_FOO, encoding, version))
    assert (error.code, error.codec, error.close) == (ERR_HEADER_INVALID, codec, False)


@pytest.mark.parametrize("encoding", [2, 3, 22, 128, 255])
def test_unknown_encoding_is_header_invalid(encoding):
    connection = Connection()
    error = only_event(connection, packet(JSON_FOO, encoding))
    assert (error.code, error.codec, error.close) == (ERR_HEADER_INVALID, JSON, False)


def test_unknown_encoding_and_version_is_header_invalid():
    error = only_event(Connection(), packet(JSON_FOO, 9, 9))
    assert (error.code, error.close) == (ERR_HEADER_INVALID, False)


@pytest.mark.parametrize("encoding,codec", [(0, JSON), (1, ZIPROTO)])
def test_empty_payload_is_malformed_and_not_closing(encoding, codec):
    connection = Connection()
    error = only_event(connection, packet(b"", encoding))
    assert (error.code, error.codec, error.close) == (ERR_REQUEST_MALFORMED, codec, False)


@pytest.mark.parametrize(
    "payload,encoding,codec",
    [
        (b"[1, 2]", 0, JSON),
        (b'"foo"', 0, JSON),
        (b"null", 0, JSON),
        (b"{", 0, JSON),
        (b'{"a": "\xff"}', 0, JSON),
        (ZIPROTO_FOO, 0, JSON),  # ZiProto bytes declared as JSON
        (b"\x92\x01\x02", 1, ZIPROTO),
        (b"\xc0", 1, ZIPROTO),
        (b"\x81\xa3foo", 1, ZIPROTO),
        (b"\x81\xa1a\xc1", 1, ZIPROTO),
        (b"\x81\xa1a\xd6\xff\x00\x00\x00\x00", 1, ZIPROTO),
        (JSON_FOO, 1, ZIPROTO),  # JSON bytes declared as ZiProto
    ],
)
def test_undecodable_or_non_map_payload_is_malformed_and_not_closing(payload, encoding, codec):
    connection = Connection()
    error = only_event(connection, packet(payload, encoding))
    assert (error.code, error.codec, error.close) == (ERR_REQUEST_MALFORMED, codec, False)
    assert error.detail  # something for the log


@pytest.mark.parametrize("content_length", [0, 1])
def test_content_length_below_two_is_malformed_and_closing(content_length):
    connection = Connection()
    error = only_event(connection, content_length.to_bytes(4, "big") + b"\x16\x00{}")
    assert (error.code, error.codec, error.close) == (ERR_REQUEST_MALFORMED, JSON, True)
    assert connection.next_event() == error  # the stream stays unframeable


def test_too_large_is_packet_too_large_and_closing_from_the_header_alone():
    connection = Connection(max_packet_size=1024)
    error = only_event(connection, (1025).to_bytes(4, "big"))
    assert (error.code, error.codec, error.close) == (ERR_PACKET_TOO_LARGE, JSON, True)
    assert connection.next_event() == error


def test_session_continues_after_every_non_closing_error():
    connection = Connection()
    data = (
        packet(JSON_FOO, 0, version=21)
        + packet(JSON_FOO, 7)
        + packet(b"", 0)
        + packet(b"[]", 0)
        + packet(b"\xc1", 1)
        + packet(JSON_FOO, 0)
    )
    events = events_of(connection, data)
    assert [type(e).__name__ for e in events] == ["ProtocolError"] * 5 + ["Request"]
    assert not any(e.close for e in events[:5])
    assert events[-1] == Request({"foo": "bar"}, JSON)


def test_closing_error_after_good_packets_in_one_read():
    connection = Connection(max_packet_size=100)
    events = events_of(connection, packet(JSON_FOO, 0) + (101).to_bytes(4, "big") + b"\x16\x00")
    assert events[0] == Request({"foo": "bar"}, JSON)
    assert (events[1].code, events[1].codec, events[1].close) == (ERR_PACKET_TOO_LARGE, JSON, True)


# -- which codec an error reply is written in -----------------------------------------
def test_error_codec_is_the_declared_one_even_against_the_session():
    connection = Connection()
    events_of(connection, packet(JSON_FOO, 0))
    assert connection.codec is JSON
    assert only_event(connection, packet(b"\xc1", 1)).codec is ZIPROTO
    assert only_event(connection, packet(b"", 1)).codec is ZIPROTO
    assert only_event(connection, packet(ZIPROTO_FOO, 1, version=1)).codec is ZIPROTO


def test_error_codec_is_the_sessions_when_the_declared_one_is_invalid():
    connection = Connection()
    events_of(connection, packet(ZIPROTO_FOO, 1))
    assert connection.codec is ZIPROTO
    assert only_event(connection, packet(JSON_FOO, 2)).codec is ZIPROTO


@pytest.mark.parametrize("session_first", [False, True])
def test_framing_error_codec_is_the_sessions_else_the_default(session_first):
    connection = Connection(max_packet_size=100, default_codec=JSON)
    if session_first:
        events_of(connection, packet(ZIPROTO_FOO, 1))
    error = only_event(connection, (101).to_bytes(4, "big"))
    assert error.codec is (ZIPROTO if session_first else JSON)


@pytest.mark.parametrize("default", [JSON, ZIPROTO])
def test_error_codec_falls_back_to_the_default_codec(default):
    connection = Connection(default_codec=default)
    assert only_event(connection, packet(JSON_FOO, 200)).codec is default
    assert only_event(connection, packet(JSON_FOO, 200, version=0)).codec is default
    assert Connection(default_codec=default).error_bytes(ERR_INTERNAL)[5] == default.code
    closing = only_event(connection, b"\x00\x00\x00\x01")
    assert closing.codec is default


# -- the session's sticky encoding ----------------------------------------------------
def test_first_valid_packet_fixes_the_session_encoding():
    connection = Connection()
    assert connection.codec is None
    events = events_of(connection, packet(ZIPROTO_FOO, 1) + packet(JSON_FOO, 0) + packet(ZIPROTO_FOO, 1))
    assert events == [Request({"foo": "bar"}, ZIPROTO)] * 3
    assert connection.codec is ZIPROTO


def test_other_encoding_is_decoded_by_its_own_header_but_handed_over_in_the_sessions():
    connection = Connection()
    events_of(connection, packet(JSON_FOO, 0))
    request = only_event(connection, packet(b"\x81\xa1n\xcd\x01\x00", 1))  # {"n": 256} in ZiProto
    assert request == Request({"n": 256}, JSON)
    # In the session's own encoding those bytes would not even decode.
    assert only_event(connection, packet(b"\x81\xa1n\xcd\x01\x00", 0)).code == ERR_REQUEST_MALFORMED


def test_errors_do_not_fix_the_session_encoding():
    connection = Connection()
    events_of(connection, packet(b"\xc1", 1) + packet(b"", 1) + packet(ZIPROTO_FOO, 1, version=3))
    assert connection.codec is None
    assert events_of(connection, packet(JSON_FOO, 0)) == [Request({"foo": "bar"}, JSON)]
    assert connection.codec is JSON


# -- bytes out ------------------------------------------------------------------------
JSON_HEADER_INVALID = b'\x00\x00\x00\x36\x16\x00{"status": "failure", "error": "ERR_HEADER_INVALID"}'
ZIPROTO_HEADER_INVALID = (
    b"\x00\x00\x00\x2b\x16\x01\x82\xa6status\xa7failure\xa5error\xb2ERR_HEADER_INVALID"
)


def test_error_bytes_are_exact():
    connection = Connection()
    assert connection.error_bytes(ERR_HEADER_INVALID, JSON) == JSON_HEADER_INVALID
    assert connection.error_bytes(ERR_HEADER_INVALID, ZIPROTO) == ZIPROTO_HEADER_INVALID
    assert connection.error_bytes(ERR_HEADER_INVALID) == JSON_HEADER_INVALID  # default
    assert Connection(2, "little").error_bytes(ERR_INTERNAL, ZIPROTO) == (
        b"\x25\x00\x16\x01\x82\xa6status\xa7failure\xa5error\xacERR_INTERNAL"
    )


def test_error_bytes_default_to_the_session_codec():
    connection = Connection()
    events_of(connection, packet(ZIPROTO_FOO, 1))
    assert connection.error_bytes(ERR_HEADER_INVALID) == ZIPROTO_HEADER_INVALID
    assert connection.error_bytes(ERR_HEADER_INVALID, JSON) == JSON_HEADER_INVALID


def test_error_reply_of_a_protocol_error_is_what_its_codec_says():
    connection = Connection()
    error = only_event(connection, packet(ZIPROTO_FOO, 1, version=0))
    assert connection.error_bytes(error.code, error.codec) == ZIPROTO_HEADER_INVALID


@pytest.mark.parametrize("code", ALL_CODES)
@pytest.mark.parametrize("codec", [JSON, ZIPROTO])
def test_every_error_reply_reads_back(code, codec):
    sender, reader = Connection(), Connection()
    assert error_payload(code) == {"status": "failure", "error": code}
    assert events_of(reader, sender.error_bytes(code, codec)) == [Request(error_payload(code), codec)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.dictionaries(st.text(), st.integers(-(2**63), 2**64 - 1) | st.text() | st.none(), max_size=6),
    codec=st.sampled_from([JSON, ZIPROTO]),
    header_size=st.sampled_from([2, 4, 8]),
    byteorder=st.sampled_from(["big", "little"]),
)
def test_encode_then_read_back(fields, codec, header_size, byteorder):
    sender = Connection(header_size, byteorder)
    reader = Connection(header_size, byteorder)
    data = sender.encode(fields, codec)
    assert data[header_size:header_size + 2] == bytes([22, codec.code])
    assert events_of(reader, data) == [Request(fields, codec)]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([2, 4, 8]))
def test_arbitrary_bytes_give_only_requests_protocol_errors_or_need_data(data, header_size):
    connection = Connection(header_size, max_packet_size=64)
    connection.receive_data(data)
    for _ in range(len(data) + 2):
        event = connection.next_event()
        if event is NEED_DATA:
            break
        assert type(event) in (Request, ProtocolError)
        if type(event) is Request:
            assert type(event.fields) is dict and event.codec is connection.codec
        else:
            assert event.code in ALL_CODES and event.codec in (JSON, ZIPROTO)
            if event.close:
                break
    else:
        pytest.fail("next_event() never settled")
