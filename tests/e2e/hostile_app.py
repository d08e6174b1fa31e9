"""A single-process echo server run as a subprocess, for the hostile-client tests.

``python -m tests.e2e.hostile_app '{"timeout": 30, ...}'`` serves on 127.0.0.1 and a
free port through :meth:`Server.start`, the blocking entry point an application calls
(logging configured, SIGINT and SIGTERM handled), with the JSON object's settings.
Two extra keys: ``nofile_soft`` (and ``nofile_hard``) lower the process's open-file
limits before the server starts, as a shell's ``ulimit -Sn`` (``-Hn``) would, so a
test can show that the server raises the soft one by itself, and warns when the hard
one is too low.

``{"sleep": s}`` is answered after ``s`` seconds (an in-flight request for the
shutdown tests), and the line ``hostile_app: handling`` is printed when it starts.
``shutdown()`` prints how many sessions the store still holds for 127.0.0.1.

A subprocess, so that a test can read the server's own memory (``VmRSS``) and limits
from ``/proc``, signal it, and hold thousands of connections without sharing one
process's file descriptors between both ends.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import trio

from asyncapy import Client, Packet, Server

SERVING = re.compile(r"AsyncAPY serving on 127\.0\.0\.1:(\d+) ")


def _say(line: str) -> None:
    os.write(1, f"hostile_app: {line}\n".encode())


class App(Server):
    async def shutdown(self) -> None:
        left = await self.store.sessions("127.0.0.1")
        _say(f"shutdown ran, {len(left)} session(s) left in the store")


def main(settings: dict[str, Any]) -> None:
    soft = settings.pop("nofile_soft", None)
    hard = settings.pop("nofile_hard", None)
    if soft is not None:
        import resource

        hard = hard if hard is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    app = App(addr="127.0.0.1", port=0, **settings)

    @app.add_handler()
    async def echo(client: Client, packet: Packet) -> None:
        delay = packet.get("sleep")
        if delay:
            _say("handling")
            await trio.sleep(delay)
        await client.send(packet)

    app.start()


def launch(**settings: Any):
    """Start the app with ``settings``; ``(running, port)`` once it listens. Use the
    :class:`~tests.e2e.processes.Running` as a context manager (it kills on exit)."""
    from .processes import Running

    running = Running([sys.executable, "-m", "tests.e2e.hostile_app", json.dumps(settings)])
    try:
        port = int(running.wait_for(SERVING, timeout=15)[0].group(1))
    except BaseException:
        running.kill()
        raise
    return running, port


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid``, from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_file_limit(pid: int) -> int:
    """The soft open-file limit of process ``pid``, from ``/proc/PID/limits``."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"no open-file limit for {pid}")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
