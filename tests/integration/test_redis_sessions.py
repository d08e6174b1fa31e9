"""Sessions as leases in a real Redis (adapters/redis.py ``RedisSessionStore``).

Beyond the session-store contract, a shared store promises:

* a session whose process died (stopped renewing without releasing) disappears
  ``lease`` seconds after its last renewal, by itself, and its slot is free again;
* renewing keeps leases alive past the lease time, and a released session is never
  brought back by a renewal;
* admission and release are one round trip each, and renewal is **one** round trip
  per period for all of a process's sessions, whatever their number;
* ``client.get_sessions()`` in a handler lists the sessions other servers sharing the
  Redis hold (``client`` None, their ``server_id``), however many (20,000 here);
* a config file's ``store`` and ``session_lease`` open that Redis store, with that lease.

A "process" here is a store instance with its own Redis client; the real multi-process
tests are in test_redis_processes.py.
"""

from __future__ import annotations

import logging
import time
import uuid

import fakeredis
import pytest
import redis
import trio

from asyncapy import Packet, Server
from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.adapters.redis import RedisSessionStore, connect
from asyncapy.config import ConfigError, load_config
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import SessionRecord, run_to_completion
from tests.conftest import serving
from tests.e2e.wire import Wire

ADDRESS = "198.51.100.20"
OTHER = "2001:db8::20"


def record(address: str = ADDRESS, server_id: str = "server-x") -> SessionRecord:
    return SessionRecord(str(uuid.uuid4()), address, time.time(), server_id)


def ids(records: list[SessionRecord]) -> set[str]:
    return {r.session_id for r in records}


# -- leases --------------------------------------------------------------------------
async def test_a_dead_processs_session_expires_after_the_lease(redis_url):
    # A steady process with a long lease holds one of the address's two slots...
    steady = RedisSessionStore(connect(redis_url), lease=30)
    kept = record(server_id="steady")
    assert await steady.admit(kept, 2) is True
    # ...a process with a 1 s lease takes the other, and dies.
    dead = RedisSessionStore(connect(redis_url), lease=1)
    held = record(server_id="dead")
    start = trio.current_time()
    assert await dead.admit(held, 2) is True
    del dead  # "killed": no release, no renewal, ever

    survivor = RedisSessionStore(connect(redis_url), lease=1)
    newcomer = record(server_id="survivor")
    assert await survivor.admit(newcomer, 2) is False
    assert await survivor.sessions(ADDRESS) == [kept, held]

    await trio.sleep_until(start + 0.6)  # well inside the lease: still held
    assert await survivor.admit(newcomer, 2) is False
    assert await survivor.sessions(ADDRESS) == [kept, held]

    await trio.sleep_until(start + 1.15)  # past it: gone, nobody cleaned up, and the
    assert await survivor.sessions(ADDRESS) == [kept]  # short lease cut no other one
    assert await survivor.admit(newcomer, 2) is True
    assert await survivor.sessions(ADDRESS) == [kept, newcomer]
    await survivor.release(newcomer)
    await steady.release(kept)
    await survivor.aclose()
    await steady.aclose()


async def test_an_expired_lease_leaves_no_keys_behind(redis_url):
    store = RedisSessionStore(connect(redis_url), lease=1)
    start = trio.current_time()
    assert await store.admit(record(), 0) is True
    assert await store.admit(record(OTHER), 0) is True
    inspector = redis.Redis.from_url(redis_url)
    names = inspector.keys()
    assert len(names) == 4  # a sorted set and a hash per address
    assert all(0 < inspector.pttl(name) <= 1000 for name in names)
    await trio.sleep_until(start + 1.15)
    assert inspector.exists(*names) == 0
    inspector.close()
    await store.aclose()


async def test_renewal_keeps_leases_alive_past_the_lease(redis_url):
    alive = RedisSessionStore(connect(redis_url), lease=1)
    observer = RedisSessionStore(connect(redis_url), lease=1)
    held = [record(), record(), record(OTHER)]
    for r in held:
        assert await alive.admit(r, 2) is True
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alive.maintain)
        await trio.sleep_until(start + 1.6)  # 1.6 leases: renewed every 1/3 s
        assert ids(await observer.sessions(ADDRESS)) == ids(held[:2])
        assert ids(await observer.sessions(OTHER)) == ids(held[2:])
        assert await observer.admit(record(), 2) is False
        nursery.cancel_scope.cancel()  # the process stops renewing...
    stopped = trio.current_time()
    await trio.sleep_until(stopped + 1.15)  # ...and its leases run out
    assert await observer.sessions(ADDRESS) == []
    assert await observer.sessions(OTHER) == []
    await alive.aclose()
    await observer.aclose()


async def test_a_released_session_is_not_renewed_back_to_life(redis_url):
    store = RedisSessionStore(connect(redis_url), lease=1)
    kept, released = record(), record()
    assert await store.admit(kept, 0) is True
    assert await store.admit(released, 0) is True
    assert await store.renew() == 2
    await store.release(released)
    assert await store.renew() == 1
    assert await store.sessions(ADDRESS) == [kept]
    await store.release(kept)
    assert await store.renew() == 0
    assert await store.sessions(ADDRESS) == []
    await store.aclose()


# -- round trips ----------------------------------------------------------------------
class CountingConnection(redis.Connection):
    """A redis-py connection that counts its writes to the socket: one per round trip
    (a pipeline or a script is one write, however many commands it carries)."""

    writes = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.writes += 1
        return super().send_packed_command(command, check_health)


@pytest.fixture
def counting_client(redis_url):
    client = redis.Redis(
        connection_pool=redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    )
    CountingConnection.writes = 0
    yield client
    client.close()


async def test_admission_release_and_renewal_are_one_round_trip_each(redis_url, counting_client):
    store = RedisSessionStore(counting_client, lease=30)
    warm = record()
    assert await store.admit(warm, 0) is True  # connects and loads the scripts...
    await store.renew()
    await store.release(warm)

    def round_trips_of() -> int:
        before, CountingConnection.writes = CountingConnection.writes, 0
        return before

    async def released(r) -> None:  # a release is posted: wait until it has landed
        with trio.fail_after(2):
            while redis.Redis.from_url(redis_url).zscore(f"asyncapy:sessions:{r.address}", r.session_id):
                await trio.sleep(0.005)

    await released(warm)
    round_trips_of()
    first = record()
    assert await store.admit(first, 5) is True
    assert round_trips_of() == 1
    await store.release(first)  # posted: it goes with the next batch, or alone
    await released(first)
    assert round_trips_of() == 1

    held = [record(address) for address in (ADDRESS, OTHER, "192.0.2.9") for _ in range(10)]
    for r in held:
        assert await store.admit(r, 0) is True
    assert round_trips_of() == 30
    inspector = redis.Redis.from_url(redis_url)
    before = {r.session_id: inspector.zscore(f"asyncapy:sessions:{r.address}", r.session_id) for r in held}
    await trio.sleep(0.01)
    assert await store.renew() == 30
    assert round_trips_of() == 1  # thirty sessions, three addresses: one round trip
    for r in held:
        assert inspector.zscore(f"asyncapy:sessions:{r.address}", r.session_id) > before[r.session_id]
    inspector.close()


async def test_maintain_renews_all_sessions_in_one_round_trip_per_period(counting_client):
    store = RedisSessionStore(counting_client, lease=1)
    held = [record(address) for address in (ADDRESS, OTHER) for _ in range(20)]
    for r in held:
        assert await store.admit(r, 0) is True
    await store.renew()  # loads the renewal script
    renewals: list[int] = []
    renew = store.renew

    async def counted_renew() -> int:
        renewals.append(await renew())
        return renewals[-1]

    store.renew = counted_renew
    CountingConnection.writes = 0
    with trio.move_on_after(1.1):  # periods of 1/3 s: three renewals, give or take one
        await store.maintain()
    assert len(renewals) >= 2
    assert renewals == [40] * len(renewals)
    assert CountingConnection.writes == len(renewals)


def _scheduled_store(lease: float) -> RedisSessionStore:
    return RedisSessionStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), lease=lease)


async def test_maintain_renews_every_third_of_the_lease(autojump_clock):
    store = _scheduled_store(lease=3)
    times: list[float] = []

    async def renew() -> int:
        times.append(trio.current_time())
        return 0

    store.renew = renew
    start = trio.current_time()
    with trio.move_on_after(10.5):
        await store.maintain()
    assert [round(t - start, 6) for t in times] == [float(n) for n in range(1, 11)]


async def test_maintain_survives_failing_renewals(autojump_clock, caplog):
    """Neither an unreachable Redis nor any other error ends the upkeep (it would take
    the whole server down with it): it logs and tries again next period."""
    caplog.set_level(logging.INFO, logger="asyncapy.redis")
    store = _scheduled_store(lease=3)
    failures = [StoreUnavailable("down"), StoreUnavailable("still down"), RuntimeError("odd"), None, None]
    calls: list[int] = []

    async def renew() -> int:
        calls.append(1)
        failure = failures[len(calls) - 1]
        if failure is not None:
            raise failure
        return 0

    store.renew = renew
    with trio.move_on_after(5.5):
        await store.maintain()
    assert len(calls) == 5
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncapy.redis"]
    assert messages.count("Cannot renew session leases: down") == 1  # not once per period
    assert "Renewing session leases failed" in messages
    assert "Redis reachable again: session leases renewed" in messages


# -- several servers, one Redis ------------------------------------------------------------
async def test_get_sessions_lists_the_sessions_of_another_server(redis_url, make_server):
    a = make_server(store=redis_url)
    b = make_server(store=redis_url)
    assert a.server_id != b.server_id

    @a.add_handler()
    async def list_sessions(client, packet):
        listed = await client.get_sessions()
        rows = [[str(s.session_id), s.client is None, s.server_id] for s in listed]
        reply = {"mine": str(client.session.session_id), "sessions": rows}
        await client.send(Packet(reply, encoding=client.encoding))

    @b.add_handler()
    async def who_am_i(client, packet):
        await client.send(Packet({"mine": str(client.session.session_id)}, encoding=client.encoding))

    async with serving(a) as (host_a, port_a), serving(b) as (host_b, port_b):
        async with await Wire.connect(host_b, port_b) as on_b:
            on_b_id = (await on_b.request({"hi": "b"}))["mine"]
            async with await Wire.connect(host_a, port_a) as on_a:
                reply = await on_a.request({"hi": "a"})
    assert reply["sessions"] == [
        [on_b_id, True, b.server_id],  # oldest first; held by B: no Client here
        [reply["mine"], False, a.server_id],
    ]


async def test_get_sessions_lists_twenty_thousand_sessions_of_one_address(redis_url, make_server):
    """A Lua script may not unpack() more than about 8,000 values into one call: the
    listing once failed past that ("too many results to unpack"). 20,000 sessions held
    by another server, plus the asking one, all listed, oldest first."""
    other = RedisSessionStore(connect(redis_url), lease=30)
    held = [SessionRecord(str(uuid.uuid4()), "127.0.0.1", 1_000_000_000.0 + n, "other") for n in range(20_000)]

    def seed() -> None:  # synchronously, in a worker thread: no thread hop per admission
        for session in held:
            assert run_to_completion(other.admit(session, 0)) is True

    await trio.to_thread.run_sync(seed)
    server = make_server(store=redis_url)

    @server.add_handler()
    async def count(client, packet):
        listed = await client.get_sessions()
        reply = {
            "count": len(listed),
            "first": str(listed[0].session_id),
            "last": [str(listed[-1].session_id), listed[-1].server_id],
            "theirs": sum(1 for s in listed if s.server_id == "other" and s.client is None),
        }
        await client.send(Packet(reply, encoding=client.encoding))

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            reply = await wire.request({"count": True})
    assert reply["count"] == 20_001
    assert reply["theirs"] == 20_000
    assert reply["first"] == held[0].session_id
    assert reply["last"] == [reply["last"][0], server.server_id]  # the newest: the asking one
    assert len(await other.sessions("127.0.0.1")) == 20_000  # the asking one has left
    await other.aclose()


def test_a_config_file_opens_the_shared_store_it_names(redis_url, tmp_path):
    """``store`` and ``session_lease`` from an INI file give a Redis store with that
    lease, whether the constructor reads the file or, as ``asyncapy run --config``
    and ``Server.load_config()`` do, the settings are assigned to an existing server."""
    config = tmp_path / "server.ini"
    config.write_text(f"[AsyncAPY]\nstore = {redis_url}\nsession_lease = 2\n")

    built = Server(config=str(config))
    assert isinstance(built.store, RedisSessionStore) and built.store.lease == 2

    assigned = Server()
    assert isinstance(assigned.store, MemorySessionStore)
    for name, value in load_config(str(config)).items():
        setattr(assigned, name, value)
    assert isinstance(assigned.store, RedisSessionStore) and assigned.store.lease == 2

    reloaded = Server(session_lease=7)
    reloaded.config = str(config)
    reloaded.load_config()
    assert isinstance(reloaded.store, RedisSessionStore) and reloaded.store.lease == 2

    reloaded.session_lease = 3  # a later lease applies to the store it opened
    assert reloaded.store.lease == 3
    own = MemorySessionStore()
    reloaded.store = own  # a store object is used as it is, whatever the lease
    reloaded.session_lease = 4
    assert reloaded.store is own
    with pytest.raises(ConfigError, match="invalid store"):
        reloaded.store = "postgres://nope"
