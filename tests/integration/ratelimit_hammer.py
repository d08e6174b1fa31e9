"""One OS process hammering one rate-limit key through the Redis adapter, for
tests/integration/test_ratelimit_processes.py.

``python -m tests.integration.ratelimit_hammer URL KEY RATE BURST SECONDS START``:
waits until the wall clock reads ``START`` (so that every process begins together),
then for ``SECONDS`` runs ``TASKS`` tasks that each call ``acquire`` as fast as Redis
answers, and prints one JSON line: how many were allowed and tried, and the wall-clock
instants of the first call sent and the last reply read.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from asyncapy.adapters.redis import connect
from asyncapy.adapters.redis_ratelimit import RedisRateLimiter
from asyncapy.domain.ratelimit import parse_rate

TASKS = 8
"""Calls in flight per process: the batching front sends them together."""


async def hammer(url: str, key: str, rate: str, burst: int, seconds: float, start: float) -> dict:
    limiter = RedisRateLimiter(connect(url))
    limit = parse_rate(rate)
    await limiter.acquire("warm-up:" + key, limit, burst)  # connect, load the script
    await trio.sleep(max(0.0, start - time.time()))
    counts = {"allowed": 0, "tried": 0}
    first = time.time()
    end = first + seconds

    async def worker() -> None:
        while time.time() < end:
            decision = await limiter.acquire(key, limit, burst)
            counts["tried"] += 1
            counts["allowed"] += decision.allowed

    async with trio.open_nursery() as nursery:
        for _ in range(TASKS):
            nursery.start_soon(worker)
    last = time.time()
    await limiter.aclose()
    return {**counts, "first": first, "last": last}


if __name__ == "__main__":
    url, key, rate, burst, seconds, start = sys.argv[1:7]
    print(json.dumps(trio.run(hammer, url, key, rate, int(burst), float(seconds), float(start))))
