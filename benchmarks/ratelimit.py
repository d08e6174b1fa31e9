"""What one rate-limit decision costs: in memory, and in Redis against the store call
that exists today.

Store level, in one trio task and over ``--tasks`` concurrent tasks (whose calls share
batches and round trips, as a busy server's would):

* :class:`~asyncapy.adapters.memory_ratelimit.MemoryRateLimiter` ``acquire``;
* :class:`~asyncapy.adapters.redis_ratelimit.RedisRateLimiter` ``acquire`` (one Lua
  script on the server's ``TIME``);
* the baseline: :class:`~asyncapy.adapters.redis.RedisKeyStore` ``contains``, one plain
  ``EXISTS`` through the same batching front, the per-packet call a key check that
  misses the cache makes today.

Microseconds per call, the median of ``--rounds`` alternating rounds, and the calls
per round trip of the concurrent runs. The limits are never reached (``1000000/s``),
so every decision takes the full path (allowed, TAT written). The Redis is a real
``redis-server`` on a free loopback port: only same-run ratios carry over.

Usage: ``python -m benchmarks.ratelimit [--calls 5000] [--rounds 5] [--tasks 50]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from asyncapy.adapters.memory_ratelimit import MemoryRateLimiter
from asyncapy.adapters.redis import RedisKeyStore, connect
from asyncapy.adapters.redis_ratelimit import RedisRateLimiter
from asyncapy.domain.ratelimit import Rate

from .admission import describe_machine, redis_server

RATE = Rate(1_000_000, 1)
"""Never reached: every call is allowed and writes its TAT."""


def _calls(kind: str, target, n: int, task: int):
    if kind == "store":
        return lambda i: target.contains(f"key-{task}-{i}")
    return lambda i: target.acquire(f"203.0.113.{task % 250}", RATE, 1000)


async def timed(kind: str, target, calls: int, tasks: int) -> float:
    """Microseconds per call of ``calls`` spread over ``tasks`` tasks."""
    per_task = calls // tasks

    async def worker(task: int) -> None:
        call = _calls(kind, target, per_task, task)
        for i in range(per_task):
            await call(i)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for task in range(tasks):
            nursery.start_soon(worker, task)
    return (time.perf_counter() - start) / (per_task * tasks) * 1e6


async def measure(url: str, calls: int, rounds: int, tasks: int) -> dict:
    memory = MemoryRateLimiter()
    limiter = RedisRateLimiter(connect(url))
    store = RedisKeyStore(connect(url))
    subjects = {"memory acquire": ("limit", memory), "Redis acquire": ("limit", limiter), "Redis EXISTS (baseline)": ("store", store)}
    results: dict = {(name, n): [] for name in subjects for n in (1, tasks)}
    batches: dict = {}
    for _ in range(rounds):
        for name, (kind, target) in subjects.items():
            for n in (1, tasks):
                before = getattr(target, "batches", 0), getattr(target, "calls", 0)
                results[name, n].append(await timed(kind, target, calls, n))
                if hasattr(target, "batches") and n > 1:
                    sent = target.batches - before[0]
                    batches[name] = (target.calls - before[1]) / max(1, sent)
    await limiter.aclose()
    await store.aclose()
    return {"us": {key: statistics.median(values) for key, values in results.items()}, "per_batch": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=50)
    args = parser.parse_args()
    with redis_server() as (url, _pid):
        found = trio.run(measure, url, args.calls, args.rounds, args.tasks)
    print(f"Rate-limit decisions, {describe_machine()}; {args.calls} calls a run, median of {args.rounds} rounds")
    print(f"{'':28} {'1 task (us/call)':>18} {f'{args.tasks} tasks (us/call)':>20} {'calls/round trip':>17}")
    for name in ("memory acquire", "Redis acquire", "Redis EXISTS (baseline)"):
        us = found["us"]
        per_batch = found["per_batch"].get(name)
        shown = f"{per_batch:.1f}" if per_batch else "-"
        print(f"{name:28} {us[name, 1]:18.1f} {us[name, args.tasks]:20.1f} {shown:>17}")
    us = found["us"]
    print(
        f"Redis acquire / EXISTS: {us['Redis acquire', 1] / us['Redis EXISTS (baseline)', 1]:.2f}x (1 task), "
        f"{us['Redis acquire', args.tasks] / us['Redis EXISTS (baseline)', args.tasks]:.2f}x ({args.tasks} tasks)"
    )


if __name__ == "__main__":
    main()
