"""A running server whose Redis goes away, and comes back (a redis-server of the test's
own, stopped and restarted on the same port; no persistence, so its data is lost).

While Redis is down:
* sessions already admitted keep being served: a packet needs no store;
* a new connection is refused at once with ``ERR_UNAVAILABLE`` (JSON) and EOF;
* a packet whose API key cannot be checked, or whose handler asks for
  ``get_sessions()``, is answered ``ERR_UNAVAILABLE`` ("retry later", not "bad key", not
  ``ERR_INTERNAL``), goes no further, and costs one log line; the session goes on;
* a session ending cannot be released in Redis, which is logged, not fatal.
When Redis is back, without restarting the server: new sessions are admitted again,
keys work again, and the renewals put the live sessions back into Redis, so the limit
counts them again.
"""

from __future__ import annotations

import logging

import pytest
import redis
import trio

from asyncapy import APIKeyFactory, Filters, Packet
from asyncapy.domain.errors import StoreUnavailable
from tests.conftest import serving
from tests.e2e.wire import Wire, json_error

UNAVAILABLE = json_error("ERR_UNAVAILABLE")
UNAVAILABLE_REPLY = {"status": "failure", "error": "ERR_UNAVAILABLE"}
LIMIT_REACHED = json_error("ERR_SESSION_LIMIT_REACHED")


async def refused_with(host: str, port: int, error: bytes) -> float:
    """Connect, expect exactly ``error`` then EOF; return how long the refusal took."""
    start = trio.current_time()
    async with await Wire.connect(host, port) as wire:
        assert await wire.read_packet() == error
        await wire.read_eof()
    return trio.current_time() - start


async def test_a_redis_outage_refuses_new_sessions_and_keys_and_recovers(own_redis, make_server, caplog):
    caplog.set_level(logging.WARNING)
    server = make_server(store=own_redis.url, session_limit=2, session_lease=1)
    keys = APIKeyFactory(store=own_redis.url)
    ask = Filters.Fields(key=None, ask=None)

    @server.add_handler(ask, Filters.APIFactory(keys, "key"))
    async def granted(client, packet):
        await client.send(Packet({"answer": "granted"}, encoding=client.encoding))

    @server.add_handler(ask)
    async def denied(client, packet):
        await client.send(Packet({"answer": "denied"}, encoding=client.encoding))

    @server.add_handler(Filters.Fields(sessions=None))
    async def count(client, packet):
        await client.send(Packet({"sessions": len(await client.get_sessions())}, encoding=client.encoding))

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    key = await keys.aissue({"user": "frank"})
    async with serving(server) as (host, port):
        held = await Wire.connect(host, port)
        doomed = await Wire.connect(host, port)
        assert await held.request({"n": 1}) == {"n": 1}
        assert await doomed.request({"n": 1}) == {"n": 1}
        assert await held.request({"key": key, "ask": "?"}) == {"answer": "granted"}
        assert await held.request({"sessions": "?"}) == {"sessions": 2}
        assert await refused_with(host, port, LIMIT_REACHED) < 1

        own_redis.stop()
        # Admitted sessions go on: a packet costs no store call...
        assert await held.request({"n": 2}) == {"n": 2}
        # ...but a key cannot be checked: "retry later", and no handler runs (not even
        # the unguarded `denied` after it); the session goes on.
        caplog.clear()
        assert await held.request({"key": key, "ask": "?"}) == UNAVAILABLE_REPLY
        assert await held.request({"sessions": "?"}) == UNAVAILABLE_REPLY
        outage_lines = [r for r in caplog.records if "ERR_UNAVAILABLE" in r.getMessage()]
        assert len(outage_lines) == 2, [r.getMessage() for r in caplog.records]
        assert "not checked" in outage_lines[0].getMessage()
        assert "count" in outage_lines[1].getMessage()
        assert not [r for r in outage_lines if r.exc_info], "a traceback for an outage"
        assert await held.request({"n": 2.5}) == {"n": 2.5}
        # New sessions are refused, and promptly (a closed port fails at once).
        assert await refused_with(host, port, UNAVAILABLE) < 1
        # A session ending now cannot be released in Redis: logged, nothing breaks.
        await doomed.aclose()
        await trio.sleep(0.7)  # two renewal periods fail meanwhile, logged once
        assert await held.request({"n": 3}) == {"n": 3}
        assert await refused_with(host, port, UNAVAILABLE) < 1

        own_redis.start()  # same port, empty: the key and the leases are gone
        assert await held.request({"key": key, "ask": "?"}) == {"answer": "denied"}
        fresh = await keys.aissue({"user": "grace"})
        assert await held.request({"key": fresh, "ask": "?"}) == {"answer": "granted"}
        # The next renewal (every 1/3 s) puts the held session back into Redis...
        with trio.fail_after(2):
            while await server.store.sessions("127.0.0.1") == []:
                await trio.sleep(0.05)
        assert len(await server.store.sessions("127.0.0.1")) == 1  # not the one that ended
        # ...so one new session fits under the limit of two, and a second does not.
        async with await Wire.connect(host, port) as again:
            assert await again.request({"back": True}) == {"back": True}
            assert await again.request({"key": fresh, "ask": "?"}) == {"answer": "granted"}
            assert await refused_with(host, port, LIMIT_REACHED) < 1
        assert await held.request({"n": 4}) == {"n": 4}
        await held.aclose()

    messages = [record.getMessage() for record in caplog.records]
    assert any("Session store unavailable, refusing 127.0.0.1" in m for m in messages)
    assert sum("Could not release a session in Redis" in m for m in messages) == 1  # once per outage
    assert any("not checked" in m and "replied ERR_UNAVAILABLE" in m for m in messages)
    assert sum("Cannot renew session leases" in m for m in messages) == 1
    # Every failure was an expected StoreUnavailable: no traceback at ERROR anywhere.
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR], messages


async def test_a_redis_refusing_writes_is_unavailable_too(own_redis, make_server):
    """Not only a lost connection: a Redis that answers but refuses the command (here
    it wants a replica to write; after a failover it is read-only, or out of memory)
    refuses new sessions with ERR_UNAVAILABLE and makes key writes fail the same way."""
    server = make_server(store=own_redis.url, session_limit=1)

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    keys = APIKeyFactory(store=own_redis.url)
    key = await keys.aissue("before")
    admin = redis.Redis.from_url(own_redis.url)
    async with serving(server) as (host, port):
        admin.config_set("min-replicas-to-write", 1)
        try:
            assert await refused_with(host, port, UNAVAILABLE) < 1
            with pytest.raises(StoreUnavailable, match="refused the command: NOREPLICAS"):
                await keys.aissue("during")
            assert await keys.aget(key) == "before"  # reads still work
        finally:
            admin.config_set("min-replicas-to-write", 0)
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"ok": 1}) == {"ok": 1}
    admin.close()


async def test_a_server_started_while_redis_is_down_says_so_once_then_serves(own_redis, make_server, caplog):
    """The start line alone would look normal: one warning says the store cannot be
    reached (and what clients get meanwhile); once Redis is up, sessions are admitted."""
    caplog.set_level(logging.INFO)
    own_redis.stop()
    server = make_server(store=own_redis.url)

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    async with serving(server) as (host, port):
        with trio.fail_after(10):
            while not any("cannot be reached" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.05)
        assert await refused_with(host, port, UNAVAILABLE) < 5
        own_redis.start()
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"back": True}) == {"back": True}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage() and not warnings[0].exc_info
    assert "ERR_UNAVAILABLE" in warnings[0].getMessage() and "RedisSessionStore" in warnings[0].getMessage()


async def test_a_server_whose_store_is_up_gives_no_such_warning(redis_server, make_server, caplog):
    caplog.set_level(logging.INFO)
    server = make_server(store=redis_server.url)

    @server.add_handler()
    async def echo(client, packet):
        await client.send(packet)

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"up": True}) == {"up": True}
    assert not [r for r in caplog.records if "cannot be reached" in r.getMessage()]
