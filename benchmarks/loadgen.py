"""A closed-loop load generator with as little overhead of its own as Python allows.

Each connection keeps exactly one request in flight: it sends one packet, waits for
the whole reply (the length prefix says how long), records the latency, and sends the
next. Plain non-blocking sockets on ``selectors`` (epoll): no framework in the loop,
so the generator is not what is measured. ``churn=True`` opens a new connection for
every request instead (connect, send, receive, close: what AsyncAPY 0.5 clients do).

:class:`Driver` keeps one server's connections open across short measured slices
(``benchmarks.run`` interleaves the servers' slices); :func:`run` is one measurement
on fresh connections.

:class:`FastDriver` is the same closed loop in C (``benchmarks/fastload.c``, compiled on
first use): this one saturates its own core at about 60,000 requests/s, so on a
2-core machine every fast server measured alike; the C one leaves the server as the
bottleneck.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
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
    histogram: dict = field(default_factory=dict, repr=False)
    """{bucket: count} of latencies (see :func:`bucket_of`) not kept one by one in
    ``latencies``: what :class:`FastDriver` reports, a few hundred numbers per slice
    where a list would hold one per request."""

    @property
    def cpu_per_request(self) -> float:
        """Server CPU microseconds per request (NaN when not measured)."""
        return self.server_cpu / self.requests * 1e6 if self.requests else float("nan")

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if self.histogram:
            return _histogram_percentile(self.histogram, q)
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


EXACT_NS = 128
"""Latencies below this many nanoseconds have a bucket each; above, 64 buckets per
power of two (as ``benchmarks/fastload.c``, which this mirrors)."""
LAST_BUCKET = EXACT_NS + (40 - 7 + 1) * 64 - 1


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a latency: log-linear, at most 1/64 wide, so that a
    bucket's midpoint is within 0.8% of every latency in it."""
    ns = max(0, int(seconds * 1e9))
    if ns < EXACT_NS:
        return ns
    msb = ns.bit_length() - 1
    if msb > 40:
        return LAST_BUCKET
    return EXACT_NS + (msb - 7) * 64 + ((ns >> (msb - 6)) & 63)


def bucket_value(bucket: int) -> float:
    """Seconds: the midpoint of ``bucket``."""
    if bucket < EXACT_NS:
        return bucket * 1e-9
    k, sub = divmod(bucket - EXACT_NS, 64)
    shift = k + 1
    return (((64 + sub) << shift) + (1 << shift) / 2) * 1e-9


def _histogram_percentile(histogram: dict, q: float) -> float:
    """As :meth:`Result.percentile` over the latencies the histogram counts."""
    total = sum(histogram.values())
    rank = min(total - 1, int(q * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen > rank:
            return bucket_value(bucket)
    return float("nan")


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASTLOAD_SOURCE = os.path.join(ROOT, "benchmarks", "fastload.c")
FASTLOAD_BINARY = os.path.join(ROOT, "build", "fastload")


def c_compiler() -> Optional[str]:
    """The C compiler: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH; None if none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def fastload_binary() -> Optional[str]:
    """The path of the compiled ``benchmarks/fastload.c`` (``build/fastload``), compiled
    now if missing or older than its source; None when no C compiler is found.

    It is compiled under a temporary name and renamed into place, so that a process
    starting the binary never finds it half-written. A compiler that fails raises."""
    binary_time = os.path.getmtime(FASTLOAD_BINARY) if os.path.exists(FASTLOAD_BINARY) else -1.0
    if binary_time >= os.path.getmtime(FASTLOAD_SOURCE):
        return FASTLOAD_BINARY
    compiler = c_compiler()
    if compiler is None:
        return None
    os.makedirs(os.path.dirname(FASTLOAD_BINARY), exist_ok=True)
    partial = f"{FASTLOAD_BINARY}.{os.getpid()}"
    done = subprocess.run([compiler, "-O2", "-o", partial, FASTLOAD_SOURCE], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{compiler} could not compile {FASTLOAD_SOURCE}:\n{done.stderr}")
    os.replace(partial, FASTLOAD_BINARY)
    return FASTLOAD_BINARY


class FastDriver:
    """:class:`Driver`'s closed loops run by ``benchmarks/fastload.c``, a child process
    that keeps the connections open across calls to :meth:`drive` (one line command
    each). The Python loop spends about as much CPU per request as a fast server; this
    one a small fraction, so the server is what the measurement finds.

    ``churn`` (a new connection for every request) is :class:`Driver`'s alone: this
    raises ValueError for it. The CPU window is :class:`Driver`'s: with no warmup,
    from before the first request; with one, from the first counted reply (the
    program says ``start``); to the moment the program stops issuing requests (it
    says ``measured``, before it lets the requests in flight finish)."""

    def __init__(self, port: int, packet, connections: int, churn: bool = False,
                 pid: Optional[int] = None) -> None:
        if churn:
            raise ValueError("FastDriver keeps its connections: churn is Driver's alone")
        packets = packet if isinstance(packet, list) else [packet]
        if len(packets) not in (1, connections) or len({len(p) for p in packets}) != 1 or not packets[0]:
            raise ValueError("one packet per connection, all of the same size")
        binary = fastload_binary()
        if binary is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) to build benchmarks/fastload.c")
        self.pid = pid
        self.process = subprocess.Popen(
            [binary, str(port), str(connections), *(p.hex() for p in packets)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        try:
            self._expect("ready")
        except BaseException:
            self.close()
            raise

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"fastload exited with {self.process.wait()}")
        if line.startswith("error"):
            raise RuntimeError(f"fastload: {line}")
        return line

    def _expect(self, wanted: str) -> None:
        line = self._line()
        if line != wanted:
            raise RuntimeError(f"fastload said {line!r} where {wanted!r} was due")

    def drive(self, seconds: float, warmup: float = 0.0) -> Result:
        """As :meth:`Driver.drive`: run the loops for ``warmup`` + ``seconds``, count
        the replies of the last ``seconds``, and return once the requests in flight
        are answered."""
        assert self.process.stdin is not None
        pid = self.pid
        cpu_from = process_cpu(pid) if pid is not None and not warmup else None
        cpu_to = None
        self.process.stdin.write(f"drive {seconds!r} {warmup!r}\n")
        self.process.stdin.flush()
        while True:
            line = self._line()
            if line == "start":
                if pid is not None and cpu_from is None:
                    cpu_from = process_cpu(pid)
            elif line == "measured":
                if cpu_from is not None and pid is not None:
                    cpu_to = process_cpu(pid)
            elif line.startswith("result "):
                break
            else:
                raise RuntimeError(f"fastload said {line!r}")
        fields = line.split()
        histogram = {}
        if fields[6] != "-":
            for pair in fields[6].split(","):
                bucket, count = pair.split(":")
                histogram[int(bucket)] = int(count)
        cpu = float("nan")
        if cpu_from is not None and cpu_to is not None:
            cpu = cpu_to - cpu_from
        return Result(int(fields[1]), float(fields[3]), [], int(fields[2]), cpu, histogram)

    def close(self) -> None:
        """Ask the program to quit (closing its connections); kill it if it does not
        within 5 s."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            if self.process.poll() is None:
                self.process.stdin.write("quit\n")
            self.process.stdin.close()
        except OSError:  # it exited meanwhile
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def combine(results: list) -> Result:
    """One :class:`Result` of several slices of the same measurement (latencies kept
    one by one, or all in one histogram when any slice has one)."""
    latencies = [latency for r in results for latency in r.latencies]
    histogram: dict = {}
    if any(r.histogram for r in results):
        for r in results:
            for bucket, count in r.histogram.items():
                histogram[bucket] = histogram.get(bucket, 0) + count
        for latency in latencies:
            bucket = bucket_of(latency)
            histogram[bucket] = histogram.get(bucket, 0) + 1
        latencies = []
    return Result(
        sum(r.requests for r in results),
        sum(r.seconds for r in results),
        latencies,
        sum(r.errors for r in results),
        sum(r.server_cpu for r in results),
        histogram,
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
