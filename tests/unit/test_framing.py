"""Framer: cutting a byte stream into AsyncAProto 22 frames, with plain bytes and no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain import framing
from asyncapy.domain.errors import ERR_PACKET_TOO_LARGE, ERR_REQUEST_MALFORMED
from asyncapy.domain.framing import NEED_DATA, Frame, Framer, FramingError

LAYOUTS = list(itertools.product((2, 4, 8), ("big", "little")))
layouts = pytest.mark.parametrize("header_size,byteorder", LAYOUTS)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_packet(payload: bytes, encoding: int, version: int, header_size: int, byteorder: str) -> bytes:
    """A packet built by hand, independently of Framer.frame."""
    return (len(payload) + 2).to_bytes(header_size, byteorder) + bytes([version, encoding]) + payload


def drain(framer: Framer) -> list:
    """Every event up to (not including) NEED_DATA; stops after a FramingError."""
    events = []
    while True:
        event = framer.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if type(event) is FramingError:
            return events


def feed_in_pieces(framer: Framer, data: bytes, cuts: list[int]) -> list:
    """Feed ``data`` cut at ``cuts`` (sorted offsets), draining after every piece."""
    events = []
    start = 0
    for cut in [*cuts, len(data)]:
        if cut > start:
            framer.receive_data(data[start:cut])
            start = cut
        events.extend(drain(framer))
        if events and type(events[-1]) is FramingError:
            break
    return events


frames = st.lists(
    st.tuples(
        st.binary(max_size=300),
        st.integers(0, 255),  # encoding: the framer does not judge it
        st.integers(0, 255),  # version: nor this
    ),
    max_size=12,
)


# -- the examples of protocol.md, byte for byte ----------------------------------------
JSON_FOO_BAR = bytes.fromhex("00000010 16 00 7b22666f6f223a202262617222 7d".replace(" ", ""))
ZIPROTO_FOO_BAR = bytes.fromhex("0000000b 16 01 81a3666f6fa3626172".replace(" ", ""))


def test_protocol_md_examples_are_framed_byte_for_byte():
    framer = Framer()
    assert framer.frame(b'{"foo": "bar"}', 0) == JSON_FOO_BAR
    assert framer.frame(bytes.fromhex("81a3666f6fa3626172"), 1) == ZIPROTO_FOO_BAR


def test_protocol_md_examples_are_read_back():
    framer = Framer()
    framer.receive_data(JSON_FOO_BAR + ZIPROTO_FOO_BAR)
    assert framer.next_event() == Frame(22, 0, b'{"foo": "bar"}')
    assert framer.next_event() == Frame(22, 1, b"\x81\xa3foo\xa3bar")
    assert framer.next_event() is NEED_DATA
    assert framer.buffered == 0


# -- every layout ---------------------------------------------------------------------
@layouts
def test_frame_writes_the_declared_layout(header_size, byteorder):
    framer = Framer(header_size, byteorder)
    data = framer.frame(b"abc", 1)
    assert data == (5).to_bytes(header_size, byteorder) + b"\x16\x01abc"
    assert framer.split(data) == (5, 22, 1, b"abc")


@layouts
def test_one_byte_per_feed_header_included(header_size, byteorder):
    packets = [(b"", 0, 22), (b"x", 1, 22), (bytes(range(256)) * 3, 0, 7), (b'{"a": 1}', 255, 22)]
    stream = b"".join(raw_packet(p, e, v, header_size, byteorder) for p, e, v in packets)
    framer = Framer(header_size, byteorder)
    events = feed_in_pieces(framer, stream, list(range(1, len(stream))))
    assert events == [Frame(v, e, p) for p, e, v in packets]
    assert framer.buffered == 0


@layouts
def test_nothing_comes_out_before_the_last_byte(header_size, byteorder):
    framer = Framer(header_size, byteorder)
    data = framer.frame(b"payload", 0)
    for byte in data[:-1]:
        framer.receive_data(bytes([byte]))
        assert framer.next_event() is NEED_DATA
    framer.receive_data(data[-1:])
    assert framer.next_event() == Frame(22, 0, b"payload")


@layouts
@PROPERTY
@given(packets=frames, data=st.data())
def test_split_anywhere_reassembles_the_same_frames_in_order(header_size, byteorder, packets, data):
    stream = b"".join(raw_packet(p, e, v, header_size, byteorder) for p, e, v in packets)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=40)))
    framer = Framer(header_size, byteorder)
    events = feed_in_pieces(framer, stream, cuts)
    assert events == [Frame(v, e, p) for p, e, v in packets]
    assert framer.buffered == 0
    assert framer.next_event() is NEED_DATA


@PROPERTY
@given(packets=frames, size=st.integers(1, 7))
def test_fixed_size_pieces_reassemble(packets, size):
    stream = b"".join(raw_packet(p, e, v, 4, "big") for p, e, v in packets)
    framer = Framer()
    events = feed_in_pieces(framer, stream, list(range(size, len(stream), size)))
    assert events == [Frame(v, e, p) for p, e, v in packets]


# -- Content-Length out of bounds -----------------------------------------------------
@layouts
@pytest.mark.parametrize("content_length", [0, 1])
def test_content_length_below_two_is_malformed_and_sticky(header_size, byteorder, content_length):
    framer = Framer(header_size, byteorder)
    framer.receive_data(content_length.to_bytes(header_size, byteorder))
    error = framer.next_event()
    assert error == FramingError(ERR_REQUEST_MALFORMED, content_length)
    # Sticky: whatever follows, even a perfectly good packet, is never framed.
    framer.receive_data(b"\x16\x00" + framer.frame(b"{}", 0))
    for _ in range(3):
        assert framer.next_event() == error


@layouts
def test_too_large_is_refused_from_the_header_alone(header_size, byteorder):
    framer = Framer(header_size, byteorder, max_packet_size=100)
    framer.receive_data((101).to_bytes(header_size, byteorder))  # only the header
    assert framer.buffered == header_size
    error = framer.next_event()
    assert error == FramingError(ERR_PACKET_TOO_LARGE, 101)
    framer.receive_data(b"\x16\x00" + b"x" * 99)
    assert framer.next_event() == error


@layouts
def test_max_packet_size_itself_is_accepted(header_size, byteorder):
    framer = Framer(header_size, byteorder, max_packet_size=100)
    framer.receive_data(raw_packet(b"x" * 98, 0, 22, header_size, byteorder))
    assert framer.next_event() == Frame(22, 0, b"x" * 98)


def test_too_large_header_refused_before_any_payload_byte_with_huge_declared_length():
    framer = Framer(8, "big")
    framer.receive_data((2**64 - 1).to_bytes(8, "big"))
    assert framer.next_event() == FramingError(ERR_PACKET_TOO_LARGE, 2**64 - 1)


def test_error_after_good_frames_in_the_same_read():
    framer = Framer(max_packet_size=50)
    framer.receive_data(framer.frame(b"one", 0) + framer.frame(b"two", 1) + (51).to_bytes(4, "big"))
    assert framer.next_event() == Frame(22, 0, b"one")
    assert framer.next_event() == Frame(22, 1, b"two")
    assert framer.next_event() == FramingError(ERR_PACKET_TOO_LARGE, 51)


# -- arbitrary input ------------------------------------------------------------------
def reference_events(stream: bytes, header_size: int, byteorder: str, max_size: int) -> list:
    """A deliberately naive whole-buffer parser: what any split of ``stream`` must give."""
    events, offset = [], 0
    while len(stream) - offset >= header_size:
        length = int.from_bytes(stream[offset : offset + header_size], byteorder)
        if length < 2:
            return events + [FramingError(ERR_REQUEST_MALFORMED, length)]
        if length > max_size:
            return events + [FramingError(ERR_PACKET_TOO_LARGE, length)]
        end = offset + header_size + length
        if end > len(stream):
            break
        body = stream[offset + header_size : end]
        events.append(Frame(body[0], body[1], body[2:]))
        offset = end
    return events


@PROPERTY
@given(
    layout=st.sampled_from(LAYOUTS),
    stream=st.binary(max_size=400),
    max_size=st.integers(2, 300),
    data=st.data(),
)
def test_arbitrary_bytes_only_ever_give_frames_errors_or_need_data(layout, stream, max_size, data):
    header_size, byteorder = layout
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream))), max_size=20)))
    framer = Framer(header_size, byteorder, max_size)
    events = []
    start = 0
    for cut in [*cuts, len(stream)]:
        framer.receive_data(stream[start:cut])  # may be b"" (end of stream): harmless
        start = cut
        while True:
            event = framer.next_event()
            assert event is NEED_DATA or type(event) in (Frame, FramingError)
            if event is NEED_DATA:
                break
            events.append(event)
            if type(event) is FramingError:
                assert framer.next_event() == event
                break
        if events and type(events[-1]) is FramingError:
            break
    assert events == reference_events(stream, header_size, byteorder, max_size)


# -- O(n) buffering, proven by counting rather than timing ----------------------------
class CountingBuffer(bytearray):
    """A bytearray that counts the bytes the framer copies out of it or moves inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.moved = 0  # bytes shifted to the front by deleting a consumed prefix
        self.compactions = 0
        self.sliced = 0  # bytes copied out by slicing
        self.largest = 0

    def __iadd__(self, other):
        result = super().__iadd__(other)
        self.largest = max(self.largest, len(self))
        return result

    def __delitem__(self, key):
        before = len(self)
        super().__delitem__(key)
        self.compactions += 1
        self.moved += len(self)
        assert before > len(self)

    def __getitem__(self, key):
        result = super().__getitem__(key)
        if isinstance(key, slice):
            self.sliced += len(result)
        return result


def instrumented(framer: Framer) -> CountingBuffer:
    buffer = CountingBuffer()
    framer._buffer = buffer
    return buffer


def test_one_mebibyte_packet_in_kibibyte_pieces_is_never_recopied():
    framer = Framer()
    buffer = instrumented(framer)
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = framer.frame(payload, 1)
    pieces = 0
    for start in range(0, len(stream), 1024):
        framer.receive_data(stream[start : start + 1024])
        pieces += 1
        event = framer.next_event()
        if start + 1024 < len(stream):
            assert event is NEED_DATA
    assert pieces > 1000
    assert event == Frame(22, 1, payload)
    # Waiting for the rest never copies or compacts what is buffered: the payload is
    # copied out exactly once, and nothing was shifted inside the buffer.
    assert buffer.compactions == 0
    assert buffer.moved == 0
    assert buffer.sliced == len(payload)
    assert framer.buffered == 0


@pytest.mark.parametrize("packet_size,piece_size", [(300, 1000), (5000, 777), (70_000, 4096)])
def test_pipelined_stream_moves_a_linear_number_of_bytes(packet_size, piece_size):
    framer = Framer()
    buffer = instrumented(framer)
    one = framer.frame(b"p" * (packet_size - 6), 0)
    count = (4 * 1024 * 1024) // packet_size
    stream = one * count
    received = 0
    for start in range(0, len(stream), piece_size):
        framer.receive_data(stream[start : start + piece_size])
        received += len(drain(framer))
    assert received == count
    total = len(stream)
    # Every byte is shifted at most once by compaction, copied out once as payload...
    assert buffer.moved <= total
    assert buffer.sliced <= total
    assert buffer.compactions <= total // framing._COMPACT_AT + 1
    # ...and consumed bytes do not pile up: the buffer stays near one window in size.
    assert buffer.largest <= framing._COMPACT_AT + 2 * (packet_size + piece_size)


def test_one_big_read_of_many_packets_is_linear():
    framer = Framer()
    buffer = instrumented(framer)
    stream = framer.frame(b"q" * 94, 0) * 50_000  # ~5 MB in one read
    framer.receive_data(stream)
    assert len(drain(framer)) == 50_000
    assert buffer.moved <= len(stream)
    assert buffer.compactions <= 40  # halving: logarithmic, not one per packet


# -- the rest of the API --------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"header_size": 3},
        {"header_size": True},
        {"header_size": 4.0},
        {"byteorder": "middle"},
        {"max_packet_size": 1},
        {"max_packet_size": 2.5},
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Framer(**kwargs)


def test_end_of_stream_is_recorded_and_keeps_what_is_buffered():
    framer = Framer()
    framer.receive_data(b"\x00\x00")
    assert not framer.at_eof
    framer.receive_data(b"")
    assert framer.at_eof
    assert framer.buffered == 2
    assert framer.next_event() is NEED_DATA


def test_frame_refuses_what_the_header_cannot_express():
    framer = Framer(2)
    assert len(framer.frame(b"x" * 65533, 0)) == 65537
    with pytest.raises(ValueError, match="larger header_size"):
        framer.frame(b"x" * 65534, 0)
    with pytest.raises(ValueError):
        framer.frame(b"", 256)


def test_split_of_short_raw_bytes():
    framer = Framer()
    assert framer.split(b"\x00\x00\x00\x02") == (2, 0, 0, b"")
    assert framer.split(JSON_FOO_BAR) == (16, 22, 0, b'{"foo": "bar"}')
