"""The command line, as a subprocess: ``python -m asyncapy run MODULE:ATTR``.

It serves, answers requests, stops gracefully on SIGTERM (exit status 0, the app's
``shutdown()`` hook run), and refuses bad input with one line naming the problem and a
non-zero status, never a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncapy.client import Client

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "asyncapy", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_until_serving(process: subprocess.Popen, port: int, limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the server exited early ({process.returncode}):\n{out}\n{err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail("the server never listened")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "asyncapy", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def stop(process: subprocess.Popen) -> tuple[str, str]:
    process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the server ignored SIGTERM:\n{out}\n{err}")


def test_run_serves_the_echo_example_and_exits_zero_on_sigterm():
    port = free_port()
    process = start("run", "examples.echo:app", "--port", str(port))
    try:
        wait_until_serving(process, port)
        with Client(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            assert client.request({"hello": "cli"}) == {"hello": "cli"}
            assert client.request({"again": 2}) == {"again": 2}
    finally:
        out, err = stop(process)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert f"127.0.0.1:{port}" in err  # the "serving on" log line
    assert "SIGTERM" in err


def test_sigterm_runs_the_shutdown_hook_and_closes_open_sessions():
    port = free_port()
    process = start(
        "run", "tests.e2e.cli_app:app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "WARNING",
    )
    try:
        wait_until_serving(process, port)
        with Client(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            assert client.request({"n": 1}) == {"n": 1}
            process.send_signal(signal.SIGTERM)
            # The idle session is closed by the shutdown.
            assert client.receive_raw() == b""
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert out.splitlines() == ["cli_app: setup ran", "cli_app: shutdown ran"]
    assert "Traceback" not in err
    assert "INFO" not in err  # --log-level WARNING was applied


@pytest.mark.parametrize(
    "args, names",
    [
        (["--port", "99999"], ["port", "99999"]),
        (["--log-level", "LOUD"], ["logging_level", "LOUD"]),
        (["--certfile", "/nonexistent/cert.pem"], ["certfile"]),
        (["--config", "/nonexistent/asyncapy.ini"], ["config"]),
    ],
)
def test_bad_flag_values_print_one_line_and_fail(args, names):
    result = run("run", "examples.echo:app", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("asyncapy:")
    for name in names:
        assert name in lines[0]


def test_bad_config_key_is_named(tmp_path):
    config = tmp_path / "bad.ini"
    config.write_text("[AsyncAPY]\nport = 8081\ntimeuot = 5\n")
    result = run("run", "examples.echo:app", "--config", str(config))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "timeuot" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "spec, message",
    [
        ("examples.echo:nope", "no attribute 'nope'"),
        ("no_such_module_here:app", "cannot import"),
        ("tests.e2e.cli_app:not_a_server", "not an asyncapy Server"),
        ("examples.echo", "MODULE:ATTR"),
        ("hello", "MODULE:ATTR"),
    ],
)
def test_bad_app_spec_prints_one_line_and_fails(spec, message):
    result = run("run", spec)
    assert result.returncode == 2  # bad input, as docs/cli.md promises
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_port_in_use_is_one_error_line_not_a_traceback():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("run", "examples.echo:app", "--port", str(port), "--log-level", "ERROR")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "ExceptionGroup" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("asyncapy:")
    assert f"127.0.0.1:{port}" in lines[0]


def test_tls_from_the_config_file_is_served(tmp_path, ca):
    """certfile/keyfile given in --config must switch the server to TLS."""
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile, cafile = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    config = tmp_path / "tls.ini"
    config.write_text(f"[AsyncAPY]\ncertfile = {certfile}\nkeyfile = {keyfile}\n")
    port = free_port()
    process = start("run", "examples.echo:app", "--port", str(port), "--config", str(config))
    try:
        wait_until_serving(process, port)
        with Client(tls=True, cafile=str(cafile), timeout=5) as client:
            client.connect("127.0.0.1", port)
            assert client.request({"tls": "from config"}) == {"tls": "from config"}
    finally:
        out, err = stop(process)
    assert process.returncode == 0, err
    assert "(TLS)" in err
