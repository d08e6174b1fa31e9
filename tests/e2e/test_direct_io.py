"""Direct reads and writes (``asyncapy.transport``) end to end, against a real server.

On a plain TCP connection the server reads and writes with ``os.read``/``os.write``
on the socket's descriptor; a write the kernel takes at once does not yield, so the
session's channel yields before every ``WRITES_PER_YIELD``-th write in a row. These
tests push that path where it is fragile: replies many times the socket buffers to a
client that reads slowly, many tasks of one handler writing at once, a handler that
does nothing but write, a blocked write whose session another session closes, a
client resetting the connection mid-reply, and a write cancelled midway with another
one queued behind it. TLS sessions keep the stream path.

Clients that must be slow get a small ``SO_RCVBUF`` (set before connecting, so the
TCP window is small). ``writable_waits`` counts the server's waits for room, to
prove that a test did make a write partial.

The idle reaper's stuck-write detection on a plain TCP session (the direct path, see
``test_plain_tcp_sessions_read_and_write_directly_tls_ones_through_the_stream``) is
covered by ``tests/e2e/test_backpressure.py::test_a_client_that_stops_reading_is_closed_after_timeout``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import socket
import ssl
import struct
from typing import Any, Callable, Optional

import trio

from asyncapy import Packet
from asyncapy.server import Server
from asyncapy.transport import WRITES_PER_YIELD

from ..conftest import serving
from .wire import Wire, json_error, json_packet, settle

MiB = 1 << 20
SMALL_RCVBUF = 8192
INTERNAL = json_error("ERR_INTERNAL")
LIVENESS = 10
"""Seconds a test waits for something that must happen (a hang fails, never a speed)."""


# -- helpers ---------------------------------------------------------------------------
async def connect(host: str, port: int, rcvbuf: Optional[int] = None) -> Wire:
    """A raw client; with ``rcvbuf``, a small receive buffer (and TCP window)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, port))
    return Wire(trio.SocketStream(sock))


def reset(wire: Wire) -> None:
    """Close the client's connection with a TCP reset (SO_LINGER on, zero seconds)."""
    sock = wire.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def eventually(condition: Callable[[], Any], timeout: float = LIVENESS) -> Any:
    """Poll ``condition`` until it is true; return its value."""
    with trio.fail_after(timeout):
        while True:
            value = condition()
            if value:
                return value
            await trio.sleep(0.01)


def _transport(stream: trio.abc.Stream) -> trio.SocketStream:
    while not isinstance(stream, trio.SocketStream):
        stream = stream.transport_stream
    return stream


def session_of(server: Server, wire: Wire):
    """The server's live session of the client ``wire`` (None if there is none)."""
    local = _transport(wire.stream).socket.getsockname()
    for session in list(server._sessions.live.values()):
        if _transport(session.client._stream).socket.getpeername() == local:
            return session
    return None


async def session_for(server: Server, wire: Wire):
    return await eventually(lambda: session_of(server, wire))


def lock_send_buffer(session, size: int = 65536) -> None:
    """Fix the server-side send buffer of ``session`` (no autotuning up to 4 MiB):
    a reply of a few MiB then cannot fit in it, whatever the kernel's settings."""
    _transport(session.client._stream).socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def end_reason(caplog, session) -> Optional[str]:
    """Why the server says ``session`` ended ("Session ended: ..."), or None yet."""
    prefix = f"({session.session_id}) Session ended: "
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith(prefix):
            return message[len(prefix):]
    return None


def errors_logged(caplog) -> list:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def blob(size: int, seed: int) -> str:
    """``size`` characters of random base64: a reply whose every byte is checked."""
    return base64.b64encode(random.Random(seed).randbytes(size * 3 // 4 + 3)).decode()[:size]


def reply(client, **fields) -> Packet:
    return Packet(fields, encoding=client.encoding)


async def ask(wire: Wire, n: int) -> None:
    """A well-behaved client's request, answered (an echo)."""
    with trio.fail_after(LIVENESS):
        assert await wire.request({"bystander": n}) == {"bystander": n}


def make_app(make_server, **settings) -> tuple[Server, dict]:
    """A server with the handlers these tests need; ``state`` is what they saw."""
    server = make_server(**settings)
    state: dict = {"looping": False, "sent": 0, "outcomes": []}

    @server.add_handler()
    async def app(client, packet):
        if "big" in packet:
            await client.send(reply(client, big=blob(packet["big"], packet.get("seed", 0))))
        elif "loop" in packet:  # writes, and does nothing else, forever
            state["looping"] = True
            try:
                n = 0
                while True:
                    await client.send(reply(client, n=n))
                    n += 1
                    state["sent"] = n
            finally:
                state["looping"] = False
        elif "flood" in packet:  # its client reads nothing: blocks in a write
            while True:
                await client.send(reply(client, x="y" * 65536))
        elif "kick" in packet:
            kicked = 0
            for session in await client.get_sessions():
                if session != client.session:
                    await session.close()
                    kicked += 1
            await client.send(reply(client, kicked=kicked))
        else:
            await client.send(packet)

    return server, state


# -- plain TCP is the direct path; TLS the stream --------------------------------------
async def test_plain_tcp_sessions_read_and_write_directly_tls_ones_through_the_stream(
    make_server, ca, tls_files, writable_waits
):
    size = 2 * MiB
    plain, _ = make_app(make_server)
    async with serving(plain) as (host, port):
        async with await connect(host, port) as wire:
            await ask(wire, 0)
            session = await session_for(plain, wire)
            channel = session.client._channel
            assert channel.socket is not None
            assert channel.socket is session.client._stream.socket

    tls, _ = make_app(make_server, certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    async with serving(tls) as (host, port):
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=trust)
        async with Wire(stream) as wire:
            await ask(wire, 0)
            session = await session_for(tls, wire)
            assert isinstance(session.client._stream, trio.SSLStream)
            assert session.client._channel.socket is None
            # A reply many times the socket buffers goes through the TLS stream whole.
            with trio.fail_after(LIVENESS):
                await wire.send(json_packet({"big": size, "seed": 7}))
                assert await wire.read_json(timeout=LIVENESS) == {"big": blob(size, 7)}
            await ask(wire, 1)
    assert writable_waits == []  # no direct write ever waited: TLS used its stream


# -- big replies, slow readers ---------------------------------------------------------
async def test_a_multi_mib_reply_reaches_a_slow_reader_whole_while_another_client_is_served(
    make_server, writable_waits
):
    size = 3 * MiB
    server, _ = make_app(make_server)
    async with serving(server) as (host, port):
        slow = await connect(host, port, rcvbuf=SMALL_RCVBUF)
        other = await connect(host, port)
        async with slow, other:
            await ask(slow, 0)
            session = await session_for(server, slow)
            lock_send_buffer(session)
            channel = session.client._channel
            received = bytearray()
            paused = trio.Event()
            resume = trio.Event()

            async def read_slowly() -> None:
                reads = 0
                while True:
                    if len(received) >= 4:
                        if len(received) >= 4 + int.from_bytes(received[:4], "big"):
                            return
                    data = await slow.stream.receive_some(4096)
                    assert data, "connection closed in the middle of the reply"
                    received.extend(data)
                    reads += 1
                    if reads == 16:  # 64 KiB at most: far from the end
                        paused.set()
                        await resume.wait()
                    if reads % 32 == 0:
                        await trio.sleep(0.001)

            with trio.fail_after(LIVENESS * 2):
                async with trio.open_nursery() as nursery:
                    await slow.send(json_packet({"big": size, "seed": 1}))
                    nursery.start_soon(read_slowly)
                    await paused.wait()
                    # The server sits in the middle of the reply, waiting for room...
                    await eventually(lambda: channel.socket.fileno() in writable_waits)
                    assert channel.writing
                    # ...and serves the other client meanwhile, again and again.
                    for n in range(5):
                        await ask(other, n)
                    assert channel.writing  # the slow reader has not moved: still writing
                    resume.set()
            raw = bytes(received)
            assert len(raw) == 4 + int.from_bytes(raw[:4], "big")
            assert raw[4:6] == bytes([22, 0])
            assert json.loads(raw[6:]) == {"big": blob(size, 1)}
            assert not channel.writing
            await ask(slow, 1)  # the session goes on
            await ask(other, 5)


async def test_a_reply_longer_than_timeout_to_a_client_reading_slowly_is_not_cut(
    make_server, writable_waits
):
    """The reaper cuts a session whose reply makes no progress for ``timeout``, not one
    whose reply merely takes longer than that: a client that keeps taking bytes gets
    all of it (as nginx's send_timeout). Here a 2 MiB reply takes at least 4 times
    ``timeout`` to read, and nothing is cut."""
    size = 2 * MiB
    timeout = 0.4
    server, _ = make_app(make_server, timeout=timeout)
    async with serving(server) as (host, port):
        slow = await connect(host, port, rcvbuf=SMALL_RCVBUF)
        async with slow:
            await ask(slow, 0)
            session = await session_for(server, slow)
            lock_send_buffer(session)
            received = bytearray()
            started = trio.current_time()
            await slow.send(json_packet({"big": size, "seed": 2}))
            with trio.fail_after(LIVENESS * 2):
                # 256 KiB a tenth of a second: 2 MiB take 0.8 s or more, twice timeout.
                while len(received) < 4 or len(received) < 4 + int.from_bytes(received[:4], "big"):
                    chunk = 0
                    while chunk < 256 * 1024:
                        data = await slow.stream.receive_some(16384)
                        assert data, "the server cut the reply"
                        received.extend(data)
                        chunk += len(data)
                        if len(received) >= 4 + int.from_bytes(received[:4], "big"):
                            break
                    await trio.sleep(0.1)
            assert trio.current_time() - started > 2 * timeout
            raw = bytes(received)
            assert json.loads(raw[6:]) == {"big": blob(size, 2)}
            assert writable_waits  # the reply did wait for room: the slow path was taken
            await ask(slow, 1)  # and the session goes on


async def test_many_tasks_of_one_handler_writing_at_once_never_interleave_packets(
    make_server, writable_waits
):
    tasks, per_task = 8, 50
    sizes = [10, 400, 5000, 30000, 120000]
    letters = "abcdefgh"

    def size_of(t: int, i: int) -> int:
        return sizes[(t * 3 + i) % len(sizes)]

    server = make_server()

    @server.add_handler()
    async def burst(client, packet):
        if "burst" not in packet:
            await client.send(packet)
            return

        async def sender(t: int) -> None:
            for i in range(per_task):
                await client.send(reply(client, t=t, i=i, pad=letters[t] * size_of(t, i)))

        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(sender, t)
        await client.send(reply(client, done=True))

    async with serving(server) as (host, port):
        async with await connect(host, port, rcvbuf=64 * 1024) as wire:
            await wire.send(json_packet({"burst": 1}))
            seen: dict[int, list[int]] = {t: [] for t in range(tasks)}
            with trio.fail_after(LIVENESS * 2):
                for _ in range(tasks * per_task):
                    got = await wire.read_json(timeout=LIVENESS)  # well-formed, or it raises
                    t, i = got["t"], got["i"]
                    assert got == {"t": t, "i": i, "pad": letters[t] * size_of(t, i)}
                    seen[t].append(i)
                assert await wire.read_json(timeout=LIVENESS) == {"done": True}
            assert seen == {t: list(range(per_task)) for t in range(tasks)}  # each in order
            assert await wire.request({"after": 1}) == {"after": 1}
            await wire.assert_silent(0.2)
            fd = (await session_for(server, wire)).client._channel.socket.fileno()
    assert fd in writable_waits, "no write was partial: the test proves little"


# -- a handler that only writes -------------------------------------------------------
async def read_loop_packets(wire: Wire, until: Optional[trio.Event] = None) -> dict:
    """Read the looping handler's ``{"n": k}`` packets (checking k counts up from 0)
    until the server sends something else, closes, or ``until`` is set; what ended it."""
    buffer = bytearray()
    expected = 0
    while True:
        if until is not None and until.is_set():
            return {"ended": "stopped", "count": expected}
        while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big"):
            end = 4 + int.from_bytes(buffer[:4], "big")
            raw = bytes(buffer[:end])
            del buffer[:end]
            assert raw[4:6] == bytes([22, 0]), raw[:40]
            decoded = json.loads(raw[6:])
            if decoded != {"n": expected}:
                return {"ended": "packet", "packet": raw, "count": expected}
            expected += 1
        data = await wire.stream.receive_some(65536)
        if not data:
            return {"ended": "eof", "count": expected, "tail": bytes(buffer)}
        buffer += data


async def test_a_handler_that_only_writes_leaves_room_for_others_and_ends_with_its_client(
    make_server, caplog
):
    """Without WRITES_PER_YIELD, a loop of writes the kernel always takes would never
    yield: the other client would wait forever and the test time out."""
    caplog.set_level(logging.INFO, logger="asyncapy")
    server, state = make_app(make_server)
    async with serving(server) as (host, port):
        looped = await connect(host, port)
        other = await connect(host, port)
        async with looped, other:
            await ask(other, 0)
            stop_reading = trio.Event()
            with trio.fail_after(LIVENESS * 2):
                async with trio.open_nursery() as nursery:
                    outcome: dict = {}

                    async def reader() -> None:
                        outcome.update(await read_loop_packets(looped, stop_reading))

                    await looped.send(json_packet({"loop": 1}))
                    nursery.start_soon(reader)
                    await eventually(lambda: state["sent"] > 10 * WRITES_PER_YIELD)
                    for n in range(1, 6):
                        await ask(other, n)
                        assert state["looping"]  # served while the loop runs
                    stop_reading.set()
                assert outcome["ended"] == "stopped" and outcome["count"] > 0
                session = await session_for(server, looped)
                await looped.aclose()  # unread replies pending: the client resets
                # The loop's next writes fail: the handler ends, so does the session.
                await eventually(lambda: not state["looping"])
                assert await eventually(lambda: end_reason(caplog, session)) == (
                    "connection lost while replying"
                )
            await ask(other, 6)
    assert errors_logged(caplog) == []


async def test_a_handler_writing_without_pause_lets_another_session_in_every_few_writes(make_server):
    """Writes the kernel takes at once do not yield, but every WRITES_PER_YIELD-th
    one in a row does: a request that arrives while a handler writes and writes is
    served before that handler is done.

    The other client's request is written (by the looping handler itself, with a plain
    system call, so nothing yields) once the loop has begun: its session can only run
    when the loop yields. The loop's packets are small, so the kernel takes every one
    at once and the loop never waits for room."""
    server = make_server()
    served: list = []
    served_before_write: list = []
    control: dict = {}
    # At each yield trio runs the ready tasks in a random order: the bystander can be
    # missed at one yield (odds 1/2), not at fifteen in a row (1/2**15).
    writes = 16 * WRITES_PER_YIELD

    @server.add_handler()
    async def app(client, packet):
        if "loop" in packet:
            os.write(control["other_fd"], json_packet({"bystander": 1}))
            for n in range(writes):
                served_before_write.append(len(served))
                await client.send(reply(client, n=n))
        else:
            served.append(dict(packet))
            await client.send(packet)

    async with serving(server) as (host, port):
        async with await connect(host, port) as looped, await connect(host, port) as other:
            await ask(other, 0)
            await ask(looped, 0)
            served.clear()
            control["other_fd"] = other.stream.socket.fileno()
            with trio.fail_after(LIVENESS):
                await looped.send(json_packet({"loop": 1}))
                for n in range(writes):
                    assert await looped.read_json(timeout=LIVENESS) == {"n": n}
                assert await other.read_json(timeout=LIVENESS) == {"bystander": 1}
    assert served == [{"bystander": 1}]
    assert len(served_before_write) == writes
    first = served_before_write.index(1) if 1 in served_before_write else None
    assert first is not None, "the other session was served only once the loop ended"
    # Not before the loop first yields (writes it completes at once do not yield)...
    assert first >= WRITES_PER_YIELD - 1, served_before_write
    assert served_before_write[first:] == [1] * (writes - first)


async def test_a_handler_broadcasting_to_many_sessions_lets_another_session_in(make_server):
    """The count of writes that did not yield is the server's, not each session's: a
    handler that writes once or twice to each of many other sessions (fewer than
    WRITES_PER_YIELD on any one of them) yields all the same, as a chat server's
    broadcast must."""
    server = make_server()
    served: list = []
    served_before_write: list = []
    control: dict = {}
    # Writes per member stay below WRITES_PER_YIELD; there are enough of them for many
    # yields, because at each one trio runs the two ready tasks in a random order
    # (the bystander is missed with odds 1/2 per yield, 1/2**15 in all).
    members = 32
    rounds = WRITES_PER_YIELD // 2

    @server.add_handler()
    async def app(client, packet):
        if "broadcast" in packet:
            os.write(control["other_fd"], json_packet({"bystander": 1}))
            members_now = [
                s.client for s in server._sessions.live.values()
                if s.client is not client and s.client is not control["other"]
            ]
            for n in range(rounds):
                for member in members_now:
                    served_before_write.append(len(served))
                    await member.send(reply(member, n=n))
        else:
            served.append(dict(packet))
            await client.send(packet)

    async with serving(server) as (host, port):
        wires = [await connect(host, port) for _ in range(members)]
        sender = await connect(host, port)
        other = await connect(host, port)
        try:
            for wire in wires:
                await ask(wire, 0)
            await ask(other, 0)
            control["other"] = (await session_for(server, other)).client
            served.clear()
            control["other_fd"] = other.stream.socket.fileno()
            with trio.fail_after(LIVENESS):
                await sender.send(json_packet({"broadcast": 1}))
                for wire in wires:
                    for n in range(rounds):
                        assert await wire.read_json(timeout=LIVENESS) == {"n": n}
                assert await other.read_json(timeout=LIVENESS) == {"bystander": 1}
        finally:
            for wire in (*wires, sender, other):
                await wire.aclose()
    assert served == [{"bystander": 1}]
    writes = members * rounds
    assert writes >= WRITES_PER_YIELD and len(served_before_write) == writes
    assert 1 in served_before_write, "the other session was served only once the broadcast ended"
    assert served_before_write.index(1) >= WRITES_PER_YIELD - 1, served_before_write


async def test_handler_timeout_cancels_a_handler_that_only_writes(make_server, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server, state = make_app(make_server, handler_timeout=0.5)
    async with serving(server) as (host, port):
        async with await connect(host, port) as looped, await connect(host, port) as other:
            session = None
            with trio.fail_after(LIVENESS * 2):
                async with trio.open_nursery() as nursery:
                    outcome: dict = {}

                    async def reader() -> None:
                        outcome.update(await read_loop_packets(looped))

                    await looped.send(json_packet({"loop": 1}))
                    nursery.start_soon(reader)
                    session = await session_for(server, looped)
                    await eventually(lambda: state["sent"] > 0)
                    await ask(other, 0)
                await eventually(lambda: not state["looping"])
            assert outcome["count"] == state["sent"] or outcome["ended"] == "eof"
            [warning] = [r for r in caplog.records if "handler_timeout" in r.getMessage()]
            assert warning.levelno == logging.WARNING and "app" in warning.getMessage()
            if outcome["ended"] == "packet":
                # Cancelled between two writes: every packet whole, then ERR_INTERNAL,
                # and the session goes on.
                assert outcome["packet"] == INTERNAL
                assert "while writing" not in warning.getMessage()
                await ask(looped, 1)
            else:
                # Cancelled in the middle of a write: the session was closed instead.
                assert outcome["ended"] == "eof"
                assert "while writing" in warning.getMessage()
                assert await eventually(lambda: end_reason(caplog, session)) is not None
            await ask(other, 1)
    assert errors_logged(caplog) == []


# -- writes blocked on a client that reads nothing ----------------------------------------
async def test_a_write_blocked_on_a_silent_client_ends_when_another_session_closes_it(
    make_server, caplog, writable_waits
):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server, _ = make_app(make_server)
    async with serving(server) as (host, port):
        async with await connect(host, port, rcvbuf=SMALL_RCVBUF) as silent:
            await ask(silent, 0)
            session = await session_for(server, silent)
            lock_send_buffer(session)
            await silent.send(json_packet({"flood": 1}))  # and never read
            channel = session.client._channel
            await eventually(lambda: channel.socket.fileno() in writable_waits)
            await settle()
            assert channel.writing  # blocked, waiting for room
            async with await connect(host, port) as boss:
                with trio.fail_after(LIVENESS):
                    assert await boss.request({"kick": 1}) == {"kicked": 1}
                # The blocked write ended, the session with it.
                reason = await eventually(lambda: end_reason(caplog, session))
                assert reason == "connection lost while replying"
                assert session_of(server, silent) is None
                # The silent client finds the connection closed after what was written.
                with trio.fail_after(LIVENESS):
                    while await silent.stream.receive_some(MiB):
                        pass
                await ask(boss, 0)
            # A new connection (likely on the closed one's descriptor number) gets its
            # own replies and nothing else.
            async with await connect(host, port) as newcomer:
                for n in range(3):
                    await ask(newcomer, n)
                await newcomer.assert_silent(0.3)
    assert errors_logged(caplog) == []


async def test_a_client_resetting_in_the_middle_of_a_big_reply_only_ends_its_session(
    make_server, caplog, writable_waits
):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server, _ = make_app(make_server)
    async with serving(server) as (host, port):
        async with await connect(host, port) as other:
            await ask(other, 0)
            resetting = await connect(host, port, rcvbuf=SMALL_RCVBUF)
            await ask(resetting, 0)
            session = await session_for(server, resetting)
            lock_send_buffer(session)
            await resetting.send(json_packet({"big": 4 * MiB}))
            channel = session.client._channel
            with trio.fail_after(LIVENESS):
                first = await resetting.stream.receive_some(65536)
            assert first[4:6] == bytes([22, 0])  # the reply has begun...
            await eventually(lambda: channel.socket.fileno() in writable_waits)
            assert channel.writing  # ...and is far from written
            reset(resetting)
            assert await eventually(lambda: end_reason(caplog, session)) == (
                "connection lost while replying"
            )
            for n in range(1, 4):
                await ask(other, n)
            async with await connect(host, port) as newcomer:
                await ask(newcomer, 0)
                await newcomer.assert_silent(0.2)
    assert errors_logged(caplog) == []


async def test_a_write_queued_behind_one_cancelled_midway_raises_and_writes_nothing(
    make_server, writable_waits
):
    """Two tasks of one handler write; the first is cancelled in the middle of a big
    packet, with the second waiting for its turn. The bytes of the second must not
    follow the cut packet on the wire (the client would read garbage): it raises
    ``BrokenResourceError`` instead.

    (Regression: the first version of the direct-write Channel checked ``interrupted``
    before queueing only, so the queued write went out after the cut packet.)"""
    server = make_server()
    control: dict = {"scope": trio.CancelScope(), "queue": trio.Event(), "outcome": None}

    @server.add_handler()
    async def two_writers(client, packet):
        if "two" not in packet:
            await client.send(packet)
            return

        async def big() -> None:
            with control["scope"]:
                await client.send(reply(client, big="b" * (4 * MiB)))

        async def small() -> None:
            await control["queue"].wait()
            try:
                await client.send(reply(client, small="MARKER"))
            except trio.BrokenResourceError:
                control["outcome"] = "broken"
            else:
                control["outcome"] = "written"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(big)
            nursery.start_soon(small)

    async with serving(server) as (host, port):
        async with await connect(host, port, rcvbuf=SMALL_RCVBUF) as wire:
            await ask(wire, 0)
            session = await session_for(server, wire)
            lock_send_buffer(session)
            await wire.send(json_packet({"two": 1}))
            channel = session.client._channel
            await eventually(lambda: channel.socket.fileno() in writable_waits)  # big is blocked
            control["queue"].set()
            await settle()  # small is queued behind it
            assert control["outcome"] is None
            control["scope"].cancel()
            # Read all that comes (room for a queued write, if one went out after all).
            received = bytearray()
            with trio.fail_after(LIVENESS):
                while True:
                    with trio.move_on_after(0.5):
                        data = await wire.stream.receive_some(MiB)
                        assert data, "the server closed the session"
                        received += data
                        continue
                    break
            await eventually(lambda: control["outcome"] is not None)
            assert channel.interrupted
            announced = int.from_bytes(received[:4], "big")
            assert 0 < len(received) - 4 < announced  # the big packet was cut...
            assert b"MARKER" not in received  # ...and nothing followed it
            assert control["outcome"] == "broken"
