"""A Redis that stalls instead of failing: ``CLIENT PAUSE`` on a real redis-server.

A paused Redis accepts connections and commands and answers none of them until the
pause ends. Admission runs in worker threads (16 at a time, each blocked up to
redis-py's 2-second socket timeout), so without a deadline a burst of connections
queued behind them: 80 connections took 8 s to be answered. With ``store_timeout``,
every connection is answered ``ERR_UNAVAILABLE`` within ``store_timeout``, or within
the socket timeout for those whose command had already been sent (the batch in
flight), and the server serves again as soon as Redis does.
"""

from __future__ import annotations

import logging

import redis
import trio

from tests.conftest import serving
from tests.e2e.wire import Wire, json_error

UNAVAILABLE = json_error("ERR_UNAVAILABLE")
CONNECTIONS = 80
PAUSE_MS = 8000


async def test_admissions_a_paused_redis_does_not_answer_are_refused_promptly(own_redis, make_server, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_server(store=own_redis.url, session_limit=100, store_timeout=0.5, timeout=30)

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)
    control = redis.Redis.from_url(own_redis.url)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as warm:  # the pool is connected
            assert await warm.request({"warm": 1}) == {"warm": 1}
        await trio.sleep(0.2)  # its release is done
        control.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        paused_at = trio.current_time()
        answered: list[float] = []

        async def connect() -> None:
            async with await Wire.connect(host, port) as wire:
                started = trio.current_time()
                await wire.send(b"")  # a client with nothing to say yet: admission alone
                # Without a deadline, the last of them waited 8 s and more.
                assert await wire.read_packet(timeout=6) == UNAVAILABLE
                answered.append(trio.current_time() - started)
                await wire.read_eof()

        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTIONS):
                nursery.start_soon(connect)
        assert len(answered) == CONNECTIONS
        assert trio.current_time() - paused_at < PAUSE_MS / 1000  # all during the pause
        # Once the pause is over, the server admits again, without a restart.
        await trio.sleep(PAUSE_MS / 1000 - (trio.current_time() - paused_at) + 0.5)
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"after": 1}) == {"after": 1}
    control.close()
    refusals = [r.getMessage() for r in caplog.records if "Session store unavailable" in r.getMessage()]
    # Logged at most once a second, the rest counted: not 80 lines.
    assert 1 <= len(refusals) < 10
    assert any("no answer within store_timeout (0.5s)" in m for m in refusals)
    # The refusals not logged are counted: in a later refusal's line, or at the end.
    counted = [
        r.getMessage()
        for r in caplog.records
        if "refused with the session store unavailable" in r.getMessage() or "refused alike since" in r.getMessage()
    ]
    assert counted or len(refusals) == CONNECTIONS
