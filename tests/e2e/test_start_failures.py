"""``server.start()`` that cannot start: one line on stderr and a non-zero exit, as
``asyncapy run`` says it, never a chained traceback (which stays at DEBUG level)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_a_port_in_use_is_one_line_and_exit_status_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_script(
            tmp_path,
            f"""
            from asyncapy import Server
            Server(addr="127.0.0.1", port={port}).start()
            """,
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [f"asyncapy: cannot listen on 127.0.0.1:{port}: Address already in use"], done.stderr


def test_the_traceback_is_there_at_debug_level(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_script(
            tmp_path,
            f"""
            from asyncapy import Server
            Server(addr="127.0.0.1", port={port}, logging_level="DEBUG").start()
            """,
        )
    assert done.returncode == 1
    assert "The server could not start" in done.stderr and "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"asyncapy: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_an_address_not_on_this_machine_is_one_line_and_exit_status_1(tmp_path):
    """A bind the system refuses for another reason (here the documentation range's
    192.0.2.1, on no interface: nothing is sent anywhere) fails the same way."""
    done = run_script(
        tmp_path,
        """
        from asyncapy import Server
        Server(addr="192.0.2.1", port=0).start()
        """,
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("asyncapy: cannot listen on 192.0.2.1:0: "), line
