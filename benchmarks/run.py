"""``make bench``: AsyncAPY against a bare trio echo server, measured side by side.

Both servers run as their own processes on loopback for the whole run; the load
generator (``benchmarks.loadgen``, this process) drives one at a time with the same
closed loop, in slices of a quarter of a second taken in turn (see :func:`measure`),
so that drift of the machine hits both alike. Only same-run ratios mean anything:
absolute figures vary from machine to machine and from minute to minute.

``metrics on`` is the same AsyncAPY application with ``--metrics-port 0``: every
counter, the handler and store histograms, and the endpoint listening (nobody
scrapes it during the run). Its ratio to AsyncAPY without metrics, in the same run,
is what metrics cost (docs/operations.md#what-it-costs).

A fourth server, ``trio+codec`` (``--codec``), is context too: the bare trio echo
that also decodes and re-encodes each payload with AsyncAPY's codecs. It separates
what the payload's codec costs from what the framework costs.

Usage: ``python -m benchmarks.run [--rounds 7] [--seconds 2] [--uvloop] [--codec] [--churn] [--plot FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Iterator

from asyncapy.domain.codecs import JSON, ZIPROTO
from asyncapy.domain.framing import Framer

from . import loadgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMER = Framer()

SMALL = {"test": 1, "user": "someone", "ok": True}
MEDIUM = {
    f"record-{i:02d}": {"id": i, "name": f"user number {i}", "score": i * 1.5, "tags": ["a", "b", "c"],
                        "active": i % 2 == 0}
    for i in range(16)
}

WORKLOADS = [
    ("small JSON", 50, FRAMER.frame(JSON.encode(SMALL), JSON.code)),
    ("small JSON, latency", 1, FRAMER.frame(JSON.encode(SMALL), JSON.code)),
    ("medium ZiProto", 50, FRAMER.frame(ZIPROTO.encode(MEDIUM), ZIPROTO.code)),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


@contextlib.contextmanager
def process_serving(
    argv_for_port, settle: float = 0.2, quiet_stderr: bool = True, cwd: str = ROOT
) -> Iterator[tuple]:
    """Start ``argv_for_port(port)`` (a server process, in ``cwd``) on a free port, wait
    until it listens and ``settle`` seconds more, yield ``(port, pid)``, and stop it after."""
    port = free_port()
    process = subprocess.Popen(
        argv_for_port(port),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if quiet_stderr else None,
    )
    try:
        wait_listening(port, process)
        time.sleep(settle)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def server(name: str, argv: list, checkout: str = ROOT) -> contextlib.AbstractContextManager:
    """Run server ``name`` (``argv`` from :data:`SERVERS`) as its own process, from
    ``checkout`` with its own virtual environment (this one's: this Python); the
    context yields ``(port, pid)``."""
    flag = ["--port"] if argv[:2] == ["-m", "asyncapy"] else []
    python = sys.executable if checkout == ROOT else os.path.join(checkout, ".venv", "bin", "python")
    return process_serving(lambda port: [python, *argv, *flag, str(port)], cwd=checkout)


SERVERS = {
    "bare trio": ["-m", "benchmarks.bare_trio_echo"],
    "asyncapy": ["-m", "asyncapy", "run", "examples.echo:app", "--log-level", "WARNING"],
    "metrics on": ["-m", "asyncapy", "run", "examples.echo:app", "--log-level", "WARNING",
                   "--metrics-port", "0"],
    "no reactor": ["-m", "asyncapy", "run", "examples.echo:app", "--log-level", "WARNING",
                   "--no-reactor"],
    "uvloop": ["-m", "benchmarks.uvloop_echo"],
    "trio+codec": ["-m", "benchmarks.bare_trio_echo", "--codec"],
}


SLICE = 0.25
"""Seconds of one slice: each server's round is cut into slices this long, taken in
turn with the other servers' (see :func:`measure`)."""


LOADGEN = "python"
"""The load generator of the run (``--loadgen``): ``c`` (:class:`loadgen.FastDriver`, for
every workload but churn) or ``python`` (:class:`loadgen.Driver`)."""
LOADGEN_NAMES = {"c": "C (benchmarks/fastload.c, epoll; churn: Python's)", "python": "Python (benchmarks/loadgen.py)"}


def measure(servers: dict, packet: bytes, connections: int, rounds: int, seconds: float,
            churn: bool = False, slice_seconds: float = SLICE) -> dict:
    """{server: [Result per round]}; ``servers`` maps names to ``(port, pid)``.

    Every server gets its own ``connections`` for the whole workload, warmed up once.
    A round gives each server ``seconds`` of load, cut into slices of
    ``slice_seconds`` taken in turn (bare trio, AsyncAPY, ..., then the other way
    round), each ending once its requests in flight are answered. A drift of the
    machine lasting longer than a few slices thus hits every server alike, where
    whole seconds one after the other would give one server a slow spell and the
    next a fast one. Churn is always the Python generator's (the C one keeps its
    connections)."""
    names = list(servers)
    driver = loadgen.FastDriver if LOADGEN == "c" and not churn else loadgen.Driver
    drivers: dict = {}
    try:
        for name, (port, pid) in servers.items():
            drivers[name] = driver(port, packet, connections, churn=churn, pid=pid)
        for name in names:
            drivers[name].drive(0.0, warmup=0.5)
        slices = max(1, round(seconds / slice_seconds))
        length = seconds / slices
        results: dict = {name: [] for name in names}
        turn = 0
        for _ in range(rounds):
            parts: dict = {name: [] for name in names}
            for _ in range(slices):
                for name in names if turn % 2 == 0 else names[::-1]:
                    parts[name].append(drivers[name].drive(length))
                turn += 1
            for name in names:
                results[name].append(loadgen.combine(parts[name]))
        return results
    finally:
        for driver in drivers.values():
            driver.close()


def summarise(results: dict, baseline: str = "bare trio") -> list:
    rows = []
    base = results[baseline]
    for name, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        p50 = statistics.median(r.percentile(0.50) for r in runs) * 1000
        p99 = statistics.median(r.percentile(0.99) for r in runs) * 1000
        ratio = statistics.median(r.rate / b.rate for r, b in zip(runs, base) if b.rate)
        cpu = statistics.median(r.cpu_per_request for r in runs)
        rows.append((name, rate, p50, p99, ratio, cpu, [round(r.rate) for r in runs]))
    return rows


def metrics_ratio(results: dict) -> float:
    """The median over rounds of AsyncAPY's rate with metrics on over its rate
    without (the two measured in turn, slice by slice, in each round)."""
    return statistics.median(
        on.rate / off.rate for on, off in zip(results["metrics on"], results["asyncapy"]) if off.rate
    )


def cpu_ratio(results: dict, name: str, baseline: str) -> float:
    """The median over rounds of ``name``'s server CPU per request over ``baseline``'s
    (the two measured in turn, slice by slice, in each round)."""
    ratios = [
        r.cpu_per_request / b.cpu_per_request
        for r, b in zip(results[name], results[baseline])
        if b.requests and r.requests and b.cpu_per_request > 0
    ]
    return statistics.median(ratios) if ratios else float("nan")


def rate_ratio(results: dict, name: str, baseline: str) -> float:
    """The median over rounds of ``name``'s rate over ``baseline``'s."""
    ratios = [r.rate / b.rate for r, b in zip(results[name], results[baseline]) if b.rate]
    return statistics.median(ratios) if ratios else float("nan")


TARGETS = {
    # workload: (CPU per request over the uvloop echo's at most, req/s over the bare trio echo's at least)
    "small JSON": (1.5, 1.8),
    "medium ZiProto": (2.0, None),
    "small JSON, latency": (None, 0.9),
}
"""Issue 25's targets for the reactor (aims in docs/performance.md)."""


def print_reactor_lines(title: str, results: dict) -> None:
    """The reactor's figures for ``title``'s workload: CPU per request over the bare
    uvloop echo's, throughput over the bare trio echo's, and over the path without the
    reactor, each beside its target when the workload has one."""
    cpu_target, rate_target = TARGETS.get(title, (None, None))
    if "uvloop" in results:
        line = f"  asyncapy CPU/req over uvloop's: {cpu_ratio(results, 'asyncapy', 'uvloop'):.2f}"
        if "no reactor" in results:
            line += f" (no reactor: {cpu_ratio(results, 'no reactor', 'uvloop'):.2f})"
        print(line + (f"; target at most {cpu_target}" if cpu_target else ""))
    line = f"  asyncapy req/s over bare trio's: {rate_ratio(results, 'asyncapy', 'bare trio'):.2f}"
    if "no reactor" in results:
        line += f" (no reactor: {rate_ratio(results, 'no reactor', 'bare trio'):.2f})"
    print(line + (f"; target at least {rate_target}" if rate_target else ""))
    if "no reactor" in results:
        print(f"  asyncapy / no reactor: {rate_ratio(results, 'asyncapy', 'no reactor'):.3f} req/s, "
              f"{cpu_ratio(results, 'asyncapy', 'no reactor'):.3f} CPU/req")


def against_ratio(results: dict) -> float:
    """The median over rounds of this checkout's rate over the ``--against`` one's."""
    return statistics.median(
        now.rate / then.rate for now, then in zip(results["asyncapy"], results["before"]) if then.rate
    )


def print_table(title: str, rows: list) -> None:
    print(f"\n{title}")
    print(f"  {'server':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6} {'CPU us/req':>10}   rounds (req/s)")
    for name, rate, p50, p99, ratio, cpu, rounds in rows:
        print(f"  {name:<10} {rate:>9.0f} {p50:>8.3f} {p99:>8.3f} {ratio:>6.2f} {cpu:>10.1f}   {rounds}")


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per workload (7)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per server and round, in slices of 0.25 (2)")
    parser.add_argument("--uvloop", action="store_true", help="add an asyncio+uvloop echo for context")
    parser.add_argument("--codec", action="store_true",
                        help="add the bare trio echo that also decodes and re-encodes, for context")
    parser.add_argument("--churn", action="store_true", help="also measure connect-send-receive-close")
    parser.add_argument("--only", metavar="WORKLOAD", help="only the workloads whose title starts with this "
                        "(e.g. 'small JSON'; 'none' for none: churn or the plot alone)")
    parser.add_argument("--servers", metavar="NAME[,NAME...]",
                        help="only these servers (bare trio is always one): e.g. asyncapy,no reactor,uvloop")
    parser.add_argument("--plot", metavar="PNG", help="also sweep 1/10/50/200 connections and plot")
    parser.add_argument(
        "--against",
        metavar="CHECKOUT",
        help="also serve the echo app of another checkout (with its own .venv), as 'before', in "
        "the same slices: a change measured against the code before it, interleaved",
    )
    why = "no C compiler (cc, gcc or clang; Debian/Ubuntu: sudo apt-get install gcc)"
    try:
        fast = loadgen.fastload_binary() is not None
    except RuntimeError as error:  # a compiler that fails: say why, measure anyway
        fast, why = False, str(error)
    parser.add_argument("--loadgen", choices=("c", "python"), default="c" if fast else "python",
                        help="the load generator: c (benchmarks/fastload.c, compiled on first use; the "
                        "default when a C compiler is found) or python (benchmarks/loadgen.py, which "
                        "caps at ~60k req/s on 2 cores); churn is always python's")
    args = parser.parse_args()
    global LOADGEN
    LOADGEN = args.loadgen
    if not fast:
        if args.loadgen == "c":
            parser.error(f"--loadgen c: {why}")
        print(f"The Python load generator drives the servers (it caps fast ones at its own ~60k req/s): {why}")

    names = ["bare trio", "asyncapy", "no reactor", "metrics on"] + (["trio+codec"] if args.codec else []) + (["uvloop"] if args.uvloop else [])
    if args.servers:
        wanted = {name.strip() for name in args.servers.split(",")}
        unknown = wanted - set(SERVERS) - {"asyncapy"}
        if unknown:
            parser.error(f"--servers: unknown {', '.join(sorted(unknown))}; known: {', '.join(SERVERS)}")
        names = ["bare trio"] + [name for name in SERVERS if name in wanted and name != "bare trio"]
    checkouts = {name: ROOT for name in names}
    if args.against:
        names.insert(2, "before")
        checkouts["before"] = os.path.abspath(args.against)
    print(f"Machine: {describe_machine()}")
    print(f"{args.rounds} rounds of {args.seconds}s per server, in {SLICE}s slices taken in turn; "
          f"closed loop, one request in flight per connection; load generator: {LOADGEN_NAMES[LOADGEN]}")
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(server(name, SERVERS.get(name, SERVERS["asyncapy"]), checkouts[name]))
            for name in names
        }
        worst = float("inf")
        for title, connections, packet in WORKLOADS:
            if args.only and not title.startswith(args.only):
                continue
            results = measure(servers, packet, connections, args.rounds, args.seconds)
            rows = summarise(results)
            print_table(f"{title}: {connections} connection(s), {len(packet)}-byte packets", rows)
            worst = min(worst, next((r[4] for r in rows if r[0] == "asyncapy"), worst))
            if "metrics on" in results:
                print(f"  metrics on / off: {metrics_ratio(results):.3f}")
            print_reactor_lines(title, results)
            if args.against:
                print(f"  asyncapy / before: {against_ratio(results):.3f}")
        if args.churn:
            packet = WORKLOADS[0][2]
            results = measure(servers, packet, 8, args.rounds, args.seconds, churn=True)
            print_table("connection churn: 8 clients, connect-send-receive-close", summarise(results))
            if "no reactor" in results:
                print(f"  asyncapy / no reactor: {rate_ratio(results, 'asyncapy', 'no reactor'):.3f}")
            if args.against:
                print(f"  asyncapy / before: {against_ratio(results):.3f}")
        if args.plot:
            sweep = {}
            for connections in (1, 10, 50, 200):
                rows = summarise(measure(servers, WORKLOADS[0][2], connections, args.rounds, args.seconds))
                sweep[connections] = {r[0]: (r[1], r[5]) for r in rows}
                print_table(f"small JSON: {connections} connection(s)", rows)
            plot(sweep, args.plot)
        print(f"\nWorst AsyncAPY / bare trio ratio over the three workloads: {worst:.2f}")


def plot(sweep: dict, path: str) -> None:
    """Two panels against the connection count: requests per second, and the server's
    CPU microseconds per request (``sweep``: {connections: {server: (rate, cpu)}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, cpus) = plt.subplots(1, 2, figsize=(11, 4.5))
    counts = sorted(sweep)
    for name in next(iter(sweep.values())):
        rates.plot(counts, [sweep[c][name][0] for c in counts], marker="o", label=name)
        cpus.plot(counts, [sweep[c][name][1] for c in counts], marker="o", label=name)
    for axes in (rates, cpus):
        axes.set_xscale("log")
        axes.set_xticks(counts, [str(c) for c in counts])
        axes.set_xlabel("concurrent connections (closed loop)")
        axes.grid(True, alpha=0.3)
    rates.set_ylabel("requests per second")
    rates.set_title("Small JSON echo: throughput")
    cpus.set_ylabel("server CPU µs per request (user + system)")
    cpus.set_yscale("log")
    cpus.set_title("Small JSON echo: server CPU per request")
    rates.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
