"""``Server.session_ended(client, reason)``: called once for every admitted session
once it has ended, with the reason its log line gives, after its connection is closed
and its session released; never for a refused connection; shielded, bounded, and
isolated from the server when it raises."""

from __future__ import annotations

import logging

import trio

from asyncapy import Server
from asyncapy.core import Client
from tests.conftest import serving

from .wire import Wire, json_error, json_packet

LIVENESS = 10


class Recording(Server):
    """Records each call: (session id, reason, closed?, still among its sessions?)."""

    def __init__(self, **settings) -> None:
        super().__init__(addr="127.0.0.1", port=0, **settings)
        self.ended: list = []
        self.ended_event = trio.Event()

    async def session_ended(self, client: Client, reason: str) -> None:
        live = {str(s.session_id) for s in await client.get_sessions()}
        self.ended.append((str(client.session.session_id), reason, client.closed,
                           str(client.session.session_id) in live))
        self.ended_event.set()


def with_handlers(server: Server) -> Server:
    server.hanging = trio.Event()  # set once a handler hangs

    @server.add_handler()
    async def app(client, packet):
        if "bye" in packet:
            await client.close()
        elif "hang" in packet:
            server.hanging.set()
            await trio.sleep_forever()
        else:
            await client.send(packet)

    return server


async def wait_ended(server: Recording, count: int) -> None:
    with trio.fail_after(LIVENESS):
        while len(server.ended) < count:
            await trio.sleep(0.01)


async def test_a_client_closing_ends_its_session_once_closed_and_released():
    server = with_handlers(Recording())
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"n": 1}) == {"n": 1}
            [session] = server._sessions.live.values()
        await wait_ended(server, 1)
    assert server.ended == [(str(session.session_id), "client closed the connection", True, False)]


async def test_a_handler_closing_and_an_idle_timeout_give_their_reasons():
    server = with_handlers(Recording(timeout=0.3))
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as closing, await Wire.connect(host, port) as idle:
            await closing.send(json_packet({"bye": 1}))
            await closing.read_eof(timeout=LIVENESS)
            assert await idle.read_packet(timeout=LIVENESS) == json_error("ERR_TIMED_OUT")
            await wait_ended(server, 2)
    assert sorted(reason for _, reason, _, _ in server.ended) == ["closed by a handler", "timed out"]


async def test_a_refused_connection_is_no_session_and_calls_nothing():
    server = with_handlers(Recording(session_limit=1))
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as first:
            assert await first.request({"n": 1}) == {"n": 1}
            async with await Wire.connect(host, port) as second:
                assert await second.read_packet(timeout=LIVENESS) == json_error("ERR_SESSION_LIMIT_REACHED")
            await trio.sleep(0.1)
            assert server.ended == []
        await wait_ended(server, 1)
    assert len(server.ended) == 1


async def test_a_raising_hook_is_logged_and_the_server_goes_on(caplog):
    class Failing(Server):
        async def session_ended(self, client, reason):
            raise RuntimeError("presence backend down")

    server = with_handlers(Failing(addr="127.0.0.1", port=0))
    with caplog.at_level(logging.INFO, logger="asyncapy"):
        async with serving(server) as (host, port):
            for n in range(2):
                async with await Wire.connect(host, port) as wire:
                    assert await wire.request({"n": n}) == {"n": n}
            with trio.fail_after(LIVENESS):
                while sum("session_ended() raised" in r.getMessage() for r in caplog.records) < 2:
                    await trio.sleep(0.01)
    failures = [r for r in caplog.records if "session_ended() raised" in r.getMessage()]
    assert len(failures) == 2 and all(r.levelno == logging.ERROR and r.exc_info for r in failures)


async def test_the_hook_runs_during_a_shutdown_and_cannot_hold_it_past_the_grace(caplog):
    """Sessions ended by a shutdown get the hook too (it is shielded), and a hook that
    never returns is cancelled after shutdown_grace, so the server still stops."""

    class Hanging(Recording):
        async def session_ended(self, client, reason):
            await super().session_ended(client, reason)
            await trio.sleep_forever()

    server = with_handlers(Hanging(shutdown_grace=0.3))
    with caplog.at_level(logging.INFO, logger="asyncapy"):
        with trio.fail_after(LIVENESS):
            async with serving(server) as (host, port):
                wire = await Wire.connect(host, port)
                assert await wire.request({"n": 1}) == {"n": 1}
            # serving() returned: the server stopped, the hook was cut off.
    await wire.aclose()
    assert [reason for _, reason, _, _ in server.ended] == ["server shutting down"]
    assert any("ran past shutdown_grace" in r.getMessage() for r in caplog.records)


async def test_the_hook_of_a_session_cancelled_past_the_grace_can_still_await():
    """A session still busy when the grace period ends is cancelled; its hook still
    runs, shielded, and can await (here, 50 ms) before it records."""

    class Slow(Recording):
        async def session_ended(self, client, reason):
            await trio.sleep(0.05)
            await super().session_ended(client, reason)

    server = with_handlers(Slow(shutdown_grace=0.2))
    with trio.fail_after(LIVENESS):
        async with serving(server) as (host, port):
            wire = await Wire.connect(host, port)
            assert await wire.request({"n": 1}) == {"n": 1}
            await wire.send(json_packet({"hang": 1}))
            with trio.fail_after(LIVENESS):
                await server.hanging.wait()
    await wire.aclose()
    assert [reason for _, reason, _, _ in server.ended] == ["cancelled"]


async def test_a_server_without_the_hook_does_not_call_it(monkeypatch):
    server = with_handlers(Server(addr="127.0.0.1", port=0))
    called: list = []

    async def spy(client, reason):
        called.append(reason)

    monkeypatch.setattr(server._sessions, "_call_session_ended", spy)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"n": 1}) == {"n": 1}
        await trio.sleep(0.1)
    assert called == []
