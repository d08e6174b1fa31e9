"""SIGTERM and SIGINT stop a single-process server gracefully, as an operator sees it.

The server is a subprocess started through ``Server.start()`` (tests/e2e/hostile_app.py).
With a slow handler in flight and an idle session open, the signal makes it:

* close its listener at once: a new connection is refused right after the signal,
  while the slow handler still runs;
* close the idle session;
* let the in-flight handler finish (within ``shutdown_grace``) and deliver its reply;
* release every session in the store, run ``shutdown()``, and exit with status 0.
"""

from __future__ import annotations

import re
import signal

import pytest
import trio

from .hostile_app import launch
from .wire import Wire, json_packet

HANDLING = re.compile(r"^hostile_app: handling$")
SHUTDOWN_RAN = re.compile(r"^hostile_app: shutdown ran, (\d+) session\(s\) left in the store$")
SLOW = 1.5
"""Seconds the in-flight handler takes: the signal arrives well before it is done."""


async def refused_soon(port: int, within: float = 0.5) -> None:
    """Assert that connecting to ``port`` is refused within ``within`` seconds (one
    that lands in the backlog just before the listener closes may still connect)."""
    with trio.fail_after(within):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await trio.aclose_forcefully(stream)
            await trio.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_refuses_new_connections_finishes_in_flight_work_and_exits_0(signum):
    running, port = launch(timeout=30, shutdown_grace=5)
    with running:
        async with await Wire.connect("127.0.0.1", port) as busy, await Wire.connect(
            "127.0.0.1", port
        ) as idle:
            assert await idle.request({"hello": 1}) == {"hello": 1}
            await busy.send(json_packet({"sleep": SLOW}))
            await trio.to_thread.run_sync(lambda: running.wait_for(HANDLING, stream="out"))
            signalled = trio.current_time()
            running.process.send_signal(signum)
            name = signal.Signals(signum).name
            await trio.to_thread.run_sync(lambda: running.wait_for(re.compile(f"{name} received")))

            await refused_soon(port)
            await idle.read_eof(timeout=1)  # the idle session is closed at once
            assert trio.current_time() - signalled < SLOW  # the handler is still running

            assert await busy.read_packet(timeout=5) == json_packet({"sleep": SLOW})
            await busy.read_eof(timeout=2)
        status = await trio.to_thread.run_sync(running.finish)
    assert status == 0, running.output
    [shutdown] = running.matches(SHUTDOWN_RAN, stream="out")
    assert shutdown.group(1) == "0", running.output  # every session released in the store
    assert "Traceback" not in running.output
    assert "Grace period over" not in running.output


async def test_a_handler_past_the_grace_period_is_cut_and_the_exit_is_still_0():
    running, port = launch(timeout=30, shutdown_grace=0.3)
    with running:
        async with await Wire.connect("127.0.0.1", port) as busy:
            await busy.send(json_packet({"sleep": 30}))
            await trio.to_thread.run_sync(lambda: running.wait_for(HANDLING, stream="out"))
            signalled = trio.current_time()
            running.process.send_signal(signal.SIGTERM)
            await busy.read_eof(timeout=3)  # no reply: the handler was cancelled
        status = await trio.to_thread.run_sync(running.finish)
        assert trio.current_time() - signalled < 3
    assert status == 0, running.output
    assert "Grace period over: closing 1 busy session(s)" in running.output
    assert running.matches(SHUTDOWN_RAN, stream="out")[0].group(1) == "0"
