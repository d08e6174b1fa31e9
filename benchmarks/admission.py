"""What one connection admission costs with the Redis session store, against memory.

Every new connection is admitted into the session store (the per-address limit) and
released from it when it ends; nothing else touches the store per connection, and
nothing at all per packet. This measures that cost twice:

(a) **store level**: ``admit`` + ``release`` pairs awaited one after another in one
    trio task, :class:`~asyncapy.adapters.memory.MemorySessionStore` against
    :class:`~asyncapy.adapters.redis.RedisSessionStore`, then the same number of pairs spread
    over 8 concurrent tasks (the worker threads overlap their round trips). Reported
    as microseconds per pair (one connection's admission and release), the median of
    several alternating rounds.
(b) **end to end**: two echo servers in their own processes, one with
    ``store=None`` (memory), one with ``store="redis://..."``, driven in turn by
    ``benchmarks.loadgen`` with 8 clients that each connect, send one small packet,
    read the echo and close, over and over (``--persistent`` adds 8 long-lived
    connections for contrast: the store is not on that path). Beside the rates and
    latencies, the CPU time the server process and redis-server spent per request
    (from ``/proc``): on a machine with few cores the thread hop and redis-py's
    Python code cost CPU time the server would otherwise spend serving.

The Redis is a real ``redis-server`` started here on a free loopback port, without
persistence, so a round trip is loopback TCP plus Lua, the best case; a Redis on
another host adds the network's round-trip time to every admission and release.
Only same-run ratios carry over to another machine.

Usage: ``python -m benchmarks.admission [--pairs 5000] [--rounds 5] [--seconds 3]
[--clients 8] [--persistent]``
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from typing import Iterator

import trio

from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.domain.codecs import JSON
from asyncapy.domain.framing import Framer
from asyncapy.domain.ports import SessionRecord, SessionStore

from . import loadgen, run
from .loadgen import process_cpu
from .run import free_port, wait_listening

ADDRESS = "203.0.113.7"
LIMIT = 100
"""The session_limit the store-level pairs are admitted under (any limit > 0 takes the
same path through the Lua script as 100)."""
PACKET = Framer().frame(JSON.encode({"test": 1, "user": "someone", "ok": True}), JSON.code)


# -- a redis-server of our own -------------------------------------------------------------
@contextlib.contextmanager
def redis_server() -> Iterator[tuple]:
    """A throwaway redis-server on a free loopback port; yields (URL, pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        yield f"redis://127.0.0.1:{port}/0", process.pid
    finally:
        process.kill()
        process.wait(10)


def redis_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=5).stdout
        for word in out.split():
            if word.startswith("v="):
                return word[2:]
    return "unknown"


# -- (a) store level ------------------------------------------------------------------------
def _records(count: int, address: str = ADDRESS) -> list:
    now = time.time()
    return [SessionRecord(str(uuid.uuid4()), address, now, "bench") for _ in range(count)]


async def sequential_pairs(store: SessionStore, pairs: int) -> float:
    """Seconds per admit+release pair, one after another in one task."""
    records = _records(pairs)
    start = time.perf_counter()
    for record in records:
        if not await store.admit(record, LIMIT):
            raise RuntimeError("a session was refused: the store is not empty")
        await store.release(record)
    return (time.perf_counter() - start) / pairs


async def concurrent_pairs(store: SessionStore, pairs: int, tasks: int) -> float:
    """Seconds per admit+release pair (wall clock / pairs) with ``tasks`` tasks at once,
    each a client of its own address."""
    per_task = pairs // tasks

    async def client(address: str) -> None:
        for record in _records(per_task, address):
            if not await store.admit(record, LIMIT):
                raise RuntimeError("a session was refused: the store is not empty")
            await store.release(record)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(tasks):
            nursery.start_soon(client, f"198.51.100.{n + 1}")
    return (time.perf_counter() - start) / (per_task * tasks)


async def store_level(url: str, pairs: int, rounds: int, tasks: int) -> dict:
    """{(workload, store): [seconds per pair, per round]}."""
    from asyncapy.adapters.redis import RedisSessionStore, connect

    stores = {"memory": MemorySessionStore(), "redis": RedisSessionStore(connect(url))}
    for store in stores.values():  # warm up: pool connections, script cache, threads
        await sequential_pairs(store, 200)
        await concurrent_pairs(store, 200, tasks)
    results: dict = {}
    for index in range(rounds):
        order = list(stores) if index % 2 == 0 else list(stores)[::-1]
        for name in order:
            results.setdefault(("sequential", name), []).append(await sequential_pairs(stores[name], pairs))
            results.setdefault((f"{tasks} tasks", name), []).append(
                await concurrent_pairs(stores[name], pairs, tasks)
            )
    for store in stores.values():
        await store.aclose()
    return results


# -- (b) end to end -------------------------------------------------------------------------
def serve(port: int, store: str) -> None:
    """The echo server of part (b), run in a child process: ``--serve PORT STORE``."""
    from asyncapy import Server

    app = Server(port=port, buf=65536, logging_level="WARNING", store=None if store == "memory" else store)

    @app.add_handler()
    async def echo(client, packet) -> None:
        await client.send(packet)

    app.start()


def echo_server(store: str) -> contextlib.AbstractContextManager:
    """The echo application with sessions in ``store``, as its own process; the
    context yields ``(port, pid)``."""
    return run.process_serving(
        lambda port: [sys.executable, "-m", "benchmarks.admission", "--serve", str(port), store],
        settle=0.3,
        quiet_stderr=False,
    )


def end_to_end(url: str, redis_pid: int, rounds: int, seconds: float, clients: int, persistent: bool) -> dict:
    """{(workload, store): [(loadgen.Result, server CPU s, redis-server CPU s) per round]}.

    CPU times cover the whole run, warm-up included, so they are divided by the
    requests of the whole run (``Result.requests`` counts only the measured part):
    the rate over the run is taken as the measured rate.
    """
    workloads = [("churn", True)] + ([("persistent", False)] if persistent else [])
    results: dict = {}
    with echo_server("memory") as memory, echo_server(url) as redis:
        servers = {"memory": memory, "redis": redis}
        for port, _ in servers.values():  # warm up
            loadgen.run(port, PACKET, clients, 0.5, warmup=0.2, churn=True)
        for workload, churn in workloads:
            for index in range(rounds):
                order = list(servers) if index % 2 == 0 else list(servers)[::-1]
                for name in order:
                    port, pid = servers[name]
                    before = process_cpu(pid), process_cpu(redis_pid), time.perf_counter()
                    result = loadgen.run(port, PACKET, clients, seconds, churn=churn)
                    elapsed = time.perf_counter() - before[2]
                    share = result.seconds / elapsed if elapsed else 0.0  # the measured part
                    server_cpu = (process_cpu(pid) - before[0]) * share
                    redis_cpu = (process_cpu(redis_pid) - before[1]) * share
                    results.setdefault((workload, name), []).append((result, server_cpu, redis_cpu))
    return results


# -- report ---------------------------------------------------------------------------------
def describe_machine() -> str:
    return f"{run.describe_machine()}, redis-server {redis_version()}"


def print_store_table(results: dict, pairs: int, rounds: int) -> None:
    print(f"\n(a) store level: {pairs} admit+release pairs per round, median of {rounds} rounds")
    print(f"  {'workload':<12} {'memory us/pair':>15} {'redis us/pair':>14} {'redis/memory':>13}   redis rounds (us)")
    for workload in dict.fromkeys(key[0] for key in results):
        memory = statistics.median(results[(workload, "memory")]) * 1e6
        redis = statistics.median(results[(workload, "redis")]) * 1e6
        rounds_us = [round(s * 1e6, 1) for s in results[(workload, "redis")]]
        print(f"  {workload:<12} {memory:>15.2f} {redis:>14.1f} {redis / memory:>12.0f}x   {rounds_us}")


def print_e2e_table(results: dict, clients: int, seconds: float, rounds: int) -> None:
    print(f"\n(b) end to end: {clients} clients, {seconds}s per run, median of {rounds} alternating rounds")
    print("  churn: connect, send, receive, close (rate = connections/s); persistent: requests/s")
    print("  CPU us/req: CPU time of the server process / of redis-server per request")
    print(
        f"  {'workload':<11} {'store':<7} {'rate':>7} {'p50 ms':>8} {'p99 ms':>8} {'vs memory':>10}"
        f" {'server CPU':>11} {'redis CPU':>10}   rounds"
    )
    for workload in dict.fromkeys(key[0] for key in results):
        base = [run[0] for run in results[(workload, "memory")]]
        for name in ("memory", "redis"):
            runs = [run[0] for run in results[(workload, name)]]
            rate = statistics.median(r.rate for r in runs)
            p50 = statistics.median(r.percentile(0.50) for r in runs) * 1000
            p99 = statistics.median(r.percentile(0.99) for r in runs) * 1000
            ratio = statistics.median(r.rate / b.rate for r, b in zip(runs, base) if b.rate)
            server_cpu = statistics.median(s / r.requests for r, s, _ in results[(workload, name)] if r.requests)
            redis_cpu = statistics.median(c / r.requests for r, _, c in results[(workload, name)] if r.requests)
            errors = sum(r.errors for r in runs)
            note = f"  ({errors} errors)" if errors else ""
            print(
                f"  {workload:<11} {name:<7} {rate:>7.0f} {p50:>8.3f} {p99:>8.3f} {ratio:>10.2f}"
                f" {server_cpu * 1e6:>11.0f} {redis_cpu * 1e6:>10.0f}   {[round(r.rate) for r in runs]}{note}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5000, help="admit+release pairs per store-level round (5000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per end-to-end run (3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients / tasks (8)")
    parser.add_argument("--persistent", action="store_true", help="also measure persistent connections")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return

    print(f"Machine: {describe_machine()}")
    with redis_server() as (url, redis_pid):
        store_results = trio.run(store_level, url, args.pairs, args.rounds, args.clients)
        print_store_table(store_results, args.pairs, args.rounds)
        e2e_results = end_to_end(url, redis_pid, args.rounds, args.seconds, args.clients, args.persistent)
        print_e2e_table(e2e_results, args.clients, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
