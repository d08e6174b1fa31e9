"""Deferred replies (``Pacer``): written with the round's others, never lost, never
interleaved, never later than the next scheduling round; over real loopback TCP."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from asyncapy.transport import HOLD_LIMIT, Channel, Pacer


async def tcp_pair(small: bool = False) -> tuple[trio.SocketStream, trio.SocketStream]:
    """(ours, peer): a connected loopback pair; ``small``: tiny buffers both ways (set
    before connecting, so the window is small too), so a 50 KiB write is partial."""
    listener = trio.socket.socket()
    client = trio.socket.socket()
    if small:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return trio.SocketStream(server), trio.SocketStream(client)


def pending_bytes(peer: trio.SocketStream) -> bytes:
    """What has arrived at ``peer`` so far, without waiting."""
    try:
        return os.read(peer.socket.fileno(), 1 << 20)  # trio's sockets do not block
    except BlockingIOError:
        return b""


def deferring_channel(stream: trio.SocketStream, pacer: Pacer) -> Channel:
    channel = Channel(stream, pacer)
    channel.deferring = True
    return channel


async def test_a_deferred_reply_waits_for_the_round_to_end_then_the_flusher_writes_it():
    pacer = Pacer()
    ours, peer = await tcp_pair()
    async with ours, peer, trio.open_nursery() as nursery:
        nursery.start_soon(pacer.run)
        await trio.testing.wait_all_tasks_blocked()
        channel = deferring_channel(ours, pacer)
        await channel.send(b"one")
        await channel.send(b"two")  # the same round: gathered
        assert channel.deferred and pending_bytes(peer) == b""
        with trio.fail_after(5):
            assert await peer.receive_some(100) == b"onetwo"
        assert not channel.deferred and not pacer.deferred
        nursery.cancel_scope.cancel()


async def test_one_flush_writes_every_deferred_channel_in_the_order_deferred():
    pacer = Pacer()  # no flusher: the round's first session flushes
    pairs = [await tcp_pair() for _ in range(4)]
    channels = [deferring_channel(ours, pacer) for ours, _ in pairs]
    for index, channel in enumerate(channels):
        await channel.send(b"reply %d" % index)
    assert pacer.deferred == channels
    pacer.flush()
    assert not pacer.deferred
    for index, (_, peer) in enumerate(pairs):
        assert await peer.receive_some(100) == b"reply %d" % index
    for ours, peer in pairs:
        await ours.aclose()
        await peer.aclose()


async def test_an_idle_server_writes_at_once():
    pacer = Pacer()
    ours, peer = await tcp_pair()
    async with ours, peer:
        channel = Channel(ours, pacer)  # not deferring
        await channel.send(b"now")
        assert not pacer.deferred
        assert pending_bytes(peer) == b"now"


async def test_replies_past_the_hold_limit_are_written_at_once_in_order():
    pacer = Pacer()
    ours, peer = await tcp_pair()
    async with ours, peer:
        channel = deferring_channel(ours, pacer)
        await channel.send(b"a" * 10)
        await channel.send(b"b" * HOLD_LIMIT)  # does not fit: everything goes, in order
        received = b""
        with trio.fail_after(5):
            while len(received) < 10 + HOLD_LIMIT:
                received += await peer.receive_some(1 << 20)
        assert received == b"a" * 10 + b"b" * HOLD_LIMIT
        pacer.flush()  # the channel is still listed, with nothing left to write
        assert pending_bytes(peer) == b""


async def test_a_deferred_reply_the_kernel_cannot_take_whole_is_finished_in_order(writable_waits):
    pacer = Pacer()
    ours, peer = await tcp_pair(small=True)
    first = bytes(range(256)) * 200  # 51,200 bytes: far more than the buffers hold
    async with ours, peer, trio.open_nursery() as nursery:
        nursery.start_soon(pacer.run)
        await trio.testing.wait_all_tasks_blocked()
        channel = deferring_channel(ours, pacer)
        await channel.send(first)
        await trio.testing.wait_all_tasks_blocked()
        assert channel.writing, "the flusher's task holds the channel while it finishes"
        assert writable_waits
        # A later reply waits its turn behind the rest of the first one.
        nursery.start_soon(channel.send, b"second")
        received = b""
        with trio.fail_after(10):
            while len(received) < len(first) + 6:
                received += await peer.receive_some(1 << 16)
        assert received == first + b"second"
        await trio.testing.wait_all_tasks_blocked()
        assert not channel.writing and not channel.interrupted
        nursery.cancel_scope.cancel()


async def test_a_failed_deferred_write_makes_the_next_send_fail():
    pacer = Pacer()
    ours, peer = await tcp_pair()
    async with ours:
        channel = deferring_channel(ours, pacer)
        await channel.send(b"lost")
        ours.socket.close()  # the connection goes away before the round ends
        pacer.flush()
        assert channel.interrupted
        with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
            await channel.send(b"more")
        await peer.aclose()


async def test_closing_writes_what_was_deferred_first():
    pacer = Pacer()
    ours, peer = await tcp_pair()
    async with peer:
        channel = deferring_channel(ours, pacer)
        await channel.send(b"last words")
        await channel.aclose()
        assert await peer.receive_some(100) == b"last words"
        assert await peer.receive_some(100) == b""
        pacer.flush()  # the closed channel is skipped


async def test_without_a_flusher_a_partial_write_keeps_the_rest_for_the_next_writer():
    pacer = Pacer()  # not running: nothing can finish a partial write in the background
    ours, peer = await tcp_pair(small=True)
    data = bytes(range(256)) * 200
    async with ours, peer:
        channel = deferring_channel(ours, pacer)
        await channel.send(data)
        pacer.flush()
        assert not channel.writing and channel._pending, "the rest is kept, not dropped"
        channel.deferring = False
        received = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.send, b"!")  # writes the rest, then its own

            async def read_all() -> None:
                nonlocal received
                while len(received) < len(data) + 1:
                    received += await peer.receive_some(1 << 16)

            with trio.fail_after(10):
                await read_all()
        assert received == data + b"!"


async def test_a_second_flusher_of_one_pacer_just_waits():
    pacer = Pacer()
    with trio.move_on_after(0.2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            nursery.start_soon(pacer.run)
    # Both were cancelled; no error, and the pacer can run again.
    with trio.move_on_after(0.05):
        await pacer.run()


async def test_a_handler_that_only_sends_yields_while_its_replies_are_deferred():
    """Deferred (and held) sends count towards WRITES_PER_YIELD as writes do: a loop of
    small sends that never reaches the kernel still lets other tasks in."""
    from asyncapy.transport import WRITES_PER_YIELD

    pacer = Pacer()
    ours, peer = await tcp_pair()
    ran = trio.Event()
    seen_at: list = []
    async with ours, peer, trio.open_nursery() as nursery:
        nursery.start_soon(pacer.run)

        async def bystander() -> None:
            ran.set()

        await trio.testing.wait_all_tasks_blocked()
        channel = deferring_channel(ours, pacer)
        nursery.start_soon(bystander)
        # At each yield trio runs the ready tasks in a random order: the bystander can
        # be missed at one (odds 1/2), not at sixteen in a row.
        for n in range(16 * WRITES_PER_YIELD):
            await channel.send(b"x")
            if ran.is_set() and not seen_at:
                seen_at.append(n)
        assert seen_at, "the loop never yielded"
        assert seen_at[0] >= WRITES_PER_YIELD - 2
        received = b""
        with trio.fail_after(5):
            while len(received) < 16 * WRITES_PER_YIELD:
                received += await peer.receive_some(1 << 16)
        assert received == b"x" * (16 * WRITES_PER_YIELD)
        nursery.cancel_scope.cancel()
