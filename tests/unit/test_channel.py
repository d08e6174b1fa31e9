"""Channel: ordered writes, replies to a pipelined batch gathered into one write."""

import pytest
import trio

from asyncapy.transport import HOLD_LIMIT, Channel


class RecordingStream(trio.abc.Stream):
    """A stream that records every send_all call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes=None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def test_each_send_is_one_write_when_not_holding():
    stream = RecordingStream()
    channel = Channel(stream)
    await channel.send(b"a")
    await channel.send(b"b")
    assert stream.writes == [b"a", b"b"]


async def test_held_replies_go_out_in_one_write_with_the_first_unheld_one():
    stream = RecordingStream()
    channel = Channel(stream)
    channel.holding = True
    await channel.send(b"one")
    await channel.send(b"two")
    assert stream.writes == []
    channel.holding = False
    await channel.send(b"three")
    assert stream.writes == [b"onetwothree"]


async def test_flush_writes_what_is_held_and_stops_holding():
    stream = RecordingStream()
    channel = Channel(stream)
    channel.holding = True
    await channel.send(b"x")
    await channel.flush()
    assert stream.writes == [b"x"] and not channel.holding
    await channel.flush()
    assert stream.writes == [b"x"]


async def test_holding_is_bounded():
    stream = RecordingStream()
    channel = Channel(stream)
    channel.holding = True
    chunk = b"z" * (HOLD_LIMIT // 2)
    for _ in range(4):
        await channel.send(chunk)
    assert stream.writes, "held bytes must be written once they reach HOLD_LIMIT"
    assert all(len(write) <= HOLD_LIMIT + len(chunk) for write in stream.writes)


async def test_close_writes_held_replies_first():
    stream = RecordingStream()
    channel = Channel(stream)
    channel.holding = True
    await channel.send(b"last words")
    await channel.aclose()
    assert stream.writes == [b"last words"] and stream.closed
    with pytest.raises(trio.ClosedResourceError):
        await channel.send(b"too late")


async def test_concurrent_senders_never_interleave():
    stream = RecordingStream()
    channel = Channel(stream)
    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(channel.send, bytes([index]) * 10)
    assert sorted(stream.writes) == sorted(bytes([i]) * 10 for i in range(20))


class GatedStream(RecordingStream):
    """A stream whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.writing = trio.Event()

    async def send_all(self, data) -> None:
        self.writing.set()
        await self.gate.wait()
        self.writes.append(bytes(data))


async def test_a_queued_writer_cancelled_as_the_write_before_ends_does_not_wedge_the_channel():
    """W1 writes; W2 queues behind it; W2 is cancelled in the same scheduling batch as
    W1's write completes. Whichever of the two trio runs first (it picks at random),
    the channel must be free afterwards: a third write goes through. Repeated, so both
    orders are met."""
    for _ in range(24):
        stream = GatedStream()
        channel = Channel(stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.send, b"one")
            await stream.writing.wait()
            queued = trio.CancelScope()

            async def second() -> None:
                with queued:
                    await channel.send(b"two")

            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            queued.cancel()  # W2 leaves the queue...
            stream.gate.set()  # ...as W1's write ends: both are now runnable
        with trio.fail_after(1):
            await channel.send(b"three")
        assert stream.writes in ([b"one", b"three"], [b"one", b"two", b"three"])


async def test_hold_and_defer_are_the_channels_own_switches():
    channel = Channel(RecordingStream())
    channel.hold()
    assert channel.holding
    channel.hold(False)
    assert not channel.holding
    channel.defer(True)
    assert channel.deferring


async def test_close_with_writes_the_held_replies_then_the_last_one_and_closes():
    stream = RecordingStream()
    channel = Channel(stream)
    channel.hold()
    await channel.send(b"held")
    assert await channel.close_with(b"last") is True
    assert stream.writes == [b"heldlast"] and stream.closed and channel.closed
    with pytest.raises(trio.ClosedResourceError):
        await channel.send(b"more")


async def test_close_with_gives_up_the_reply_after_an_interrupted_write():
    stream = RecordingStream()
    channel = Channel(stream)
    channel.interrupted = True
    assert await channel.close_with(b"last") is False
    assert stream.writes == [] and stream.closed and channel.closed


async def test_abort_closes_with_nothing_written():
    stream = RecordingStream()
    channel = Channel(stream)
    channel.hold()
    await channel.send(b"held")
    await channel.abort()
    assert stream.writes == [] and channel.closed
