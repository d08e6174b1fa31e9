"""``timeout`` is a deadline for the whole reply, in both clients and ``asyncapy send``.

A real server on loopback answers each request with a valid packet trickled one byte
every 0.3 s (about 20 s for the whole reply): a per-read timeout would never fire, so
a client honouring only that would be held for the whole trickle. Each client is
given 1.5 s and must give up with a ``TimeoutError`` (the CLI: one line, status 1)
long before the trickle ends. The bound asserted (8 s) is a correctness bound, far
above the deadline and far below the trickle, not a speed claim.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from asyncapy.client import AsyncClient, Client
from tests.e2e.wire import json_packet

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 1.5
BYTE_EVERY = 0.3
BOUND = 8.0
REPLY = json_packet({"slow": "x" * 60})  # 60+ bytes: about 20 s at one byte per 0.3 s


class TricklingServer:
    """Accepts on 127.0.0.1, reads a request, then writes :data:`REPLY` byte by byte."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.bytes_sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            try:
                if not connection.recv(65536):
                    return
                for index in range(len(REPLY)):
                    if self.stopped.wait(BYTE_EVERY):
                        return
                    connection.sendall(REPLY[index : index + 1])
                    self.bytes_sent += 1
            except OSError:
                return  # the client gave up and closed

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def trickling():
    server = TricklingServer()
    yield server
    server.close()


def test_blocking_client_deadline_covers_the_whole_reply(trickling):
    with Client(tls=False, timeout=TIMEOUT) as client:
        client.connect("127.0.0.1", trickling.port)
        client.send({"hello": "slow"})
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no whole reply within 1.5s"):
            client.receive()
        elapsed = time.monotonic() - started
    assert TIMEOUT * 0.9 <= elapsed < BOUND, elapsed
    assert trickling.bytes_sent >= 2  # bytes did arrive: a per-read timeout would not fire


def test_blocking_client_keeps_its_socket_timeout_after_a_reply(trickling):
    # The deadline moves the socket's timeout while it waits; it is restored after.
    with Client(tls=False, timeout=TIMEOUT) as client:
        client.connect("127.0.0.1", trickling.port)
        client.send({"hello": "slow"})
        with pytest.raises(TimeoutError):
            client.receive()
        assert client.sock.gettimeout() == TIMEOUT


async def test_async_client_deadline_covers_the_whole_reply(trickling):
    async with AsyncClient(tls=False, timeout=TIMEOUT) as client:
        await client.connect("127.0.0.1", trickling.port)
        await client.send({"hello": "slow"})
        started = trio.current_time()
        with pytest.raises(TimeoutError, match="no whole reply within 1.5s"):
            await client.receive()
        elapsed = trio.current_time() - started
    assert TIMEOUT * 0.9 <= elapsed < BOUND, elapsed


def test_cli_timeout_covers_the_whole_reply(trickling):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "asyncapy", "send", "--no-tls", f"127.0.0.1:{trickling.port}",
         '{"hello": "slow"}', "--timeout", str(TIMEOUT)],
        cwd=ROOT, capture_output=True, timeout=30, check=False,
    )
    elapsed = time.monotonic() - started
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert err.strip().splitlines() == [
        f"asyncapy send: no reply from 127.0.0.1:{trickling.port} within 1.5s"
    ]
    assert elapsed < BOUND + 5, elapsed  # interpreter start-up included


def test_a_reply_that_arrives_in_time_still_comes_whole():
    # A reply split in two reads, well inside the deadline: the deadline is not a
    # per-read timeout in disguise and does not cut a reply that comes in time.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(REPLY[:5])
            time.sleep(0.2)
            connection.sendall(REPLY[5:])
            time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with Client(tls=False, timeout=TIMEOUT) as client:
            client.connect("127.0.0.1", listener.getsockname()[1])
            assert client.request({"a": 1}) == {"slow": "x" * 60}
    finally:
        listener.close()
        thread.join(5)
