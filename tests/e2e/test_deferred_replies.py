"""Replies deferred to the next scheduling round on a busy server (``asyncapy.transport.Pacer``),
against a real server: every reply arrives, whole and in order, on every connection,
and none waits longer than a round, whatever its handler does next.

Deferral is the task-per-session path's (``reactor=False``): the reactor answers every
ready connection in one pass of one task, and has no scheduling rounds to batch over."""

from __future__ import annotations

import trio

from asyncapy.transport import Pacer

from ..conftest import serving
from .wire import Wire, json_packet, zi_packet


def count_deferred_writes(monkeypatch) -> list:
    """A one-item list: how many channels Pacer.flush wrote for, over the test."""
    written = [0]
    real = Pacer.flush

    def flush(self: Pacer) -> None:
        written[0] += len(self.deferred)
        real(self)

    monkeypatch.setattr(Pacer, "flush", flush)
    return written


async def test_many_busy_connections_get_every_reply_whole_and_in_order(make_server, monkeypatch):
    written = count_deferred_writes(monkeypatch)
    server = make_server(reactor=False)

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    connections, rounds, pipelined = 24, 40, 3
    async with serving(server) as (host, port):

        async def client(number: int) -> None:
            async with await Wire.connect(host, port) as wire:
                for index in range(rounds):
                    # A few requests in one write: the server's read finds the next
                    # one waiting, so it is busy, and defers.
                    requests = [
                        zi_packet({"c": number, "i": index, "k": k, "pad": "x" * (k * 300)})
                        for k in range(pipelined)
                    ]
                    await wire.send(b"".join(requests))
                    for request in requests:
                        assert await wire.read_packet() == request

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for number in range(connections):
                    nursery.start_soon(client, number)
    assert written[0] > 0, "no reply was deferred: the test proves little"


async def test_a_reply_is_not_held_while_its_handler_goes_on_waiting(make_server, monkeypatch):
    written = count_deferred_writes(monkeypatch)
    # Reads of 16 bytes: after the first, every read finds the next bytes waiting, as a
    # busy server's do, so the replies are deferred (a session's first read never is).
    server = make_server(buf=16, reactor=False)
    finished = trio.Event()

    @server.add_handler()
    async def reply_then_wait(client, packet):
        await client.send(packet)
        if packet.get("wait"):
            await trio.sleep(3)
            finished.set()

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            first = json_packet({"wait": True, "pad": "x" * 40})
            second = json_packet({"wait": False})
            await wire.send(first + second)  # pipelined: the server is busy, and defers
            started = trio.current_time()
            assert await wire.read_packet(timeout=2) == first
            assert trio.current_time() - started < 1.5
            assert not finished.is_set()  # the handler is still waiting: the reply did not
            assert await wire.read_packet(timeout=5) == second
    assert written[0] > 0
