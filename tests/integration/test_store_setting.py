"""One store setting: ``asyncapy run --store URL`` (or ``ASYNCAPY_STORE``) holds the
sessions and is the default store of every ``APIKeyFactory()`` created without
``store=``; an explicit ``store=`` wins; the startup log line says where keys live.
"""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from asyncapy import APIKeyFactory
from asyncapy import stores
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
