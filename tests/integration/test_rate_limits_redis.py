"""Rate limits shared by server processes through a real Redis (one node, and a Cluster).

One client address spread over two ``asyncapy run`` processes gets at most its rate
over the time it sends, plus its burst, and within a few percent of it; another
address is not slowed. The limit's state is one GCRA number in Redis per address,
decided by a server-side script on the server's clock (adapters/redis_ratelimit.py).
"""

from __future__ import annotations

import pytest
import trio

from tests.e2e.wire import Wire

HOST = "127.0.0.1"
RATE, BURST = 40, 5


@pytest.fixture(params=["single node", "cluster"])
def store_url(request) -> str:
    name = "redis_url" if request.param == "single node" else "cluster_url"
    return request.getfixturevalue(name)


async def test_an_address_spread_over_processes_gets_its_rate_and_no_more(spawn, store_url):
    servers = [spawn(store_url, rate_limit=f"{RATE}/s", rate_burst=BURST) for _ in range(2)]
    for server in servers:
        await server.serving()
    allowed: list[float] = []
    refused = 0
    seconds = 2.0

    async def hammer(port: int) -> None:
        nonlocal refused
        async with await Wire.connect(HOST, port) as wire:
            with trio.move_on_at(deadline):
                while True:
                    reply = await wire.request({"hello": port})
                    if reply == {"hello": port}:
                        allowed.append(trio.current_time())
                    else:
                        assert reply["error"] == "ERR_RATE_LIMITED" and reply["retry_after"] > 0
                        refused += 1

    started = trio.current_time()
    deadline = started + seconds
    async with trio.open_nursery() as nursery:
        for server in servers:
            for _ in range(2):
                nursery.start_soon(hammer, server.port)
    window = max(allowed) - started
    bound = RATE * window + BURST + 1
    # At most the bound (a few percent for the clocks of two processes and Redis), and
    # nearly all of it: a shared limit, not one per process (that would be twice).
    assert len(allowed) <= bound * 1.03 + 1, (len(allowed), bound)
    assert len(allowed) >= 0.9 * (RATE * window + BURST), (len(allowed), bound)
    assert refused > len(allowed)  # the clients did ask for more
    print(f"allowed {len(allowed)} of {len(allowed) + refused} in {window:.3f}s; bound {bound:.1f}")
    # Other addresses have their own allowances, at once (one shared by both processes).
    for source, server in zip(("127.0.0.2", "127.0.0.3"), servers):
        async with await Wire.connect_from(source, HOST, server.port) as other:
            assert [await other.request({"m": m}) for m in range(BURST + 1)] == [{"m": m} for m in range(BURST + 1)]
