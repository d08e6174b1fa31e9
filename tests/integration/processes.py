"""Server processes for the multi-process tests: ``python -m asyncapy run`` of
``tests.integration.redis_app:app`` with an INI config naming the shared Redis.

Readiness is read from the process's log ("AsyncAPY serving on"), never probed with a
connection: a probe would be a session, admitted into the shared store, that the
tests would then have to wait to see released.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.redis_app:app"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One ``asyncapy run`` process serving :data:`APP` on its own port."""

    def __init__(self, directory: Path, name: str, redis_url: str, **settings: object) -> None:
        self.name = name
        self.port = free_port()
        self.config = directory / f"{name}.ini"
        lines = ["[AsyncAPY]", f"store = {redis_url}"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = directory / f"{name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "asyncapy", "run", APP, "--port", str(self.port),
                 "--config", str(self.config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "ASYNCAPY_TEST_KEYS": redis_url},
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def serving(self, limit: float = 15) -> "ServerProcess":
        """Wait until the process says it serves (fail with its log if it dies)."""
        with trio.move_on_after(limit):
            while "AsyncAPY serving on" not in self.output():
                if self.process.poll() is not None:
                    pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
                await trio.sleep(0.02)
            return self
        pytest.fail(f"{self.name} did not start serving within {limit}s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no release, no last renewal."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL if it lingers; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode
