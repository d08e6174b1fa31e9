"""What one connection admission costs with the Redis session store, against memory.

Every new connection is admitted into the session store (the per-address limit) and
released from it when it ends; nothing else touches the store per connection, and
nothing at all per packet. This measures that cost twice:

(a) **store level**: ``admit`` + ``release`` pairs awaited one after another in one
    trio task, :class:`~asyncapy.adapters.memory.MemorySessionStore` against
    :class:`~asyncapy.adapters.redis.RedisSessionStore`, then the same number of pairs spread
    over 8 concurrent tasks (their calls share batches and round trips). Reported
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

from . import run
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


# -- (b) end to end ---------------------------------------------------------------------------
SESSION_LIMIT = 100
"""The session_limit of the churn servers: above the clients' connections, so nothing
is refused, but every connection is admitted under a limit (the Lua script's path)."""

REACTOR = True
"""Whether the servers of part (b) serve with the reactor (``--no-reactor``: a task per
session, to measure what the reactor changes for the stores)."""

KEYS = [f"bench{n:027d}" for n in range(64)]
"""The API keys of the authenticated echo (32 characters each, one per connection)."""


def serve(port: int, store: str) -> None:
    """The churn echo server of part (b), run in a child process: ``--serve PORT STORE``."""
    from asyncapy import Server

    app = Server(
        port=port, buf=65536, logging_level="WARNING", session_limit=SESSION_LIMIT,
        store=None if store == "memory" else store, reactor=REACTOR,
    )

    @app.add_handler()
    async def echo(client, packet) -> None:
        await client.send(packet)

    app.start()


KEY_LIMIT = "100000/s"
"""The per-key rate limit of the ``keys limited`` server: never reached (each key asks a
few hundred times a second), so what it costs is the decision's own price."""


def serve_authenticated(port: int, store: str, limited: bool = False) -> None:
    """The authenticated echo of part (b): packets pass ``Filters.APIFactory`` (keys in
    ``store``, sessions too) and are echoed; ``{"stats": 1}`` answers the key cache's
    counts. With ``limited``, every key carries a rate limit of its own
    (:data:`KEY_LIMIT`), charged on each packet in the limiter beside the store. Run in
    a child process: ``--serve-auth PORT STORE`` (``--serve-auth-limited``)."""
    from asyncapy import APIKeyFactory, Filters, Packet, Server
    from asyncapy.domain.keylimits import key_limit, wrap
    from asyncapy.domain.ports import run_to_completion

    url = None if store == "memory" else store
    app = Server(port=port, buf=65536, logging_level="WARNING", store=url, reactor=REACTOR)
    keys = APIKeyFactory(store=url or "memory://")
    limit = key_limit(KEY_LIMIT, 100) if limited else None
    for key in KEYS:
        run_to_completion(keys.store.put(key, wrap({"user": key[-4:]}, limit)))

    @app.add_handler(Filters.Fields(stats=None), group=-1)
    async def stats(client, packet) -> None:
        cache = getattr(keys.store, "cache", None)
        counts = cache.stats() if cache is not None else {}
        await client.send(Packet(counts, encoding=client.encoding))
        packet.stop_propagation()

    @app.add_handler(Filters.APIFactory(keys, "key"))
    async def echo(client, packet) -> None:
        await client.send(packet)

    app.start()


def child(flag: str, store: str) -> contextlib.AbstractContextManager:
    """A server of part (b) (``flag``: ``--serve`` or ``--serve-auth``) with its
    store, as its own process; the context yields ``(port, pid)``."""
    return run.process_serving(
        lambda port: [sys.executable, "-m", "benchmarks.admission", flag, str(port), store,
                      *([] if REACTOR else ["--no-reactor"])],
        settle=0.3,
        quiet_stderr=False,
    )


def auth_packets(connections: int) -> list:
    """One request per connection, each carrying its own key."""
    return [Framer().frame(JSON.encode({"key": KEYS[n], "n": 1}), JSON.code) for n in range(connections)]


def cache_stats(port: int) -> dict:
    """The key cache's counts of the authenticated server on ``port``."""
    from asyncapy.client import Client

    with Client(tls=False, timeout=5) as client:
        client.connect("127.0.0.1", port)
        return client.request({"stats": 1})


def end_to_end(url: str, redis_pid: int, rounds: int, seconds: float, clients: int, connections: int) -> dict:
    """{workload: ({store: [loadgen.Result per round]}, redis-server CPU s, hit ratio)}.

    Each workload runs a memory server and a Redis server side by side, in slices
    taken in turn (``benchmarks.run.measure``): a drift of the host hits both alike.
    """
    results: dict = {}
    workloads = [
        (f"auth echo, {connections} persistent", "--serve-auth", auth_packets(connections), connections, False),
        (f"churn, {clients} clients, session_limit", "--serve", PACKET, clients, True),
    ]
    for title, flag, packet, count, churn in workloads:
        with contextlib.ExitStack() as stack:
            servers = {"memory": stack.enter_context(child(flag, "memory")), "redis": stack.enter_context(child(flag, url))}
            if flag == "--serve-auth":  # the same, every key with a limit of its own
                servers["limited"] = stack.enter_context(child("--serve-auth-limited", url))
            redis = servers["redis"]
            before = process_cpu(redis_pid)
            measured = run.measure(servers, packet, count, rounds, seconds, churn=churn)
            redis_cpu = process_cpu(redis_pid) - before
            ratio = None
            if flag == "--serve-auth":
                counts = cache_stats(redis[0])
                looked = counts["hits"] + counts["misses"]
                ratio = (counts["hits"] / looked if looked else 0.0, looked)
            results[title] = (measured, redis_cpu, ratio)
    return results


# -- (c) revocation propagation and the cache's memory ---------------------------------------
async def propagation(url: str, count: int) -> list:
    """Seconds from a revocation's acknowledgement (by another client, as another
    process would) until a cached factory refuses the key, ``count`` times."""
    from asyncapy import APIKeyFactory
    from asyncapy.adapters.redis import RedisKeyStore, connect

    here = APIKeyFactory(store=url)
    there = APIKeyFactory(store=RedisKeyStore(connect(url)))
    await here.acontains("warm up")
    while not here.store.cache.trusted:
        await trio.sleep(0.01)
    delays = []
    for _ in range(count):
        key = await there.aissue({"user": "bench"})
        while True:  # until the answer is cached (a check right after the issue may race it)
            hits = here.store.cache.hits
            assert await here.acontains(key)
            if here.store.cache.hits > hits:
                break
            await trio.sleep(0.001)
        await there.arevoke(key)
        acknowledged = time.perf_counter()
        while await here.acontains(key):
            # Poll every 0.1 ms, the GIL released meanwhile (the tracker thread applies
            # the invalidation). Not trio.sleep(0.0001): the event loop's epoll sleeps
            # whole milliseconds, which would round every delay not yet over at the
            # first check up to about 1.2 ms, however soon the cache was invalidated.
            time.sleep(0.0001)  # noqa: ASYNC251 - on purpose: see above
            await trio.lowlevel.checkpoint()
        delays.append(time.perf_counter() - acknowledged)
    await here.store.aclose()
    await there.store.aclose()
    return delays


def cache_memory(size: int) -> float:
    """Bytes a linked :class:`KeyCache` of ``size`` holds when both of its tables are
    full (present keys with ``{"user": ...}`` metadata, absent keys)."""
    import gc
    import tracemalloc

    from asyncapy.adapters.key_cache import KeyCache, digest

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = KeyCache(size)
    cache.link_up(time.monotonic())
    for n in range(size):
        cache.fill(cache.begin(digest(f"present-{n}")), True, f'{{"user": "user-{n:08d}"}}')
        cache.fill(cache.begin(digest(f"absent-{n}")), False, None)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(cache) == 2 * size
    return float(used)


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


def print_e2e_table(results: dict, seconds: float, rounds: int) -> None:
    print(f"\n(b) end to end: {seconds}s per round in slices, median of {rounds} rounds")
    print("  auth echo: every packet checked by Filters.APIFactory, one key per connection (req/s);")
    print("  churn: connect, send, receive, close (connections/s). CPU us/req: the server process's;")
    print("  redis CPU us/req: redis-server's over the Redis server's requests")
    print(
        f"  {'workload':<32} {'store':<7} {'rate':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs memory':>10}"
        f" {'CPU us/req':>11} {'redis CPU':>10}   rounds"
    )
    for workload, (measured, redis_cpu, hit_ratio) in results.items():
        base = measured["memory"]
        for name in [n for n in ("memory", "redis", "limited") if n in measured]:
            runs = measured[name]
            rate = statistics.median(r.rate for r in runs)
            p50 = statistics.median(r.percentile(0.50) for r in runs) * 1000
            p99 = statistics.median(r.percentile(0.99) for r in runs) * 1000
            ratio = statistics.median(r.rate / b.rate for r, b in zip(runs, base) if b.rate)
            cpu = statistics.median(r.cpu_per_request for r in runs)
            requests = sum(r.requests for r in runs)
            redis_us = f"{redis_cpu / requests * 1e6:>10.1f}" if name == "redis" and requests else f"{'':>10}"
            errors = sum(r.errors for r in runs)
            note = f"  ({errors} errors)" if errors else ""
            print(
                f"  {workload:<32} {name:<7} {rate:>8.0f} {p50:>8.3f} {p99:>8.3f} {ratio:>10.2f}"
                f" {cpu:>11.1f} {redis_us}   {[round(r.rate) for r in runs]}{note}"
            )
        if "limited" in measured:
            with_limits = statistics.median(
                r.rate / b.rate for r, b in zip(measured["limited"], measured["redis"]) if b.rate
            )
            print(f"  {'':<32} per-key limits (Redis) / none: {with_limits:.3f}")
        if hit_ratio is not None:
            print(f"  {'':<32} key cache hit ratio (Redis server): {hit_ratio[0]:.5f} of {hit_ratio[1]} checks")


def print_cache_table(delays: list, memory: float, size: int) -> None:
    ordered = sorted(delays)
    print("\n(c) the API-key cache in front of Redis")
    print(
        f"  revocation propagation over {len(delays)} revocations (acknowledged by another client -> "
        f"refused here): median {statistics.median(ordered) * 1000:.3f} ms, "
        f"p90 {ordered[int(0.9 * len(ordered))] * 1000:.3f} ms, worst {ordered[-1] * 1000:.3f} ms"
    )
    print(
        f"  memory at the default bound ({size} present keys with small metadata + {size} absent "
        f"keys): {memory / 2**20:.1f} MiB ({memory / (2 * size):.0f} bytes an entry)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5000, help="admit+release pairs per store-level round (5000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per end-to-end round (3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients / tasks of the churn (8)")
    parser.add_argument("--connections", type=int, default=50, help="persistent connections of the auth echo (50)")
    parser.add_argument("--revocations", type=int, default=200, help="revocations timed (200)")
    parser.add_argument("--no-reactor", action="store_true",
                        help="serve part (b) with reactor=False (a task per session), to compare")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-auth", nargs=2, metavar=("PORT", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-auth-limited", nargs=2, metavar=("PORT", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global REACTOR
    REACTOR = not args.no_reactor
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return
    if args.serve_auth:
        serve_authenticated(int(args.serve_auth[0]), args.serve_auth[1])
        return
    if args.serve_auth_limited:
        serve_authenticated(int(args.serve_auth_limited[0]), args.serve_auth_limited[1], limited=True)
        return
    if not 0 < args.connections <= len(KEYS):
        parser.error(f"--connections must be 1 to {len(KEYS)}")

    from asyncapy.adapters.key_cache import DEFAULT_SIZE

    print(f"Machine: {describe_machine()}")
    with redis_server() as (url, redis_pid):
        store_results = trio.run(store_level, url, args.pairs, args.rounds, args.clients)
        print_store_table(store_results, args.pairs, args.rounds)
        e2e_results = end_to_end(url, redis_pid, args.rounds, args.seconds, args.clients, args.connections)
        print_e2e_table(e2e_results, args.seconds, args.rounds)
        delays = trio.run(propagation, url, args.revocations)
    print_cache_table(delays, cache_memory(DEFAULT_SIZE), DEFAULT_SIZE)


if __name__ == "__main__":
    main()
