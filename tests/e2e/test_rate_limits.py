"""Rate limits on a real server: per client address, per API key, and the throttle on
failed key checks. A packet over a limit is answered ``ERR_RATE_LIMITED`` with
``retry_after``; its session goes on; other addresses and keys are not slowed.
(Across processes sharing Redis: tests/integration/test_rate_limits_redis.py.)"""

from __future__ import annotations

import trio

from asyncapy import APIKeyFactory, Client, Filters, Packet
from asyncapy.adapters.memory import MemoryKeyStore

from ..conftest import serving
from .wire import Wire, json_packet


def limited(reply: dict) -> bool:
    if reply.get("error") != "ERR_RATE_LIMITED":
        return False
    assert reply["status"] == "failure" and 0 < reply["retry_after"] <= 60, reply
    return True


async def test_an_address_over_its_rate_is_answered_and_its_session_goes_on(make_echo):
    server = make_echo(rate_limit="10/s", rate_burst=4, metrics_port=0)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            replies = [await wire.request({"n": n}) for n in range(12)]
            served = [r for r in replies if not limited(r)]
            # A quiet client gets burst + 1 at once; 12 requests take far less than the
            # 0.1 s that would let one more in on a loaded machine, at most one or two.
            assert 5 <= len(served) <= 7 and served == [{"n": n} for n in range(len(served))]
            assert all(limited(r) for r in replies[len(served):])
            retry = replies[-1]["retry_after"]
            await trio.sleep(retry)
            assert await wire.request({"after": "waiting"}) == {"after": "waiting"}
            async with await Wire.connect_from("127.0.0.2", host, port) as other:  # its own allowance
                assert [await other.request({"m": m}) for m in range(5)] == [{"m": m} for m in range(5)]
        counted = server.metrics_recorder.snapshot()
    assert counted.rate_limited["address"] == 12 - len(served)
    assert counted.error_replies["ERR_RATE_LIMITED"] == 12 - len(served)


async def test_every_packet_counts_pipelined_or_not(make_echo):
    server = make_echo(rate_limit="1/m", rate_burst=2)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            for n in range(6):
                await wire.send(json_packet({"n": n}))
            replies = [await wire.read_json() for _ in range(6)]
    assert replies[:3] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(limited(r) and r["retry_after"] > 1 for r in replies[3:])


async def test_a_key_issued_with_a_limit_is_held_to_it_and_other_keys_are_not(make_server):
    server = make_server(metrics_port=0)
    keys = APIKeyFactory(store="memory://")
    slow = keys.issue({"user": "slow"}, rate_limit="2/m", rate_burst=1)
    free = keys.issue({"user": "free"})

    @server.add_handler(Filters.APIFactory(keys, "key"))
    async def granted(client: Client, packet: Packet) -> None:
        await client.send({"user": (await keys.aget(packet["key"]))["user"]})

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            replies = [await wire.request({"key": slow}) for _ in range(5)]
            assert replies[:2] == [{"user": "slow"}] * 2
            assert all(limited(r) for r in replies[2:])
            assert [await wire.request({"key": free}) for _ in range(5)] == [{"user": "free"}] * 5
        counted = server.metrics_recorder.snapshot()
    assert counted.rate_limited["key"] == 3 and counted.rate_limited["address"] == 0


class CountingKeyStore(MemoryKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    async def contains(self, key: str) -> bool:
        self.checks += 1
        return await super().contains(key)


async def test_a_spray_of_bad_keys_is_throttled_before_the_store(make_server):
    store = CountingKeyStore()
    keys = APIKeyFactory(store=store)
    good = keys.issue({"user": "alice"})
    server = make_server(metrics_port=0)

    @server.add_handler(Filters.APIFactory(keys, "key"))
    async def granted(client: Client, packet: Packet) -> None:
        await client.send({"granted": True})

    @server.add_handler(Filters.Fields(key=None), group=1)
    async def denied(client: Client, packet: Packet) -> None:
        if not client.closed:
            await client.send({"granted": False})

    async with serving(server) as (host, port):
        started = trio.current_time()
        async with await Wire.connect(host, port) as sprayer:
            replies = []
            for n in range(400):
                await sprayer.send(json_packet({"key": f"bad-key-{n:05d}"}))
                replies.append(await sprayer.read_json())
                if n % 50 == 0:  # a good key from another address is served throughout
                    async with await Wire.connect_from("127.0.0.2", host, port) as other:
                        assert await other.request({"key": good}) == {"granted": True}
        elapsed = trio.current_time() - started
        counted = server.metrics_recorder.snapshot()
    denials = [r for r in replies if r == {"granted": False}]
    refused = [r for r in replies if limited(r)]
    assert len(denials) + len(refused) == 400
    # Burst 20 plus 10 a second reach the store, and the good key's checks; no more.
    bad_checks = store.checks - 8  # the good key, once every 50
    assert bad_checks <= 21 + 10 * elapsed + 2, (bad_checks, elapsed)
    assert len(denials) == bad_checks and counted.rate_limited["key_failures"] == len(refused)


async def test_the_failed_key_throttle_can_be_turned_off(make_server):
    keys = APIKeyFactory(store="memory://")
    server = make_server(key_failure_limit=None)

    @server.add_handler(Filters.APIFactory(keys, "key"))
    async def granted(client: Client, packet: Packet) -> None:  # pragma: no cover - no key is good
        await client.send({"granted": True})

    @server.add_handler(Filters.Fields(key=None), group=1)
    async def denied(client: Client, packet: Packet) -> None:
        await client.send({"granted": False})

    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert [await wire.request({"key": f"k{n}"}) for n in range(60)] == [{"granted": False}] * 60
