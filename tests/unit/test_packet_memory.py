"""The packet memory budget (``asyncapy.domain.limits.PacketMemory``) as ``Connection``
keeps it: what large packets reserve, when, what is refused, and that everything comes
back, whatever the order of events."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain.codecs import JSON, ZIPROTO
from asyncapy.domain.connection import NEED_DATA, Connection, ProtocolError, Request
from asyncapy.domain.errors import ERR_PACKET_TOO_LARGE, ERR_REQUEST_MALFORMED
from asyncapy.domain.framing import Framer
from asyncapy.domain.limits import (
    ELEMENT_COST,
    FREE_PACKET_SIZE,
    MAX_ELEMENTS,
    STRING_FACTOR,
    PacketMemory,
)

MiB = 1 << 20
FRAMER = Framer()


def packet(payload: bytes, encoding: int = 1) -> bytes:
    return FRAMER.frame(payload, encoding)


def blob(size: int) -> bytes:
    """A ZiProto map of one bin value, ``size`` bytes of payload in all (3 elements)."""
    body = size - 8
    return b"\x81\xa1a\xc6" + body.to_bytes(4, "big") + b"x" * body


def arrays(count: int) -> bytes:
    """``{"a": [[], [], ...]}``: the amplification payload, ``count + 3`` elements."""
    return b"\x81\xa1a\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def cost(payload: bytes, elements: int) -> int:
    content_length = len(payload) + 2
    return content_length + STRING_FACTOR * content_length + ELEMENT_COST * elements


def test_small_packets_take_nothing():
    memory = PacketMemory(0)  # not a byte to spare
    conn = Connection(memory=memory)
    payload = blob(FREE_PACKET_SIZE - 2)  # Content-Length exactly FREE_PACKET_SIZE
    data = packet(payload)
    conn.receive_data(data[:100])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(data[100:])
    assert type(conn.next_event()) is Request
    assert memory.used == 0 and conn.held == 0 and memory.refusals == 0


def test_a_large_packet_reserves_its_bytes_at_its_header_and_its_decoding_once_decoded():
    memory = PacketMemory(64 * MiB)
    conn = Connection(memory=memory)
    payload = blob(MiB)
    data = packet(payload)
    conn.receive_data(data[:10])
    assert conn.next_event() is NEED_DATA
    # From the header alone: the Content-Length, and four times it for strings.
    assert memory.used == (1 + STRING_FACTOR) * (MiB + 2)
    conn.receive_data(data[10:])
    event = conn.next_event()
    assert type(event) is Request and len(event.fields["a"]) == MiB - 8
    assert memory.used == conn.held == cost(payload, 3)
    conn.release()
    assert memory.used == conn.held == 0
    conn.release()  # idempotent
    assert memory.used == 0 and memory.peak == cost(payload, 3)


def test_a_large_packet_arriving_whole_is_reserved_when_it_is_cut():
    memory = PacketMemory(64 * MiB)
    conn = Connection(memory=memory)
    payload = arrays(100_000)
    conn.receive_data(packet(payload))
    assert type(conn.next_event()) is Request
    assert memory.used == cost(payload, 100_003)


def test_asking_for_the_next_event_gives_the_last_request_back():
    memory = PacketMemory(64 * MiB)
    conn = Connection(memory=memory)
    conn.receive_data(packet(blob(MiB)) + packet(blob(MiB)))
    assert type(conn.next_event()) is Request
    first = memory.used
    assert type(conn.next_event()) is Request  # the first is done with: released
    assert memory.used == first
    assert conn.next_event() is NEED_DATA and memory.used == 0


def test_a_packet_whose_bytes_do_not_fit_is_refused_from_its_header():
    memory = PacketMemory(10 * MiB)
    conn = Connection(memory=memory)
    data = packet(blob(2 * MiB))  # 10 MiB and 10 bytes to reserve
    conn.receive_data(data[:4096])
    event = conn.next_event()
    assert type(event) is ProtocolError
    assert (event.code, event.close) == (ERR_PACKET_TOO_LARGE, True)
    assert "packet memory budget" in event.detail and "Content-Length 2097154" in event.detail
    assert memory.used == 0 and memory.refusals == 1
    # Framing is over: the rest of the packet is never looked at.
    conn.receive_data(data[4096:])
    assert conn.next_event().code == ERR_PACKET_TOO_LARGE


@pytest.mark.parametrize("codec", [ZIPROTO, JSON], ids=["ziproto", "json"])
def test_an_amplifying_packet_is_given_only_the_elements_that_fit(codec):
    # MAX_ELEMENTS empty arrays: about 25 MiB charged. With 20 MiB of budget the
    # packet is refused, having built at most what fits. (JSON counts an empty
    # array twice: its "[" and the "," after it.)
    memory = PacketMemory(20 * MiB)
    conn = Connection(memory=memory, default_codec=codec)
    count = MAX_ELEMENTS - 16
    payload = arrays(count) if codec is ZIPROTO else b'{"a": [' + b"[]," * (count // 2) + b"[]]}"
    conn.receive_data(packet(payload, codec.code))
    event = conn.next_event()
    assert type(event) is ProtocolError and (event.code, event.close) == (ERR_PACKET_TOO_LARGE, True)
    assert "elements to decode" in event.detail
    assert memory.used == 0
    # With room, the same packet decodes.
    memory = PacketMemory(256 * MiB)
    conn = Connection(memory=memory)
    conn.receive_data(packet(payload, codec.code))
    assert type(conn.next_event()) is Request
    assert memory.used == conn.held > count * ELEMENT_COST // 2


def test_past_max_elements_with_room_to_spare_the_packet_is_malformed_and_the_session_goes_on():
    memory = PacketMemory(1 << 40)
    conn = Connection(max_packet_size=4 * MiB, memory=memory)
    conn.receive_data(packet(arrays(MAX_ELEMENTS)) + packet(b"\x81\xa1a\x01"))
    event = conn.next_event()
    assert type(event) is ProtocolError
    assert (event.code, event.close) == (ERR_REQUEST_MALFORMED, False)
    assert f"more than {MAX_ELEMENTS} elements" in event.detail
    assert memory.used == 0
    assert conn.next_event() == Request({"a": 1}, ZIPROTO)


def test_a_malformed_large_packet_gives_its_reservation_back():
    memory = PacketMemory(64 * MiB)
    conn = Connection(memory=memory)
    conn.receive_data(packet(blob(MiB) + b"\xc1"))  # a byte after the map
    event = conn.next_event()
    assert event.code == ERR_REQUEST_MALFORMED and not event.close
    assert memory.used == 0


def test_closing_gives_back_a_packet_half_received():
    memory = PacketMemory(64 * MiB)
    conn = Connection(memory=memory)
    conn.receive_data(packet(blob(MiB))[: MiB // 2])
    assert conn.next_event() is NEED_DATA and memory.used == (1 + STRING_FACTOR) * (MiB + 2)
    conn.close()
    assert memory.used == 0
    conn.close()
    assert memory.used == 0


def test_sessions_share_one_budget():
    memory = PacketMemory(8 * MiB)
    first, second = Connection(memory=memory), Connection(memory=memory)
    first.receive_data(packet(blob(MiB)))
    assert type(first.next_event()) is Request  # holds 5 MiB and a bit
    second.receive_data(packet(blob(MiB))[:100])
    assert second.next_event().code == ERR_PACKET_TOO_LARGE  # 5 MiB more: no room
    first.release()
    third = Connection(memory=memory)
    third.receive_data(packet(blob(MiB)))
    assert type(third.next_event()) is Request


@pytest.mark.parametrize("limit", [-1, 1.5, "1", None])
def test_the_budget_is_validated(limit):
    with pytest.raises(ValueError, match="packet memory budget"):
        PacketMemory(limit)


payloads = st.sampled_from(
    [b"\x81\xa1a\x01", blob(FREE_PACKET_SIZE + 100), blob(200_000), arrays(50_000), arrays(5_000),
     blob(300_000) + b"\xc1", b"\x91\x01" * 10_000]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 2), payloads), min_size=1, max_size=12),
    st.integers(1, 3_000_000),
    st.lists(st.integers(1, 400_000), min_size=1, max_size=5),
    st.data(),
)
def test_whatever_happens_the_budget_is_whole_again_once_sessions_close(steps, limit, cuts, data):
    # Three sessions on one budget, packets arriving in pieces, requests released or
    # not, sessions refused or closed in any order: the budget never goes above its
    # limit or below zero, equals what the sessions say they hold, and is all back at
    # the end.
    memory = PacketMemory(limit)
    conns = [Connection(max_packet_size=2 * MiB, memory=memory) for _ in range(3)]
    closed = [False] * 3
    for which, payload in steps:
        conn = conns[which]
        if closed[which]:
            continue
        stream = packet(payload)
        position = 0
        for cut in cuts * (len(stream) // min(cuts) + 1):
            piece = stream[position : position + cut]
            if not piece:
                break
            position += len(piece)
            conn.receive_data(piece)
            event = conn.next_event()
            while type(event) is not type(NEED_DATA):
                if type(event) is ProtocolError and event.close:
                    closed[which] = True
                    conn.close()
                    break
                if data.draw(st.booleans()):
                    conn.release()
                event = conn.next_event()
            assert 0 <= memory.used <= memory.limit
            assert memory.used == sum(c.held + c._buffering for c in conns)
            if closed[which]:
                break
    for conn in conns:
        conn.close()
    assert memory.used == 0
