"""An application for the ``--workers`` tests: it tells which process answered.

Every reply carries ``os.getpid()``, so a test can prove that more than one worker
served it and that a restarted worker (a new pid) serves again. ``{"sleep": s}`` is
answered after ``s`` seconds: an in-flight request for the graceful-shutdown test.
The ``setup``/``shutdown`` hooks print a line with the pid, so a test can count them
per worker. ``limited`` is the same app with a session limit, which several workers
may only serve with a shared (Redis) store. ``crashing`` fails in ``setup()``, every
time: a worker that cannot start, for the crash-loop test.
"""

import os

import trio

from asyncapy import Client, Packet, Server


def _say(line: str) -> None:
    # One write(2) per line: the workers share the supervisor's stdout, and print()
    # writes the text and the newline separately, so two workers' lines could mix.
    os.write(1, f"{line}\n".encode())


class App(Server):
    """Prints when its hooks run, with the pid of the worker running them."""

    async def setup(self) -> None:
        """Announce that this worker is starting (stdout, one line)."""
        _say(f"workers_app: setup ran in {os.getpid()}")

    async def shutdown(self) -> None:
        """Announce that this worker ran its shutdown hook (stdout, one line)."""
        _say(f"workers_app: shutdown ran in {os.getpid()}")


class Crashing(App):
    """An app whose every worker dies on start, as a bad deployment would."""

    async def setup(self) -> None:
        """Fail, as a setup() whose database is unreachable would."""
        raise RuntimeError("workers_app: setup failed on purpose")


def _build(kind: type = App, **settings) -> App:
    app = kind(timeout=10, shutdown_grace=5, **settings)

    @app.add_handler()
    async def whoami(client: Client, packet: Packet) -> None:
        """Reply with this process's pid, after sleeping ``sleep`` seconds if asked."""
        delay = packet.get("sleep", 0)
        if delay:
            await trio.sleep(delay)
        await client.send(Packet({"pid": os.getpid(), "slept": delay}, packet.encoding))

    return app


app = _build()
limited = _build(session_limit=3)
crashing = _build(Crashing)
