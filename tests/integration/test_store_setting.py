"""One store setting: ``asyncapy run --store URL`` (or ``ASYNCAPY_STORE``) holds the
sessions and is the default store of every ``APIKeyFactory()`` created without
``store=``; an explicit ``store=`` wins; the startup log line says where keys live.
"""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from asyncapy import APIKeyFactory, stores
from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.adapters.memory import MemoryKeyStore
from asyncapy.client import Client as BlockingClient
from asyncapy.config import ConfigError
from asyncapy.util import where_keys_live
from tests.e2e.processes import Running

SERVING = re.compile(r"AsyncAPY serving on 127\.0\.0\.1:(\d+) \(plain TCP\), sessions in (.*), API keys in (.*)")

APP = textwrap.dedent(
    '''
    from asyncapy import APIKeyFactory, Filters, Packet, Server

    app = Server(timeout=30)
    keys = APIKeyFactory()                      # no store=: the run's store
    private = APIKeyFactory(store="memory://")  # explicit: stays in memory

    @app.add_handler(Filters.APIFactory(keys, "key"))
    async def granted(client, packet):
        await client.send(Packet({"granted": await keys.aget(packet["key"])}, encoding=client.encoding))

    @app.add_handler()
    async def denied(client, packet):
        await client.send(Packet({"granted": None}, encoding=client.encoding))
    '''
)


@pytest.fixture
def no_default(monkeypatch):
    """No ASYNCAPY_STORE, no run's store; restored afterwards."""
    monkeypatch.delenv(stores.STORE_ENV, raising=False)
    monkeypatch.setattr(stores, "_default", None)


def test_a_factory_without_store_takes_the_environment_and_explicit_wins(no_default, monkeypatch, redis_url):
    assert isinstance(APIKeyFactory().store, MemoryKeyStore)
    monkeypatch.setenv(stores.STORE_ENV, redis_url)
    assert isinstance(APIKeyFactory().store, CachedKeyStore)
    assert isinstance(APIKeyFactory(store="memory://").store, MemoryKeyStore)
    stores.set_default_store("memory://")  # what `asyncapy run --store memory://` does
    assert isinstance(APIKeyFactory().store, MemoryKeyStore)
    stores.set_default_store(None)
    assert isinstance(APIKeyFactory().store, CachedKeyStore)


def test_a_bad_environment_store_is_refused_naming_the_variable(no_default, monkeypatch):
    monkeypatch.setenv(stores.STORE_ENV, "postgres://db/keys")
    with pytest.raises(ConfigError, match="invalid store in ASYNCAPY_STORE"):
        APIKeyFactory()
    with pytest.raises(ConfigError, match="invalid store"):
        stores.set_default_store("nonsense")


def test_where_keys_live_names_each_store_without_credentials(no_default, redis_url):
    keys = APIKeyFactory(store=redis_url.replace("redis://", "redis://user:hunter2@"))
    text = where_keys_live()
    assert "CachedKeyStore(RedisKeyStore(redis://127.0.0.1:" in text
    assert "hunter2" not in text
    del keys


@pytest.mark.parametrize("how", ["--store", "ASYNCAPY_STORE"])
def test_asyncapy_run_store_is_the_default_of_the_apps_key_factories(tmp_path, redis_url, how):
    (tmp_path / "store_app.py").write_text(APP)
    command = [sys.executable, "-m", "asyncapy", "run", "store_app:app", "--port", "0"]
    env = {"PYTHONPATH": str(tmp_path)}
    if how == "--store":
        command += ["--store", redis_url]
    else:
        env[stores.STORE_ENV] = redis_url
    key = APIKeyFactory(store=redis_url).issue({"user": "opal"})  # an admin script
    with Running(command, env=env, cwd=tmp_path) as run:
        match = run.wait_for(SERVING, timeout=15)[0]
        port = int(match.group(1))
        assert match.group(2).startswith("RedisSessionStore(")
        assert "CachedKeyStore(RedisKeyStore(redis://127.0.0.1:" in match.group(3)
        assert "memory (this process only)" in match.group(3)
        with BlockingClient(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            assert client.request({"key": key}) == {"granted": {"user": "opal"}}
            assert client.request({"key": "x" * 32}) == {"granted": None}
        assert run.stop() == 0, run.output


@pytest.mark.parametrize("how", ["--store", "ASYNCAPY_STORE"])
def test_asyncapy_run_with_an_sqlite_store_serves_keys_from_the_file(tmp_path, how):
    """SQLite holds API keys only: the run serves with its keys in the file and its
    sessions in the process (docs/cli.md says so)."""
    (tmp_path / "store_app.py").write_text(APP)
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    command = [sys.executable, "-m", "asyncapy", "run", "store_app:app", "--port", "0"]
    env = {"PYTHONPATH": str(tmp_path)}
    if how == "--store":
        command += ["--store", url]
    else:
        env[stores.STORE_ENV] = url
    admin = APIKeyFactory(store=url)  # `asyncapy keys issue --store sqlite:///...`
    key = admin.issue({"user": "lin"})
    with Running(command, env=env, cwd=tmp_path) as run:
        match = run.wait_for(SERVING, timeout=15)[0]
        port = int(match.group(1))
        assert match.group(2).startswith("MemorySessionStore(")
        assert "SQLiteKeyStore(" in match.group(3)
        with BlockingClient(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            assert client.request({"key": key}) == {"granted": {"user": "lin"}}
            admin.revoke(key)
            assert client.request({"key": key}) == {"granted": None}
        assert run.stop() == 0, run.output


@pytest.mark.parametrize(
    "url, reason, example",
    [
        ("postgres://:hunter2@db/keys", "unknown scheme", "redis://localhost:6379/0"),
        ("redis+sentinel://:hunter2@s1:26379", "service name", "redis+sentinel://s1:26379"),
        ("rediss+cluster://:hunter2@n1?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs", "rediss+cluster://n1:6379"),
        ("sqlite://host/keys.db", "three slashes", "sqlite:///keys.db"),
    ],
)
def test_a_bad_run_store_is_one_short_line_with_a_good_example_and_exit_2(tmp_path, url, reason, example):
    (tmp_path / "store_app.py").write_text(APP)
    for how in ("--store", "ASYNCAPY_STORE"):
        command = [sys.executable, "-m", "asyncapy", "run", "store_app:app", "--port", "0"]
        env = {"PYTHONPATH": str(tmp_path)}
        if how == "--store":
            command += ["--store", url]
        else:
            env[stores.STORE_ENV] = url
        with Running(command, env=env, cwd=tmp_path) as run:
            assert run.finish(timeout=15) == 2, run.output
            lines = [line for line in run.err if line.strip()]
        assert len(lines) == 1, lines
        assert f"invalid store in {how}" in lines[0] and reason in lines[0] and example in lines[0]
        assert len(lines[0]) < 300 and "hunter2" not in lines[0]
