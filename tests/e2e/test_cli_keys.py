"""``asyncapy keys``, run as a subprocess against the real Redis (and an SQLite store).

A key issued on the command line works at once through a server's
``Filters.APIFactory`` sharing the store; update, reissue and revoke take effect just
as fast. Keys are printed only when issued or reissued, never in an error; a store
that would forget the keys (``memory://``, or none) is refused with a pointer to
Redis and to a ``KeyStore`` of one's own; every failure is one line on stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import trio

from asyncapy import APIKeyFactory, Filters, Packet, Server
from asyncapy.adapters.sqlite import SQLiteKeyStore
from asyncapy.client import AsyncClient
from asyncapy.util import KEY_ALPHABET, fingerprint
from tests.conftest import serving

ROOT = Path(__file__).resolve().parents[2]


def environment(**extra: str) -> dict:
    """This process's environment without ``ASYNCAPY_STORE``, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if name != "ASYNCAPY_STORE"}
    env.update(extra)
    return env


async def asyncapy(
    *args: str, stdin: bytes = b"", env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    """``python -m asyncapy ARGS`` from the repository root, run while the test's trio
    run goes on (a server may be serving in it)."""
    with trio.fail_after(20):
        return await trio.run_process(
            [sys.executable, "-m", "asyncapy", *args],
            cwd=ROOT,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env if env is not None else environment(),
        )


async def asyncapy_all(*commands: tuple, env: Optional[dict] = None) -> list[subprocess.CompletedProcess]:
    """Several independent ``asyncapy`` commands (argument tuples) at once; their results."""
    results: list = [None] * len(commands)

    async def one(index: int, args: tuple) -> None:
        results[index] = await asyncapy(*args, env=env)

    async with trio.open_nursery() as nursery:
        for index, args in enumerate(commands):
            nursery.start_soon(one, index, args)
    return results


def ok(result: subprocess.CompletedProcess) -> str:
    """stdout of a command that must have succeeded silently on stderr."""
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()
    return result.stdout.decode()


def issued(result: subprocess.CompletedProcess, size: int = 32) -> str:
    """The key a successful ``issue``/``reissue`` printed (its only output line)."""
    out = ok(result)
    assert out.endswith("\n") and out.count("\n") == 1, out
    key = out.strip()
    assert len(key) == size and set(key) <= set(KEY_ALPHABET), key
    return key


def one_error_line(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    """Assert ``result`` failed with ``status`` and one stderr line holding ``fragments``."""
    err = result.stderr.decode()
    assert result.returncode == status, (result.returncode, err, result.stdout)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("asyncapy keys"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == b""
    return lines[0]


def guarded_server(factory: APIKeyFactory) -> Server:
    """Replies ``{"ok": <metadata>}`` to packets with a valid ``key``, ``denied`` otherwise."""
    server = Server(addr="127.0.0.1", port=0, timeout=5)

    @server.add_handler(Filters.APIFactory(factory, "key"))
    async def private(client, packet: Packet) -> None:
        await client.send(Packet({"ok": await factory.aget(packet["key"])}, "json"))

    @server.add_handler()
    async def denied(client, packet: Packet) -> None:
        await client.send(Packet({"status": "failure", "error": "denied"}, "json"))

    return server


async def ask(port: int, key: str) -> dict:
    """What the guarded server answers to ``key``."""
    async with AsyncClient(tls=False, timeout=5) as client:
        await client.connect("127.0.0.1", port)
        return await client.request({"key": key})


async def test_lifecycle_against_redis_checked_by_a_server_sharing_it(redis_url):
    async with serving(guarded_server(APIKeyFactory(store=redis_url))) as (_, port):
        key = issued(await asyncapy("keys", "issue", "--metadata", '{"user": "alice"}', "--store", redis_url))
        assert await ask(port, key) == {"ok": {"user": "alice"}}
        assert await ask(port, key[::-1]) == {"status": "failure", "error": "denied"}

        # The store from the environment, the key from stdin: neither on the command line.
        by_env = environment(ASYNCAPY_STORE=redis_url)
        assert ok(await asyncapy("keys", "update", "-", '{"user": "alice", "plan": "pro"}', stdin=key.encode() + b"\n", env=by_env)) == ""
        assert json.loads(ok(await asyncapy("keys", "get", "-", stdin=key.encode(), env=by_env))) == {"user": "alice", "plan": "pro"}
        assert await ask(port, key) == {"ok": {"user": "alice", "plan": "pro"}}

        new = issued(await asyncapy("keys", "reissue", key, "--store", redis_url))
        assert new != key
        assert await ask(port, key) == {"status": "failure", "error": "denied"}
        assert await ask(port, new) == {"ok": {"user": "alice", "plan": "pro"}}
        old_get, new_get = await asyncapy_all(("keys", "get", key), ("keys", "get", new), env=by_env)
        line = one_error_line(old_get, 1, "no such key", fingerprint(key))
        assert key not in line  # a key given to the command is never printed
        assert json.loads(ok(new_get)) == {"user": "alice", "plan": "pro"}

        assert ok(await asyncapy("keys", "revoke", new, "--store", redis_url)) == ""
        assert await ask(port, new) == {"status": "failure", "error": "denied"}
        gone = await asyncapy_all(("keys", "get", new), ("keys", "revoke", new), env=by_env)
        for result in gone:
            assert new not in one_error_line(result, 1, "no such key", fingerprint(new))


async def test_a_key_beginning_with_a_dash_is_given_after_double_dash(redis_url):
    """None is issued so, but a key from elsewhere may begin with "-": after "--" it
    is a key, not an option."""
    key = "-" + APIKeyFactory().new_key()[1:]
    factory = APIKeyFactory(store=redis_url)
    await factory.store.put(key, {"user": "dash"})
    try:
        result = await asyncapy("keys", "get", "--store", redis_url, "--", key)
        assert json.loads(ok(result)) == {"user": "dash"}
    finally:
        await factory.store.delete(key)


async def test_stores_that_forget_or_fail_are_one_line_errors(redis_url):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        port = dead.getsockname()[1]
        missing, memory, ftp, unreachable, bad_metadata, short, no_key = await asyncapy_all(
            ("keys", "issue"),
            ("keys", "issue", "--store", "memory://"),
            ("keys", "issue", "--store", "ftp://user:s3cret@host/"),
            ("keys", "issue", "--store", f"redis://:s3cret@127.0.0.1:{port}/0"),
            ("keys", "issue", "--metadata", "{nope", "--store", redis_url),
            ("keys", "issue", "--size", "8", "--store", redis_url),
            ("keys", "get", "-", "--store", redis_url),  # stdin is empty
        )
    finally:
        dead.close()
    one_error_line(missing, 2, "required", "redis://", "sqlite:///", "MODULE:ATTR", "ASYNCAPY_STORE")
    one_error_line(memory, 2, "memory://", "gone when this command exits", "redis://", "KeyStore")
    assert "s3cret" not in one_error_line(ftp, 2, "'ftp://user:***@host/'", "scheme")
    assert "s3cret" not in one_error_line(unreachable, 1, "unavailable")
    one_error_line(bad_metadata, 2, "--metadata", "not valid JSON")
    one_error_line(short, 2, "--size", "16")
    one_error_line(no_key, 2, "stdin")


async def test_module_attr_store_sqlite_and_a_factory(tmp_path):
    database = tmp_path / "keys.db"
    (tmp_path / "cli_keystores.py").write_text(
        textwrap.dedent(
            f"""
            from asyncapy import APIKeyFactory
            from asyncapy.adapters.sqlite import SQLiteKeyStore

            store = SQLiteKeyStore({str(database)!r})
            factory = APIKeyFactory(40, store=store)
            not_a_store = 42
            """
        )
    )
    env = environment(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    from_store, from_factory, wrong, no_module = await asyncapy_all(
        ("keys", "issue", "--metadata", '{"user": "bob"}', "--store", "cli_keystores:store"),
        ("keys", "issue", "--store", "cli_keystores:factory"),
        ("keys", "issue", "--store", "cli_keystores:not_a_store"),
        ("keys", "issue", "--store", "no_such_module_here:store"),
        env=env,
    )
    key = issued(from_store)
    long_key = issued(from_factory, size=40)
    one_error_line(wrong, 2, "int", "not a KeyStore")
    one_error_line(no_module, 2, "cannot import", "no_such_module_here")
    store = SQLiteKeyStore(database)
    try:
        keys = APIKeyFactory(store=store)
        assert keys.get(key) == {"user": "bob"}
        assert long_key in keys and keys.get(long_key) is None
    finally:
        store.close()
    assert json.loads(ok(await asyncapy("keys", "get", key, "--store", "cli_keystores:store", env=env))) == {"user": "bob"}


async def test_sqlite_url_store_keys_survive_and_reach_a_server(tmp_path):
    """``--store sqlite:///PATH``: the file ``APIKeyFactory(store="sqlite:///PATH")``
    reads; relative to the working directory; bad URLs and unopenable files are one
    line each (2 and 1)."""
    url = f"sqlite:///{tmp_path.name}/keys.db"  # relative to the command's cwd
    env = environment()
    key = issued(
        await trio.run_process(
            [sys.executable, "-m", "asyncapy", "keys", "issue", "--metadata", '{"user": "kim"}', "--store", url],
            cwd=tmp_path.parent, capture_stdout=True, capture_stderr=True, check=False, env=env,
        )
    )
    assert key.encode() not in (tmp_path / "keys.db").read_bytes()  # hashed at rest
    keys = APIKeyFactory(store=f"sqlite:///{tmp_path / 'keys.db'}")  # absolute: four slashes
    assert keys.store.path == str(tmp_path / "keys.db")
    server = Server(timeout=5)

    @server.add_handler(Filters.APIFactory(keys, "key"))
    async def whoami(client, packet):
        await client.send(Packet(await keys.aget(packet["key"]), encoding=client.encoding))

    @server.add_handler()
    async def refuse(client, packet):
        await client.send(Packet({"error": "unauthorized"}, encoding=client.encoding))

    async with serving(server) as (host, port):
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"key": key}) == {"user": "kim"}
            ok(await asyncapy("keys", "revoke", key, "--store", f"sqlite:///{tmp_path / 'keys.db'}", env=env))
            assert await client.request({"key": key}) == {"error": "unauthorized"}
    await keys.store.aclose()
    host_form, no_file, unopenable = await asyncapy_all(
        ("keys", "issue", "--store", f"sqlite://localhost/{tmp_path}/keys.db"),
        ("keys", "issue", "--store", "sqlite:///"),
        ("keys", "issue", "--store", f"sqlite:///{tmp_path}/no/such/dir/keys.db"),
        env=env,
    )
    one_error_line(host_form, 2, "three slashes", "e.g. sqlite:///keys.db")
    one_error_line(no_file, 2, "database file is required")
    one_error_line(unopenable, 1, "unavailable", "unable to open")


HELP_SCRIPT = """
import contextlib, io, sys
from asyncapy.__main__ import main
for args in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(args.split())
        except SystemExit as exit:
            assert exit.code == 0, (args, exit.code)
    sys.stdout.write(out.getvalue() + "\\f")
"""
"""Prints the ``--help`` of each command line given as an argument, each followed by a
form feed: every help text for the price of one interpreter start."""


async def test_help_of_every_action_names_its_flags_and_defaults():
    actions = ("issue", "get", "update", "reissue", "revoke")
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, "-c", HELP_SCRIPT, "keys --help", *[f"keys {action} --help" for action in actions]],
            cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False,
        )
    texts = [" ".join(text.split()) for text in ok(result).split("\f")[:-1]]
    keys_help, issue, get, update, reissue, revoke = texts
    for action in actions:
        assert action in keys_help
    for text in (issue, get, update, reissue, revoke):
        assert "--store STORE" in text and "(default: $ASYNCAPY_STORE; required if unset)" in text
    assert "--metadata JSON" in issue and "(default: null)" in issue
    assert "--size N" in issue and "--size N" in reissue and "(default: 32" in issue
    assert "--pretty, --no-pretty" in get
    for text in (get, update, reissue, revoke):
        assert "KEY" in text and "- to read it from" in text
