"""The packet memory budget charged as bytes arrive and shared fairly between owners
(``Connection(..., owner=..., charge_on_arrival=True)`` over
``PacketMemory(limit, share=...)``): the two attacks of issue 21 played against the
pure core, byte for byte, and the accounting property over arbitrary arrivals."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain.connection import NEED_DATA, Connection, ProtocolError, Request
from asyncapy.domain.errors import ERR_PACKET_TOO_LARGE
from asyncapy.domain.limits import DEFAULT_OWNER_SHARE, DEFAULT_PACKET_MEMORY, STRING_FACTOR, PacketMemory
from tests.unit.test_packet_memory import blob, packet

MiB = 1 << 20
CHARGE = 1 + STRING_FACTOR


def fair_budget(limit: int = DEFAULT_PACKET_MEMORY, share: float = DEFAULT_OWNER_SHARE) -> PacketMemory:
    return PacketMemory(limit, share=share)


def session(memory: PacketMemory, owner: str) -> Connection:
    return Connection(max_packet_size=2 * MiB, memory=memory, owner=owner, charge_on_arrival=True)


def served(memory: PacketMemory, owner: str, size: int = 100_000, count: int = 20) -> int:
    """How many of ``count`` packets of ``size`` bytes a client of ``owner`` gets decoded."""
    ok = 0
    for _ in range(count):
        conn = session(memory, owner)
        data = packet(blob(size))
        conn.receive_data(data[: len(data) // 2])
        if conn.next_event() is not NEED_DATA:
            conn.close()
            continue
        conn.receive_data(data[len(data) // 2 :])
        ok += type(conn.next_event()) is Request
        conn.close()
    return ok


def test_a_header_alone_costs_nothing_and_drains_nothing():
    memory = fair_budget()
    attackers = [session(memory, "198.51.100.66") for _ in range(1_000)]
    for conn in attackers:
        conn.receive_data(packet(blob(MiB))[:6])  # a header declaring 1 MiB, and nothing else
        assert conn.next_event() is NEED_DATA
    assert memory.used == 1_000 * CHARGE * 2  # the two header bytes inside Content-Length
    assert served(memory, "203.0.113.5") == 20


def test_bytes_are_charged_as_they_arrive_and_the_whole_packet_once_decoded():
    memory = fair_budget()
    conn = session(memory, "a")
    data = packet(blob(MiB))
    received = 0
    for step in (6, 1_000, 100_000, 300_000, 400_000):
        conn.receive_data(data[received : received + step])
        received += step
        assert conn.next_event() is NEED_DATA
        assert memory.used == memory.held_by("a") == CHARGE * (received - 4)
    conn.receive_data(data[received:])
    assert type(conn.next_event()) is Request
    assert memory.used == conn.held and conn.held >= CHARGE * (MiB + 2)
    conn.release()
    assert memory.used == 0 and memory.owners == 0


def test_half_of_each_of_100_large_packets_stalled_leaves_others_served():
    memory = fair_budget()
    refused = 0
    stalled = []
    for _ in range(100):
        conn = session(memory, "198.51.100.66")
        conn.receive_data(packet(blob(MiB))[: MiB // 2])
        event = conn.next_event()
        if event is NEED_DATA:
            stalled.append(conn)
        else:
            assert event.code == ERR_PACKET_TOO_LARGE and event.close
            assert "this client holds" in event.detail
            refused += 1
            conn.close()
    assert memory.held_by("198.51.100.66") <= memory.owner_limit == 64 * MiB
    assert len(stalled) == 25 and refused == 75 and memory.owner_refusals == 75
    assert served(memory, "203.0.113.5", count=100) == 100
    assert served(memory, "2001:db8::/64", count=100) == 100
    for conn in stalled:
        conn.close()
    assert memory.used == 0


def test_an_owner_over_its_share_is_refused_while_the_budget_has_room():
    memory = PacketMemory(12 * MiB, share=0.5)
    first = session(memory, "a")
    first.receive_data(packet(blob(MiB)))
    assert type(first.next_event()) is Request  # 5 MiB and a bit of a's 6 MiB
    second = session(memory, "a")
    second.receive_data(packet(blob(MiB))[:300_000])  # 1.4 MiB more: over 6
    event = second.next_event()
    assert type(event) is ProtocolError and event.code == ERR_PACKET_TOO_LARGE
    assert memory.free > 4 * MiB
    other = session(memory, "b")
    other.receive_data(packet(blob(500_000)))
    assert type(other.next_event()) is Request


@pytest.mark.parametrize("share", [0, -0.5, 1.5, "0.5", None])
def test_the_share_is_validated(share):
    with pytest.raises(ValueError, match="share must be a number above 0 and at most 1"):
        PacketMemory(MiB, share=share)


def test_without_an_owner_nothing_changes():
    memory = PacketMemory(MiB, share=0.1)
    assert memory.reserve(MiB // 2) and memory.owners == 0  # no owner, no share
    assert memory.free_for() == MiB // 2 and memory.free_for("x") == MiB // 10
    memory.release(MiB // 2)
    assert memory.used == 0


payloads = st.sampled_from([b"\x81\xa1a\x01", blob(20_000), blob(200_000), blob(300_000) + b"\xc1"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 3), payloads), min_size=1, max_size=12),
    st.integers(1, 3_000_000),
    st.sampled_from([0.2, 0.5, 1.0]),
    st.lists(st.integers(1, 400_000), min_size=1, max_size=5),
    st.data(),
)
def test_no_owner_ever_holds_more_than_its_share_and_everything_comes_back(steps, limit, share, cuts, data):
    memory = PacketMemory(limit, share=share)
    owners = ["a", "a", "b", "c"]  # two sessions of one owner
    conns = [session(memory, owner) for owner in owners]
    closed = [False] * 4
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
            for owner in set(owners):
                held = sum(c.held + c._buffering for c in conns if c.owner == owner)
                assert memory.held_by(owner) == held <= memory.owner_limit
            if closed[which]:
                break
    for conn in conns:
        conn.close()
    assert memory.used == 0 and memory.owners == 0
