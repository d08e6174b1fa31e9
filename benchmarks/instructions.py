"""Instructions per request, counted by callgrind: a measure the machine's load cannot move.

Requests per second and CPU time move by 30% and more on a shared virtual machine, so
two versions of the serving code measured minutes apart say little about a 5%
difference. ``valgrind --tool=callgrind`` counts the instructions the server process
executes instead: repeatable for the same code and inputs, whatever else the machine
does. The echo app is served under callgrind, warmed up, its counters zeroed
(``callgrind_control -z``), then driven for ``--requests`` requests by a closed-loop
client in this process, one request in flight per connection, and its counters dumped
(``callgrind_control -d``): the dump's total over the requests is the figure.

With ``--against CHECKOUT`` (another checkout with its own ``.venv``) both are measured
in turn, and the ratio printed: what a change costs per request, to the instruction.

Usage: ``python -m benchmarks.instructions [--requests 3000] [--against CHECKOUT]``
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from asyncapy.domain.codecs import JSON, ZIPROTO
from asyncapy.domain.framing import Framer

from .run import MEDIUM, ROOT, SMALL, free_port, wait_listening

FRAMER = Framer()

WORKLOADS = [
    ("small JSON", 1, FRAMER.frame(JSON.encode(SMALL), JSON.code)),
    ("small JSON", 8, FRAMER.frame(JSON.encode(SMALL), JSON.code)),
    ("medium ZiProto", 1, FRAMER.frame(ZIPROTO.encode(MEDIUM), ZIPROTO.code)),
    ("churn (connect, one request, close)", 0, FRAMER.frame(JSON.encode(SMALL), JSON.code)),
]
"""(title, connections, packet); 0 connections: a new connection per request."""


def round_trip(sock: socket.socket, packet: bytes) -> None:
    """Send ``packet`` and read its echo whole."""
    sock.sendall(packet)
    remaining = len(packet)
    while remaining:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        remaining -= len(chunk)


def churn(port: int, packet: bytes, requests: int) -> None:
    """``requests`` connections, each connect, one round trip, close."""
    for _ in range(requests):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            round_trip(sock, packet)


def drive(port: int, packet: bytes, connections: int, requests: int) -> None:
    if connections == 0:
        return churn(port, packet, requests)
    """``requests`` echo round trips, spread over ``connections`` sockets taken in
    turn (each waits for its reply before the next request)."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    try:
        for sock in sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n in range(requests):
            round_trip(sockets[n % connections], packet)
    finally:
        for sock in sockets:
            sock.close()


def total_instructions(dump: str) -> int:
    with open(dump) as lines:
        for line in lines:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def measure(checkout: str, packet: bytes, connections: int, requests: int, extra: tuple = ()) -> float:
    """Instructions per request of ``checkout``'s echo app under callgrind, served with
    the ``extra`` arguments of ``asyncapy run``."""
    python = sys.executable if checkout == ROOT else os.path.join(checkout, ".venv", "bin", "python")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "callgrind.out")
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", python, "-m", "asyncapy", "run",
             "examples.echo:app", "--log-level", "WARNING", "--port", str(port), *extra],
            cwd=checkout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(port, process, timeout=300)
            drive(port, packet, connections, 200)  # warm up
            subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True)
            drive(port, packet, connections, requests)
            subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
            time.sleep(0.5)
            dumps = sorted(glob.glob(f"{out}.{process.pid}.*"))
            if not dumps:
                raise RuntimeError("callgrind wrote no dump")
            return total_instructions(dumps[-1]) / requests
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests measured per workload (3000)")
    parser.add_argument("--against", metavar="CHECKOUT", help="also measure another checkout (with its own .venv)")
    parser.add_argument("--only", type=int, metavar="N", help="only the N-th workload (0 to 3)")
    parser.add_argument(
        "--compare-args",
        metavar="ARGS",
        help="also measure this checkout served with these extra arguments of asyncapy run, as "
        "'before' (e.g. --compare-args=--no-reactor: the reactor against a task per session)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("benchmarks.instructions needs valgrind (Debian: apt-get install valgrind)")
    print(f"Instructions per request (callgrind), {args.requests} requests per workload")
    workloads = WORKLOADS if args.only is None else [WORKLOADS[args.only]]
    for title, connections, packet in workloads:
        now = measure(ROOT, packet, connections, args.requests)
        line = f"  {title}, {connections or 'new'} connection(s): {now:,.0f}"
        if args.against:
            then = measure(os.path.abspath(args.against), packet, connections, args.requests)
            line += f"; before: {then:,.0f}; ratio {now / then:.3f}"
        if args.compare_args:
            then = measure(ROOT, packet, connections, args.requests, tuple(args.compare_args.split()))
            line += f"; with {args.compare_args}: {then:,.0f}; ratio {now / then:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
