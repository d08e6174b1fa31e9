"""The C load generator (``benchmarks/fastload.c``, driven by ``loadgen.FastDriver``)
is what ``make bench`` measures the servers with: it must count the replies of a real
echo server, and must not count as served a reply whose bytes are wrong (a fast
client that counted garbage would flatter a broken server)."""

from __future__ import annotations

import math
import socket
import threading

import pytest

from benchmarks import loadgen
from benchmarks.run import SERVERS, WORKLOADS, server

PACKET = WORKLOADS[0][2]


@pytest.fixture(scope="module")
def compiled() -> str:
    binary = loadgen.fastload_binary()
    if binary is None:
        pytest.fail("no C compiler (cc, gcc or clang) to build benchmarks/fastload.c; "
                    "install one (Debian/Ubuntu: sudo apt-get install gcc)")
    return binary


def test_it_counts_the_replies_of_the_bare_trio_echo_and_its_cpu(compiled):
    with server("bare trio", SERVERS["bare trio"]) as (port, pid):
        driver = loadgen.FastDriver(port, PACKET, 4, pid=pid)
        try:
            driver.drive(0.0, warmup=0.1)
            result = driver.drive(0.3)
            second = driver.drive(0.2, warmup=0.05)  # the same connections, again
        finally:
            driver.close()
    assert result.requests > 0 and result.errors == 0
    assert second.requests > 0 and second.errors == 0
    assert result.seconds == pytest.approx(0.3)
    assert 0 < result.percentile(0.50) <= result.percentile(0.99) < 1.0
    assert 0 < result.cpu_per_request < 1e6
    total = loadgen.combine([result, second])
    assert sum(total.histogram.values()) == total.requests == result.requests + second.requests


class FlippingEcho:
    """An echo server, in threads, that sends every request back with its last byte
    flipped: replies of the right length and the wrong bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while len(buffer) >= self.size:
                    request, buffer = buffer[: self.size], buffer[self.size :]
                    conn.sendall(request[:-1] + bytes([request[-1] ^ 0xFF]))

    def close(self) -> None:
        self.listener.close()


def test_a_reply_with_wrong_bytes_is_an_error_not_a_request(compiled):
    echo = FlippingEcho(len(PACKET))
    try:
        driver = loadgen.FastDriver(echo.port, PACKET, 4)
        try:
            result = driver.drive(0.3)
        finally:
            driver.close()
    finally:
        echo.close()
    assert result.errors > 0
    assert result.requests == 0 and math.isnan(result.percentile(0.5))


def test_churn_is_the_python_drivers_alone(compiled):
    with pytest.raises(ValueError, match="churn"):
        loadgen.FastDriver(1, PACKET, 1, churn=True)


@pytest.mark.parametrize("seconds", [0.0, 50e-9, 127e-9, 128e-9, 1e-6, 37.3e-6, 0.8e-3, 0.25, 3.0])
def test_the_latency_buckets_keep_a_latency_within_one_percent(seconds):
    """Python reads the C program's histogram with the same buckets (loadgen mirrors
    bucket_of and bucket_value): a bucket's midpoint stands for its latencies."""
    value = loadgen.bucket_value(loadgen.bucket_of(seconds))
    assert value == pytest.approx(seconds, rel=0.01, abs=1e-9)
