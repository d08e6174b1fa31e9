"""A running ``python -m asyncapy run ...`` whose output a test can wait on, line by line.

The ``--workers`` tests need more than :mod:`subprocess` gives: the supervisor's log
says where it serves (port 0 becomes a real port), which worker pids serve, and when
one was restarted, while it is still running. :class:`Running` reads stdout and
stderr on two threads and lets a test wait for a line matching a pattern. On exit it
kills what is left, the workers included (they live in a session of their own, so
killing the supervisor alone would leave them to notice by themselves).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import pytest

from asyncapy.client import Client

ROOT = Path(__file__).resolve().parents[2]

SERVING = re.compile(r"AsyncAPY serving on (\S+):(\d+) \((TLS|plain TCP)\) with (\d+) worker processes")
"""The supervisor's line saying where it serves."""
WORKER_SERVING = re.compile(r"Worker (\d+) \(pid (\d+)\) serving")
"""The supervisor's line saying a worker is ready."""


class Running:
    """One ``asyncapy`` command line, run from the repository root (or ``cwd``), output collected."""

    def __init__(
        self,
        command: Sequence[str],
        env: Optional[dict] = None,
        new_session: bool = False,
        cwd: Optional[Path] = None,
    ) -> None:
        self.command = list(command)
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd or ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            # Its own process group, as a command typed at a terminal has: a test can
            # then send Ctrl-C's SIGINT to the group without hitting pytest.
            start_new_session=new_session,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def asyncapy(cls, *args: str, new_session: bool = False) -> "Running":
        """``python -m asyncapy ARGS...``."""
        return cls([sys.executable, "-m", "asyncapy", *args], new_session=new_session)

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything read so far, stderr then stdout (for failure messages)."""
        with self._changed:
            return "\n".join(["--- stderr", *self.err, "--- stdout", *self.out])

    def matches(self, pattern: re.Pattern, stream: str = "err") -> list[re.Match]:
        """Every line of ``stream`` ("err" or "out") read so far that ``pattern`` finds."""
        with self._changed:
            lines = list(self.err if stream == "err" else self.out)
        return [m for m in map(pattern.search, lines) if m]

    def wait_for(
        self, pattern: re.Pattern, count: int = 1, timeout: float = 10, stream: str = "err"
    ) -> list[re.Match]:
        """Wait until ``count`` lines match ``pattern``; fail the test (with the output)
        if the process exits or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.matches(pattern, stream)
                if len(found) >= count:
                    return found
                if self.process.poll() is not None and not any(r.is_alive() for r in self._readers):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.1))
        pytest.fail(f"no {count} line(s) matching {pattern.pattern!r} in {timeout}s:\n{self.output}")

    def serving(self, workers: int, timeout: float = 15) -> int:
        """Wait for the supervisor's port and ``workers`` ready workers; the port."""
        port = int(self.wait_for(SERVING, timeout=timeout)[0].group(2))
        self.wait_for(WORKER_SERVING, count=workers, timeout=timeout)
        return port

    def worker_pids(self) -> set[int]:
        """Pids of every worker that reported ready so far (restarted ones included)."""
        return {int(m.group(2)) for m in self.matches(WORKER_SERVING)}

    def finish(self, timeout: float = 10) -> int:
        """Wait for the process to exit (failing the test after ``timeout``); its status."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout}s:\n{self.output}")
        for reader in self._readers:
            reader.join(timeout=5)
        return self.process.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send ``sig`` and wait for the exit status."""
        self.process.send_signal(sig)
        return self.finish(timeout)

    def kill(self) -> None:
        """SIGKILL the process and every worker it reported (cleanup after a failure)."""
        for pid in [self.process.pid, *self.worker_pids()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.process.wait(timeout=5)

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None or any(alive(pid) for pid in self.worker_pids()):
            self.kill()


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def ask(port: int, payload: dict, timeout: float = 5) -> dict:
    """One request on a fresh connection to 127.0.0.1:``port``; the reply."""
    with Client(tls=False, timeout=timeout) as client:
        client.connect("127.0.0.1", port)
        return client.request(payload)
