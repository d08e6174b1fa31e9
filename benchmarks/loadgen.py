"""A closed-loop load generator with as little overhead of its own as Python allows.

Each connection keeps exactly one request in flight: it sends one packet, waits for
the whole reply (the length prefix says how long), records the latency, and sends the
next. Plain non-blocking sockets on ``selectors`` (epoll): no framework in the loop,
so the generator is not what is measured. ``churn=True`` opens a new connection for
every request instead (connect, send, receive, close: what AsyncAPY 0.5 clients do).

:class:`Driver` keeps one server's connections open across short measured slices
(``benchmarks.run`` interleaves the servers' slices); :func:`run` is one measurement
on fresh connections.
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
    __slots__ = ("sock", "received", "started", "packet")

    def __init__(self, sock: socket.socket, packet: bytes = b"") -> None:
        self.sock = sock
        self.received = 0
        self.started = 0.0
        self.packet = packet


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


DRAIN_LIMIT = 5.0
"""Seconds the requests in flight at the end of a slice are given to finish."""


class Driver:
    """``connections`` closed loops on one server, kept open across calls to
    :meth:`drive`, so that a measurement can be cut into short slices interleaved
    with other servers' without reconnecting for each.

    ``packet`` is the request of every connection, or a list of requests of one size,
    one per connection (e.g. each with its own API key)."""

    def __init__(self, port: int, packet, connections: int, churn: bool = False,
                 pid: Optional[int] = None) -> None:
        packets = packet if isinstance(packet, list) else [packet] * connections
        if len(packets) != connections or len({len(p) for p in packets}) != 1:
            raise ValueError("one packet per connection, all of the same size")
        self.port = port
        self.packet = packets[0]
        self.reply_size = len(packets[0])  # echo: the reply is the request
        self.churn = churn
        self.pid = pid
        self.selector = selectors.DefaultSelector()
        self.conns = []
        for own in packets:
            conn = _Conn(_open(port), own)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            self.conns.append(conn)

    def _reopen(self, conn: _Conn) -> None:
        self.selector.unregister(conn.sock)
        conn.sock.close()
        conn.sock = _open(self.port)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        conn.received = 0

    def drive(self, seconds: float, warmup: float = 0.0) -> Result:
        """Run the closed loops for ``warmup`` + ``seconds`` and count the replies of the
        last ``seconds``; then let the requests in flight finish (not counted), so
        the server is idle when this returns."""
        reply_size, selector, churn = self.reply_size, self.selector, self.churn
        perf = time.perf_counter
        start = perf()
        measure_from = start + warmup
        stop = measure_from + seconds
        count = 0
        errors = 0
        latencies: list = []
        cpu_from = process_cpu(self.pid) if self.pid is not None and not warmup else None
        cpu_to = None
        for conn in self.conns:
            conn.started = perf()
            conn.sock.sendall(conn.packet)
        in_flight = len(self.conns)
        stopping = False
        while in_flight:
            now = perf()
            if not stopping and now >= stop:
                stopping = True  # no new requests; the ones in flight finish
                if cpu_from is not None:
                    cpu_to = process_cpu(self.pid)
            if stopping and now >= stop + DRAIN_LIMIT:
                # A server that stopped answering: start those connections afresh.
                for conn in self.conns:
                    if conn.received or conn.started > 0:
                        self._reopen(conn)
                break
            for key, _ in selector.select(timeout=0.5):
                conn = key.data
                try:
                    data = conn.sock.recv(262144)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # the server closed it: a new connection, and on
                    errors += 1
                    self._reopen(conn)
                else:
                    conn.received += len(data)
                    if conn.received < reply_size:
                        continue
                    done = perf()
                    conn.received = 0
                    if measure_from <= done < stop:
                        if cpu_from is None and self.pid is not None:
                            cpu_from = process_cpu(self.pid)
                        count += 1
                        latencies.append(done - conn.started)
                    if churn:
                        self._reopen(conn)
                if stopping:
                    in_flight -= 1
                    conn.started = 0.0  # idle
                else:
                    conn.started = perf()
                    conn.sock.sendall(conn.packet)
        cpu = float("nan")
        if cpu_from is not None and cpu_to is not None:
            cpu = cpu_to - cpu_from
        return Result(count, stop - measure_from, latencies, errors, cpu)

    def close(self) -> None:
        for conn in self.conns:
            self.selector.unregister(conn.sock)
            conn.sock.close()
        self.selector.close()


def combine(results: list) -> Result:
    """One :class:`Result` of several slices of the same measurement."""
    return Result(
        sum(r.requests for r in results),
        sum(r.seconds for r in results),
        [latency for r in results for latency in r.latencies],
        sum(r.errors for r in results),
        sum(r.server_cpu for r in results),
    )


def run(port: int, packet, connections: int, seconds: float, warmup: float = 0.5,
        churn: bool = False, pid: Optional[int] = None) -> Result:
    """Drive ``connections`` closed loops sending ``packet`` for ``seconds`` (after
    ``warmup`` unmeasured ones); with ``pid`` (the server's process), also measure its
    CPU time over those seconds."""
    driver = Driver(port, packet, connections, churn, pid)
    try:
        return driver.drive(seconds, warmup)
    finally:
        driver.close()
