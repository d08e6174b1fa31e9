"""A closed-loop load generator with as little overhead of its own as Python allows.

Each connection keeps exactly one request in flight: it sends one packet, waits for
the whole reply (the length prefix says how long), records the latency, and sends the
next. Plain non-blocking sockets on ``selectors`` (epoll): no framework in the loop,
so the generator is not what is measured. ``churn=True`` opens a new connection for
every request instead (connect, send, receive, close: what AsyncAPY 0.5 clients do).
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Result:
    requests: int
    seconds: float
    latencies: list = field(repr=False)
    errors: int = 0
    server_cpu: float = float("nan")
    """CPU seconds (user + system) the server process spent in the measured window."""

    @property
    def cpu_per_request(self) -> float:
        """Server CPU microseconds per request (NaN when not measured)."""
        return self.server_cpu / self.requests * 1e6 if self.requests else float("nan")

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Conn:
    __slots__ = ("sock", "received", "started")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0
        self.started = 0.0


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far; NaN where
    ``/proc`` does not exist (Linux only)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def run(port: int, packet: bytes, connections: int, seconds: float, warmup: float = 0.5,
        churn: bool = False, pid: Optional[int] = None) -> Result:
    """Drive ``connections`` closed loops sending ``packet`` for ``seconds``; with
    ``pid`` (the server's process), also measure its CPU time over those seconds."""
    reply_size = len(packet)  # echo: the reply is the request
    selector = selectors.DefaultSelector()
    conns = []
    for _ in range(connections):
        conn = _Conn(_open(port))
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conns.append(conn)
    perf = time.perf_counter
    start = perf()
    measure_from = start + warmup
    stop = measure_from + seconds
    count = 0
    errors = 0
    latencies: list = []
    cpu_from = None
    cpu = float("nan")
    for conn in conns:
        conn.started = perf()
        conn.sock.sendall(packet)
    while True:
        now = perf()
        if now >= stop:
            break
        for key, _ in selector.select(timeout=0.5):
            conn = key.data
            try:
                data = conn.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                selector.unregister(conn.sock)
                conn.sock.close()
                conn.sock = _open(port)
                selector.register(conn.sock, selectors.EVENT_READ, conn)
                conn.received = 0
                conn.started = perf()
                conn.sock.sendall(packet)
                continue
            conn.received += len(data)
            if conn.received < reply_size:
                continue
            done = perf()
            if done >= measure_from:
                if cpu_from is None and pid is not None:
                    cpu_from = process_cpu(pid)
                count += 1
                latencies.append(done - conn.started)
            conn.received = 0
            if churn:
                selector.unregister(conn.sock)
                conn.sock.close()
                conn.sock = _open(port)
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.started = perf()
            conn.sock.sendall(packet)
    elapsed = min(perf(), stop) - measure_from
    if cpu_from is not None:
        cpu = process_cpu(pid) - cpu_from
    for conn in conns:
        selector.unregister(conn.sock)
        conn.sock.close()
    selector.close()
    return Result(count, elapsed, latencies, errors, cpu)
