"""The reactor (``asyncapy.reactor``) against a real server on loopback, over both
serving paths (see ``BOTH_PATHS`` in this folder's conftest): what it must keep of the
task-per-session path's behaviour, and what it adds (one connection's flood cannot
starve the others; a handler that waits does not stop the rest).

No assertion here is about speed (``make bench`` measures that): each is an order of
events, a count or a value."""

from __future__ import annotations

import contextvars
import logging

import pytest
import trio

from asyncapy import reactor as reactor_module
from asyncapy.logs import SESSION_ID
from asyncapy.server import Server

from ..conftest import serving
from .wire import Wire, json_packet

LIVENESS = 10.0

REQUESTS: contextvars.ContextVar[int] = contextvars.ContextVar("requests_seen", default=0)


def served_by_reactor(server: Server) -> bool:
    return server._sessions.reactor.running


async def test_the_reactor_serves_by_default_and_not_when_turned_off(make_server, serving_path):
    for setting, expected in ((True, serving_path == "reactor"), (False, False)):
        server = make_server(reactor=setting)

        @server.add_handler()
        async def echo(client, packet):
            await client.send(packet)

        async with serving(server) as (host, port):
            async with await Wire.connect(host, port) as wire:
                assert await wire.request({"n": 1}) == {"n": 1}
                assert served_by_reactor(server) is expected
                [protocol_state] = server._sessions.states.values()
                assert protocol_state.waiting


async def test_a_handler_that_waits_does_not_stop_the_other_sessions(make_server, serving_path):
    """A's handler waits for an event only B's request sets: if it held up the reactor,
    B would never be served, and the test would hang until its deadline."""
    server = make_server()
    released = trio.Event()

    @server.add_handler()
    async def handler(client, packet):
        if "wait" in packet:
            await released.wait()
        elif "release" in packet:
            released.set()
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as a, await Wire.connect(host, port) as b:
            for wire in (a, b):  # the first two turns are the session task's own
                for n in range(2):
                    assert await wire.request({"warm": n}) == {"warm": n}
            with trio.fail_after(LIVENESS):
                await a.send(json_packet({"wait": 1}) + json_packet({"after": 1}))
                await a.assert_silent(0.1)
                assert await b.request({"release": 1}) == {"release": 1}
                assert await a.read_json() == {"wait": 1}
                assert await a.read_json() == {"after": 1}  # in order, after the wait
                assert await b.request({"again": 1}) == {"again": 1}
    if serving_path == "reactor":
        assert server._sessions.reactor.handoffs >= 1


async def test_suspending_handlers_keep_each_sessions_replies_in_order(make_server):
    server = make_server()

    @server.add_handler()
    async def handler(client, packet):
        if packet["n"] % 3 == 0:
            await trio.sleep(0.001 * (packet["n"] % 5))
        await client.send(packet)

    async with serving(server) as (host, port):

        async def session() -> None:
            async with await Wire.connect(host, port) as wire:
                await wire.send(b"".join(json_packet({"n": n}) for n in range(60)))
                for n in range(60):
                    assert await wire.read_json() == {"n": n}

        with trio.fail_after(LIVENESS):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(session)


async def test_a_pipelined_flood_cannot_starve_another_connection(make_server, serving_path):
    """A writes 60,000 pipelined requests at once and reads its replies as they come;
    B sends one request once A's first reply is back. B's request must be handled
    while most of A's flood is still waiting (a per-pass bound on A's packets), not
    after it: the server counts A's handled requests when B's is handled."""
    server = make_server()
    flood = 60_000
    handled = {"a": 0, "a_when_b": -1}

    @server.add_handler()
    async def echo(client, packet):
        if "b" in packet:
            handled["a_when_b"] = handled["a"]
        else:
            handled["a"] += 1
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as a, await Wire.connect(host, port) as b:
            assert await b.request({"b": 0}) == {"b": 0}

            async def read_flood() -> None:
                for _ in range(flood - 1):
                    await a.read_packet(timeout=LIVENESS * 3)

            with trio.fail_after(LIVENESS * 3):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.send, b"".join(json_packet({"a": i}) for i in range(flood)))
                    await a.read_packet(timeout=LIVENESS)
                    nursery.start_soon(read_flood)
                    assert await b.request({"b": 1}) == {"b": 1}
    assert 0 < handled["a_when_b"] < flood // 2, handled
    if serving_path == "reactor":
        assert server._sessions.reactor.passes > flood // reactor_module.PACKETS_PER_PASS // 2


async def test_handlers_run_in_their_sessions_context(make_server):
    """Log records of a handler name its session (``log_context``), and a context
    variable a handler sets is its session's alone, as in a task per session."""
    server = make_server()

    @server.add_handler()
    async def handler(client, packet):
        REQUESTS.set(REQUESTS.get() + 1)
        await client.send({"session": SESSION_ID.get(), "seen": REQUESTS.get()})

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as a, await Wire.connect(host, port) as b:
            first = await a.request({})
            assert (await a.request({}))["seen"] == 2
            other = await b.request({})
            ids = {str(s.session_id) for s in server._sessions.live.values()}
            assert {first["session"], other["session"]} == ids
            assert other["seen"] == 1


class Ending(Server):
    """Records the reason of every session's end."""

    def __init__(self, **settings) -> None:
        super().__init__(addr="127.0.0.1", port=0, **settings)
        self.ended: list = []

    async def session_ended(self, client, reason) -> None:
        self.ended.append(reason)


async def test_a_session_closed_by_another_sessions_handler_ends():
    server = Ending(timeout=5)
    ended = server.ended

    @server.add_handler()
    async def handler(client, packet):
        if "close_others" in packet:
            for session in await client.get_sessions():
                if session.client is not client:
                    await session.close()
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as victim, await Wire.connect(host, port) as admin:
            assert await victim.request({"hello": 1}) == {"hello": 1}
            assert await admin.request({"close_others": 1}) == {"close_others": 1}
            await victim.read_eof(timeout=LIVENESS)
            with trio.fail_after(LIVENESS):
                while not ended:
                    await trio.sleep(0.01)
            assert len(server._sessions.live) == 1
            assert await admin.request({"still": 1}) == {"still": 1}
    assert ended[0] in ("closed by a handler", "connection lost")


async def test_a_handler_blocking_the_loop_is_logged_past_handler_timeout(make_server, caplog):
    """A handler that blocks without awaiting blocks the reactor's task as it blocked the
    session's before; once it awaits past ``handler_timeout``, it is cancelled and
    logged, and the other session is served again."""
    import time

    server = make_server(handler_timeout=0.2)

    @server.add_handler()
    async def handler(client, packet):
        if "block" in packet:
            time.sleep(0.3)  # noqa: ASYNC251 - blocks the event loop, on either path
            await trio.sleep(5)  # then waits: cancelled at handler_timeout
        await client.send(packet)

    caplog.set_level(logging.WARNING, logger="asyncapy.server")
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as a, await Wire.connect(host, port) as b:
            await a.send(json_packet({"block": 1}))
            error = await a.read_json(timeout=LIVENESS)
            assert error["error"] == "ERR_INTERNAL"
            assert await b.request({"other": 1}) == {"other": 1}
    assert any("ran past handler_timeout" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("size", [1_000, 200_000])
async def test_replies_the_kernel_cannot_take_at_once_arrive_whole(make_server, size):
    """A reply larger than the socket's buffer is finished when the socket is writable
    again; the session reads nothing more meanwhile, and the next reply follows it."""
    server = make_server(max_packet_size=1_000_000)

    @server.add_handler()
    async def handler(client, packet):
        await client.send({"blob": "x" * packet["size"], "n": packet["n"]})

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"size": size, "n": 1}) + json_packet({"size": 10, "n": 2}))
            first = await wire.read_json(timeout=LIVENESS)
            assert (len(first["blob"]), first["n"]) == (size, 1)
            assert await wire.read_json(timeout=LIVENESS) == {"blob": "x" * 10, "n": 2}


@pytest.mark.keep_join_after
async def test_a_session_joins_the_reactor_after_its_own_task_answered_twice(make_server, serving_path):
    """By default a session's own task answers its first requests (two turns with
    packets: ``JOIN_AFTER``), so a connection that makes one request and closes never
    wakes the reactor; the third request of one that goes on is served by a pass."""
    assert serving_path == "reactor" and reactor_module.JOIN_AFTER == 2
    server = make_server()

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    async with serving(server) as (host, port):
        reactor = server._sessions.reactor
        passes = reactor.passes
        for n in range(5):  # one request per connection, then close
            async with await Wire.connect(host, port) as wire:
                assert await wire.request({"n": n}) == {"n": n}
        await trio.sleep(0.05)
        assert reactor.passes == passes
        async with await Wire.connect(host, port) as wire:
            for n in range(2):
                assert await wire.request({"n": n}) == {"n": n}
            assert reactor.passes == passes
            for n in range(2, 5):
                assert await wire.request({"n": n}) == {"n": n}
            assert reactor.passes >= passes + 3


@pytest.mark.keep_join_after
async def test_a_session_whose_handlers_keep_waiting_leaves_for_its_own_task():
    """A handler that awaits something on every request costs a hand-off per request in
    the reactor; after LEAVE_AFTER such turns in a row the session is served by its own
    task, in order, to its end, and the reactor serves the others as before."""
    server = Ending(timeout=5)

    @server.add_handler()
    async def handler(client, packet):
        if "io" in packet:
            await trio.sleep(0.001)  # a database call, say
        await client.send(packet)

    async with serving(server) as (host, port):
        reactor = server._sessions.reactor
        async with await Wire.connect(host, port) as waiting, await Wire.connect(host, port) as quick:
            for n in range(reactor_module.LEAVE_AFTER + 6):
                assert await waiting.request({"io": n}) == {"io": n}
                assert await quick.request({"n": n}) == {"n": n}
            assert reactor.left == 1, (reactor.handoffs, reactor.passes)
            await waiting.send(b"".join(json_packet({"io": n, "p": 1}) for n in range(5)))
            for n in range(5):
                assert await waiting.read_json() == {"io": n, "p": 1}
        with trio.fail_after(LIVENESS):
            while len(server.ended) < 2:
                await trio.sleep(0.01)
    assert server.ended == ["client closed the connection"] * 2
