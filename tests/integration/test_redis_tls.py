"""Redis over TLS end to end: ``rediss+cluster://`` and ``rediss+sentinel://`` with real
TLS-only nodes (trustme certificates, client certificates required), through the
command line as an operator uses them: ``asyncapy keys`` issues a key, ``asyncapy run
--store`` serves it with its sessions in the same Redis; and the two mistakes an
operator makes: a CA file that does not exist (refused before anything connects, exit
2) and a TLS URL whose node speaks plain TCP (one line saying the store speaks TLS,
never the password)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asyncapy.client import Client as BlockingClient
from tests.e2e.processes import Running
from tests.integration.test_store_setting import APP, SERVING
from tests.real_parts import RedisCluster, SentinelSet, TLSFiles


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def tls_store(request):
    parts = RedisCluster(tls=True) if request.param == "cluster" else SentinelSet(tls=True)
    with parts.start():
        yield parts


def _asyncapy(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncapy", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def test_keys_and_run_over_tls(tls_store, tmp_path):
    tls_store.flush()
    url = tls_store.url
    issued = _asyncapy("keys", "issue", "--metadata", '{"user": "tess"}', "--store", url)
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    (tmp_path / "store_app.py").write_text(APP)
    command = [sys.executable, "-m", "asyncapy", "run", "store_app:app", "--port", "0", "--store", url]
    with Running(command, env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path) as run:
        match = run.wait_for(SERVING, timeout=20)[0]
        assert match.group(2).startswith("RedisSessionStore(rediss+")
        assert "RedisKeyStore(rediss+" in match.group(3)
        with BlockingClient(tls=False, timeout=10) as client:
            client.connect("127.0.0.1", int(match.group(1)))
            assert client.request({"key": key}) == {"granted": {"user": "tess"}}
            revoked = _asyncapy("keys", "revoke", key, "--store", url)
            assert revoked.returncode == 0, revoked.stderr
            assert client.request({"key": key}) == {"granted": None}  # the tracker saw it
        assert run.stop() == 0, run.output
    assert "ssl_keyfile" not in run.output  # the URL's options are not logged


def test_a_missing_ca_file_is_refused_before_connecting(tmp_path):
    url = f"rediss+cluster://:hunter2@127.0.0.1:1?ssl_ca_certs={tmp_path / 'nowhere.pem'}"
    for args in (("keys", "issue", "--store", url), ("run", "x:app", "--store", url)):
        done = _asyncapy(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "store" in lines[0] and "ssl_ca_certs names no readable file" in lines[0]
        assert "hunter2" not in lines[0] and len(lines[0]) - len(url) < 300  # beyond the URL itself


def test_a_tls_url_to_a_plain_node_says_so_in_one_line(redis_server, tmp_path):
    tls = TLSFiles(str(tmp_path))
    port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
    for url in (
        f"rediss://:hunter2@127.0.0.1:{port}/0?{tls.query()}",
        f"rediss+cluster://:hunter2@127.0.0.1:{port}?{tls.query()}",
    ):
        done = _asyncapy("keys", "issue", "--store", url)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert "key store is unavailable" in lines[0] and "TLS" in lines[0]
        assert "hunter2" not in lines[0]
