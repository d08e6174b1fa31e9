"""No password on the terminal: ``python -m asyncapy`` as a subprocess, every path the
audit found printing one (docs/security.md, "Secrets in messages").

Each bad input fails with one line on stderr that names the setting and what is
wrong, shows the URL with its password masked, and no traceback; a server running
with a password in its store URL logs none, at DEBUG, with workers, with the
password right or wrong. The library-level paths are in tests/unit/test_secrets.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest
import redis
import trio

from asyncapy.client import Client
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "S3cr3t-pw"
"""The password of every URL here: it must appear on no output."""


async def asyncapy(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python -m asyncapy ARGS`` from the repository root; its result."""
    environment = {k: v for k, v in os.environ.items() if k != "ASYNCAPY_STORE"}
    environment.update(env or {})
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "asyncapy", *args],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environment,
        )


async def run_all(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Several commands (``(args, env)`` pairs) at once: each starts a Python."""
    results: list = [None] * len(commands)

    async def one(index: int, args: tuple, env: Optional[dict]) -> None:
        results[index] = await asyncapy(*args, env=env)

    async with trio.open_nursery() as nursery:
        for index, (args, env) in enumerate(commands):
            nursery.start_soon(one, index, args, env)
    return results


def one_hidden_line(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    """Assert ``result`` failed with ``status`` and one stderr line holding
    ``fragments``, and no password anywhere; return the line."""
    out, err = result.stdout.decode(), result.stderr.decode()
    assert PASSWORD not in out + err, err
    assert result.returncode == status, (result.returncode, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


async def test_broken_store_urls_and_config_files_print_no_password(tmp_path):
    misspelt = tmp_path / "misspelt.ini"
    misspelt.write_text(f"[AsyncAPY]\nport = 0\nstroe = redis://:{PASSWORD}@127.0.0.1:6379/0\n")
    bad_db = tmp_path / "bad-db.ini"
    bad_db.write_text(f"[AsyncAPY]\nstore = redis://:{PASSWORD}@127.0.0.1:6379/-1\n")
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"REDIS_URL=redis://:{PASSWORD}@127.0.0.1:6379/0\nAPI_TOKEN={PASSWORD}\n")
    app = tmp_path / "secret_app.py"  # the store given in Python, by the app itself
    app.write_text(
        textwrap.dedent(
            f"""
            from asyncapy import Server

            app = Server(store="redis://:{PASSWORD}@127.0.0.1:6379/abc")
            """
        )
    )
    run = ("run", "examples.echo:app", "--port", "0")
    results = await run_all(
        ((*run, "--store", f"redis://:{PASSWORD}@127.0.0.1:bad/0"), None),
        ((*run, "--store", f"redsi://:{PASSWORD}@127.0.0.1:6379/0"), None),
        ((*run, "--store", f"redis://:{PASSWORD}@127.0.0.1:6379/abc"), None),
        ((*run, "--store", f"redis://:{PASSWORD}@127.0.0.1:6379/0?foo=1"), None),
        ((*run, "--workers", "2", "--store", f"redis:/:{PASSWORD}@127.0.0.1:6379/0"), None),
        ((*run, "--config", str(misspelt)), None),
        ((*run, "--config", str(bad_db)), None),
        ((*run, "--config", str(dotenv)), None),
        (("run", "secret_app:app"), {"PYTHONPATH": str(tmp_path)}),
        (("keys", "issue", "--store", f"redis://:{PASSWORD}@127.0.0.1:6379/abc"), None),
        (("keys", "issue", "--store", f"ftp://:{PASSWORD}@127.0.0.1/"), None),
        (("keys", "issue", "--store", f"redis:/:{PASSWORD}@127.0.0.1/0"), None),  # read as MODULE:ATTR
        (("keys", "issue"), {"ASYNCAPY_STORE": f"redis://:{PASSWORD}@127.0.0.1:0/0"}),
    )
    masked = "redis://:***@127.0.0.1"
    port, scheme, db, query, slash, misspelt_key, db_in_file, env_file, in_python, *keys = results
    one_hidden_line(port, "invalid store in --store", f"{masked}:bad/0", "port", "accepted")
    one_hidden_line(scheme, "--store", "redsi://:***@127.0.0.1:6379/0", "scheme")
    one_hidden_line(db, "--store", f"{masked}:6379/abc", "database", "from 0 to 2147483647")
    one_hidden_line(query, "store", "unknown query parameter 'foo'")
    one_hidden_line(slash, "--store", "redis:/:***@127.0.0.1:6379/0", "SCHEME://")
    one_hidden_line(misspelt_key, "stroe", str(misspelt), f"{masked}:6379/0")
    one_hidden_line(db_in_file, "store", str(bad_db), "database")
    one_hidden_line(env_file, "config", str(dotenv), "line 1", "[section]")
    # a bad setting raised while importing the app: status 2, as for any bad setting,
    # naming the file and line that raised it
    one_hidden_line(in_python, "secret_app", "secret_app.py, line 4", f"{masked}:6379/abc", "database")
    key_db, key_scheme, key_slash, key_env = keys
    one_hidden_line(key_db, "asyncapy keys", "--store", f"{masked}:6379/abc", "database")
    one_hidden_line(key_scheme, "asyncapy keys", "ftp://:***@127.0.0.1/", "scheme")
    one_hidden_line(key_slash, "asyncapy keys", "/:***@127.0.0.1/0")
    one_hidden_line(key_env, "asyncapy keys", "port")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_and_stop(store: str, *flags: str) -> tuple[str, str, Optional[dict]]:
    """Serve the echo example on ``store`` at DEBUG, make one request, stop with SIGTERM:
    the output and the reply (None if the connection was refused)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncapy", "run", "examples.echo:app", "--port", str(port),
         "--store", store, "--log-level", "DEBUG", *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    reply = None
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.communicate()
            try:
                with Client(tls=False, timeout=5) as client:
                    client.connect("127.0.0.1", port)
                    reply = client.request({"hello": 1})
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the server never listened"
                time.sleep(0.1)
            except (ConnectionError, OSError, ValueError):
                break  # refused by the server: the store is unavailable
    finally:
        process.terminate()
        out, err = process.communicate(timeout=20)
    return out, err, reply


@pytest.fixture
def redis_with_password():
    """A redis-server of its own, which requires :data:`PASSWORD`."""
    server = RedisServer().start()
    try:
        redis.Redis(host="127.0.0.1", port=server.port).config_set("requirepass", PASSWORD)
        yield server
    finally:
        server.stop()


def test_a_server_with_a_password_in_its_store_url_never_logs_it(redis_with_password):
    """At DEBUG, with a supervisor and workers (whose log names the store) and with a
    wrong password (each admission refused, and logged)."""
    good = f"redis://:{PASSWORD}@127.0.0.1:{redis_with_password.port}/0"
    out, err, reply = serve_and_stop(good, "--workers", "2")
    assert reply == {"hello": 1}, err
    assert PASSWORD not in out + err
    assert f"redis://127.0.0.1:{redis_with_password.port}/0" in err  # the store, named

    wrong = f"redis://:{PASSWORD}-but-wrong@127.0.0.1:{redis_with_password.port}/0"
    out, err, reply = serve_and_stop(wrong)
    assert reply != {"hello": 1}
    assert "unavailable" in err, err
    assert PASSWORD not in out + err
