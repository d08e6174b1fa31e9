"""``asyncapy send``, run as a subprocess against a real server in the test's trio run.

Replies are printed as JSON (one compact line when piped, indented on a terminal),
stdin mode keeps one connection and the order of the lines, ZiProto byte strings
round-trip as ``{"$bytes": ...}``, and every failure is one line on stderr with a
distinct status (2 bad input, 1 network or protocol, 3 an error reply), never a
traceback. The top-level ``--help`` and ``--version`` are checked here too.
"""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Optional

import trio

from asyncapy import Packet, Server
from tests.conftest import serving

ROOT = Path(__file__).resolve().parents[2]


async def asyncapy(*args: str, stdin: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """``python -m asyncapy ARGS`` from the repository root, run while the server serves."""
    with trio.fail_after(20):
        return await trio.run_process(
            [sys.executable, "-m", "asyncapy", *args],
            cwd=ROOT,
            stdin=stdin if stdin is not None else b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def asyncapy_all(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Several independent ``asyncapy`` commands (argument tuples) at once; their results."""
    results: list = [None] * len(commands)

    async def one(index: int, args: tuple) -> None:
        results[index] = await asyncapy(*args)

    async with trio.open_nursery() as nursery:
        for index, args in enumerate(commands):
            nursery.start_soon(one, index, args)
    return results


def replies(result: subprocess.CompletedProcess) -> list:
    """The JSON documents of stdout, one a line (and nothing on stderr)."""
    assert result.stderr == b"", result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def one_error_line(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    """Assert ``result`` failed with ``status`` and one stderr line holding ``fragments``."""
    err = result.stderr.decode()
    assert result.returncode == status, (result.returncode, err, result.stdout)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("asyncapy send: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    """A TCP port nothing listens on, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kinds_server(**kwargs) -> Server:
    """Replies with the Python type of field ``b`` as the server decoded it, ``b`` itself,
    and an integer key (which JSON cannot hold): what ZiProto can carry and JSON cannot."""
    server = Server(addr="127.0.0.1", port=0, timeout=5, **kwargs)

    @server.add_handler()
    async def kinds(client, packet: Packet) -> None:
        await client.send(Packet({"kind": type(packet["b"]).__name__, "b": packet["b"], 1: "int key"}, "ziproto"))

    return server


def session_server() -> Server:
    """Echoes ``n`` with the session's id; raises (an ERR_INTERNAL reply) on ``boom``."""
    server = Server(addr="127.0.0.1", port=0, timeout=5)

    @server.add_handler()
    async def numbered(client, packet: Packet) -> None:
        if "boom" in packet:
            raise RuntimeError("boom, as asked")
        await client.send(Packet({"n": packet["n"], "session": str(client.session.session_id)}, "json"))

    return server


# -- replies -------------------------------------------------------------------------
async def test_one_packet_one_compact_line(make_echo):
    async with serving(make_echo()) as (host, port):
        result = await asyncapy("send", "--no-tls", f"{host}:{port}", '{"hello": "wörld", "n": [1, 2]}')
    assert result.returncode == 0
    assert result.stdout.decode("utf-8") == '{"hello":"wörld","n":[1,2]}\n'
    assert replies(result) == [{"hello": "wörld", "n": [1, 2]}]


async def test_pretty_on_a_terminal_and_with_pretty(make_echo):
    payload = {"hello": "world", "n": [1, 2]}
    expected = json.dumps(payload, indent=2)
    async with serving(make_echo()) as (host, port):
        forced = await asyncapy("send", "--no-tls", f"{host}:{port}", json.dumps(payload), "--pretty")
        master, slave = pty.openpty()
        try:
            with trio.fail_after(20):
                process = await trio.run_process(
                    [sys.executable, "-m", "asyncapy", "send", "--no-tls", f"{host}:{port}", json.dumps(payload)],
                    cwd=ROOT,
                    stdin=b"",
                    stdout=slave,
                    capture_stderr=True,
                    check=False,
                )
        finally:
            os.close(slave)
        on_terminal = await trio.to_thread.run_sync(read_all, master)
    assert forced.returncode == 0 and forced.stdout.decode() == expected + "\n"
    assert process.returncode == 0, process.stderr
    assert on_terminal.replace("\r\n", "\n") == expected + "\n"


def read_all(master: int) -> str:
    """Everything written to a pty whose other end is closed (then closes ``master``)."""
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other end is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return b"".join(chunks).decode()


async def test_ziproto_bytes_round_trip_as_dollar_bytes():
    async with serving(kinds_server()) as (host, port):
        result = await asyncapy(
            "send", "--no-tls", f"{host}:{port}", '{"b": {"$bytes": "AAEC/w=="}}', "--encoding", "ziproto"
        )
    assert result.returncode == 0, result.stderr
    # The server got a byte string; the reply's byte string and integer key are printed as JSON.
    assert replies(result) == [{"kind": "bytes", "b": {"$bytes": "AAEC/w=="}, "1": "int key"}]


async def test_header_size_2_little_endian_against_a_server_configured_alike(make_echo):
    async with serving(make_echo(header_size=2, byteorder="little")) as (host, port):
        result = await asyncapy(
            "send", "--no-tls", f"{host}:{port}", '{"small": "header"}',
            "--header-size", "2", "--byteorder", "little", "--timeout", "5",
        )
    assert result.returncode == 0, result.stderr
    assert replies(result) == [{"small": "header"}]


async def test_ipv6_address_in_brackets(make_echo):
    async with serving(make_echo(), host="::1") as (host, port):
        result = await asyncapy("send", "--no-tls", f"[{host}]:{port}", '{"v": 6}')
    assert result.returncode == 0, result.stderr
    assert replies(result) == [{"v": 6}]


async def test_stdin_lines_go_on_one_connection_and_come_back_in_order():
    lines = b'{"n": 1}\n\n{"n": 2}\n{"n": 3}\n'  # the blank line is skipped
    async with serving(session_server()) as (host, port):
        result = await asyncapy("send", "--no-tls", f"{host}:{port}", "-", stdin=lines)
    assert result.returncode == 0
    got = replies(result)
    assert [reply["n"] for reply in got] == [1, 2, 3]
    assert len({reply["session"] for reply in got}) == 1


async def test_error_reply_is_printed_and_exits_3_after_every_line():
    async with serving(session_server()) as (host, port):
        result = await asyncapy(
            "send", "--no-tls", f"{host}:{port}", "-", stdin=b'{"n": 1, "boom": true}\n{"n": 2}\n'
        )
    assert result.returncode == 3
    failure, second = replies(result)
    assert failure == {"status": "failure", "error": "ERR_INTERNAL"}
    assert second["n"] == 2  # the session went on after the error reply


async def test_tls_verified_with_cafile(make_echo, tls_files):
    server = make_echo(certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    async with serving(server) as (host, port):
        result, refused = await asyncapy_all(
            ("send", f"{host}:{port}", '{"over": "tls"}', "--cafile", tls_files["cafile"]),
            ("send", f"{host}:{port}", '{"over": "tls"}', "--timeout", "5"),
        )
    assert result.returncode == 0, result.stderr
    assert replies(result) == [{"over": "tls"}]
    # The default is TLS verified against the system's CAs, which never signed the test CA.
    one_error_line(refused, 1, "certificate verification failed", f"{host}:{port}", "--cafile")


# -- errors --------------------------------------------------------------------------
async def test_tls_against_a_plain_server_suggests_no_tls(make_echo):
    async with serving(make_echo()) as (host, port):
        result = await asyncapy("send", f"{host}:{port}", '{"a": 1}', "--timeout", "5")
    one_error_line(result, 1, "TLS handshake", "--no-tls")


async def test_connection_refused():
    port = free_port()
    result = await asyncapy("send", "--no-tls", f"127.0.0.1:{port}", '{"a": 1}')
    one_error_line(result, 1, "connection refused", f"127.0.0.1:{port}")
    assert result.stdout == b""


async def test_bad_json_is_refused_before_connecting():
    # Nothing listens there: the JSON error proves nothing was even tried.
    port = free_port()
    bad, not_object = await asyncapy_all(
        ("send", "--no-tls", f"127.0.0.1:{port}", '{"a": '),
        ("send", "--no-tls", f"127.0.0.1:{port}", "[1, 2]"),
    )
    one_error_line(bad, 2, "not valid JSON")
    one_error_line(not_object, 2, "JSON object", "list")


async def test_bad_stdin_line_stops_after_the_replies_before_it():
    async with serving(session_server()) as (host, port):
        result = await asyncapy("send", "--no-tls", f"{host}:{port}", "-", stdin=b'{"n": 1}\n{"n": \n{"n": 3}\n')
    one_error_line(result, 2, "stdin line 2", "not valid JSON")
    assert [json.loads(line)["n"] for line in result.stdout.decode().splitlines()] == [1]


async def test_timeout_when_no_reply_comes():
    silent = Server(addr="127.0.0.1", port=0, timeout=5)  # no handler: nothing is ever sent
    async with serving(silent) as (host, port):
        result = await asyncapy("send", "--no-tls", f"{host}:{port}", '{"a": 1}', "--timeout", "0.5")
    one_error_line(result, 1, "no reply", "0.5s")


async def test_server_closing_without_a_reply():
    server = Server(addr="127.0.0.1", port=0, timeout=5)

    @server.add_handler()
    async def hang_up(client, packet: Packet) -> None:
        await client.close()

    async with serving(server) as (host, port):
        result = await asyncapy("send", "--no-tls", f"{host}:{port}", '{"a": 1}')
    one_error_line(result, 1, "closed the connection without replying")


async def test_malformed_reply():
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"\x00\x00\x00\x05\x16\x00{{{")  # a whole packet, not JSON
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        result = await asyncapy("send", "--no-tls", f"127.0.0.1:{port}", '{"a": 1}', "--timeout", "5")
        nursery.cancel_scope.cancel()
    one_error_line(result, 1, "malformed reply")


async def test_bad_addresses_and_flags_are_usage_errors():
    no_port, bare_v6, big_port, cafile_without_tls, bad_header = await asyncapy_all(
        ("send", "--no-tls", "127.0.0.1", "{}"),
        ("send", "--no-tls", "::1:8081", "{}"),
        ("send", "--no-tls", "127.0.0.1:99999", "{}"),
        ("send", "--no-tls", "127.0.0.1:8081", "{}", "--cafile", "ca.pem"),
        ("send", "127.0.0.1:8081", "{}", "--header-size", "3"),
    )
    one_error_line(no_port, 2, "HOST:PORT")
    one_error_line(bare_v6, 2, "[::1]:8081")
    one_error_line(big_port, 2, "1 to 65535")
    one_error_line(cafile_without_tls, 2, "--cafile", "--no-tls")
    one_error_line(bad_header, 2, "--header-size", "--help")


# -- help ----------------------------------------------------------------------------
async def test_help_explains_every_flag_and_hides_the_worker_command():
    top, send, version, unknown = await asyncapy_all(("--help",), ("send", "--help"), ("--version",), ("nope",))
    assert top.returncode == send.returncode == version.returncode == 0
    text = top.stdout.decode()
    for command in ("run", "send", "keys"):
        assert command in text
    assert "_worker" not in text
    help_text = " ".join(send.stdout.decode().split())
    for flag, default in [
        ("--encoding", "(default: json)"),
        ("--tls, --no-tls", "(default: TLS"),
        ("--cafile", "(default: the system's CAs)"),
        ("--header-size", "(default: 4)"),
        ("--byteorder", "(default: big)"),
        ("--timeout", "(default: 10.0)"),
        ("--pretty, --no-pretty", "(default: indented when stdout is a terminal"),
    ]:
        assert flag in help_text and default in help_text, flag
    assert version.stdout.decode().startswith("asyncapy ")
    line = unknown.stderr.decode().strip()
    assert unknown.returncode == 2 and "\n" not in line and "_worker" not in line and "'send'" in line
