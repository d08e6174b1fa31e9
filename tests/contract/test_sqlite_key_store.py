"""The SQLite key store (adapters/sqlite.py) against the key-store contract.

This file is also the model of what a user writes for an adapter of their own: one
subclass of :class:`~asyncapy.testing.contracts.KeyStoreContract` with a ``store``
fixture returning a fresh, empty store (here, a new database file per test). The tests
after it check what only this adapter promises: no key in clear on disk, the
synchronous ``APIKeyFactory`` methods from a script, keys shared with other processes,
lookups off the event loop inside a real server, and ``StoreUnavailable`` on failure.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
import trio

from asyncapy import APIKeyFactory, Packet, Server
from asyncapy.adapters.sqlite import SQLiteKeyStore
from asyncapy.client import AsyncClient
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.filters import Filters
from asyncapy.testing.contracts import KeyStoreContract
from tests.conftest import serving

ROOT = Path(__file__).resolve().parents[2]


class TestSQLiteKeyStore(KeyStoreContract):
    @pytest.fixture
    async def store(self, tmp_path):
        store = SQLiteKeyStore(tmp_path / "keys.db")
        yield store
        await store.aclose()


# -- beyond the contract ---------------------------------------------------------------
@pytest.fixture
def open_store(tmp_path):
    """``open_store(**kwargs)``: a store on ``tmp_path / "keys.db"``, closed after the test."""
    stores = []

    def open_(**kwargs) -> SQLiteKeyStore:
        store = SQLiteKeyStore(tmp_path / "keys.db", **kwargs)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


def _files_bytes(directory: Path) -> bytes:
    """Everything SQLite wrote: the database, and its -wal and -shm files if present."""
    return b"".join(path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file())


def test_the_database_never_holds_a_key_in_clear(tmp_path, open_store):
    keys = APIKeyFactory(store=open_store())
    issued = [keys.issue({"user": f"user-{n}"}) for n in range(5)]
    reissued = keys.reissue(issued[0])
    keys.update(issued[1], {"user": "someone else"})
    keys.revoke(issued[2])
    live = [reissued, *issued[1:2], *issued[3:]]

    on_disk = _files_bytes(tmp_path)
    for key in [*issued, reissued]:
        assert key.encode() not in on_disk
    # ... and the search would have found something: the digests are there.
    for key in live:
        assert hashlib.sha256(key.encode()).hexdigest().encode() in on_disk
    with closing(sqlite3.connect(tmp_path / "keys.db")) as db:
        rows = dict(db.execute("SELECT digest, metadata FROM api_keys"))
    assert rows == {
        hashlib.sha256(reissued.encode()).hexdigest(): '{"user": "user-0"}',
        hashlib.sha256(issued[1].encode()).hexdigest(): '{"user": "someone else"}',
        hashlib.sha256(issued[3].encode()).hexdigest(): '{"user": "user-3"}',
        hashlib.sha256(issued[4].encode()).hexdigest(): '{"user": "user-4"}',
    }


def test_the_synchronous_factory_works_from_a_script(open_store):
    keys = APIKeyFactory(store=open_store())
    key = keys.issue({"user": "alice"})
    assert key in keys and "not-a-key" not in keys and 42 not in keys
    assert keys.get(key) == {"user": "alice"}
    keys.update(key, {"user": "alice", "admin": True})
    new = keys.reissue(key)
    assert key not in keys and keys.get(new) == {"user": "alice", "admin": True}
    keys.revoke(new)
    with pytest.raises(KeyError):
        keys.get(new)
    with pytest.raises(KeyError):
        keys.revoke(new)
    assert len(keys.store) == 0
    keys.store.close()
    keys.store.close()  # idempotent, and the next call opens the file again
    assert keys.issue(None) in keys


def test_two_stores_on_one_file_share_keys_with_no_cache(open_store):
    """What a script and a server (or two server processes) sharing the file see."""
    admin = APIKeyFactory(store=open_store())
    server = APIKeyFactory(store=open_store())
    key = admin.issue({"user": "bob"})
    assert key in server and server.get(key) == {"user": "bob"}
    admin.revoke(key)
    assert key not in server


def _issue_in_child(store: SQLiteKeyStore, done) -> None:
    done.send(APIKeyFactory(store=store).issue({"from": "child"}))


def test_a_forked_child_opens_its_own_connection(open_store):
    """A ``multiprocessing`` child (fork) inherits a store its parent already used."""
    store = open_store()
    keys = APIKeyFactory(store=store)
    parent_key = keys.issue({"from": "parent"})  # the parent's connection is now open
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_issue_in_child, args=(store, sender))
    child.start()
    child_key = receiver.recv()
    child.join(10)
    assert child.exitcode == 0
    assert keys.get(child_key) == {"from": "child"}
    assert keys.get(parent_key) == {"from": "parent"}


def _hammer(directory: str, worker: int, start, done) -> None:
    """One process of the test below."""
    try:
        # Forty new files, each opened by every process at the same moment: creating
        # the schema and switching to WAL together is where SQLite answers "database
        # is locked" at once rather than wait (the old example failed ~2% of these).
        for n in range(40):
            start.wait(30)
            keys = APIKeyFactory(store=f"sqlite:///{directory}/new-{n}.db")
            assert keys.issue(worker) in keys
            keys.store.close()
        # Then one file, written and read by every process as fast as it can.
        start.wait(30)
        keys = APIKeyFactory(store=f"sqlite:///{directory}/shared.db")
        mine = []
        for n in range(60):
            key = keys.issue({"worker": worker, "n": n})
            assert key in keys and keys.get(key) == {"worker": worker, "n": n}
            if n % 3 == 0:
                key = keys.reissue(key)
            if n % 4 == 0:
                keys.update(key, {"worker": worker, "n": n, "updated": True})
            if n % 5 == 0:
                keys.revoke(key)
            else:
                mine.append(key)
        keys.store.close()
        done.send(("ok", mine))
    except BaseException as exc:  # reported to the parent, which fails the test
        done.send(("failed", f"{type(exc).__name__}: {exc}"))


def test_several_processes_create_write_and_read_one_file_at_once(tmp_path):
    """Six processes open new files at the same moment and then write and read one
    file concurrently: every call succeeds, and every key each one kept is there,
    with its metadata, afterwards."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(6)
    pipes = [context.Pipe(duplex=False) for _ in range(6)]
    workers = [
        context.Process(target=_hammer, args=(str(tmp_path), worker, start, pipes[worker][1]))
        for worker in range(6)
    ]
    for process in workers:
        process.start()
    results = [receiver.recv() if receiver.poll(300) else ("failed", "no answer") for receiver, _ in pipes]
    for process in workers:
        process.join(30)
    assert [status for status, _ in results] == ["ok"] * 6, results
    for n in range(40):
        keys = APIKeyFactory(store=f"sqlite:///{tmp_path}/new-{n}.db")
        assert len(keys.store) == 6
        keys.store.close()
    keys = APIKeyFactory(store=f"sqlite:///{tmp_path}/shared.db")
    kept = [key for _, mine in results for key in mine]
    assert len(keys.store) == len(kept) == 6 * 48
    for key in kept:
        assert keys.get(key)["worker"] in range(6)
    keys.store.close()


def test_a_lock_held_for_a_while_is_waited_for_not_failed(tmp_path, open_store):
    store = open_store(timeout=5)
    keys = APIKeyFactory(store=store)
    with closing(sqlite3.connect(tmp_path / "keys.db", isolation_level=None, check_same_thread=False)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock...
        release = threading.Timer(0.2, other.execute, ("COMMIT",))  # ...for a moment
        release.start()
        key = keys.issue({"user": "patient"})
        release.join()
    assert keys.get(key) == {"user": "patient"}


def test_a_refusal_sqlite_does_not_wait_for_is_retried(open_store, monkeypatch):
    """SQLite answers "database is locked" at once, without its busy timeout, where
    waiting could deadlock: the store retries until its own timeout."""
    store = open_store(timeout=5)
    keys = APIKeyFactory(store=store)
    refusals = iter([sqlite3.OperationalError("database is locked")] * 3)
    real = store._connect

    class Flaky:
        def __init__(self, db):
            self.db = db

        def execute(self, *args):
            error = next(refusals, None)
            if error is not None:
                raise error
            return self.db.execute(*args)

    monkeypatch.setattr(store, "_connect", lambda: Flaky(real()))
    key = keys.issue({"user": "retried"})
    assert next(refusals, None) is None  # all three refusals were met, and retried
    monkeypatch.undo()
    assert keys.get(key) == {"user": "retried"}


def test_bad_arguments_are_refused(tmp_path):
    for path in (":memory:", ""):
        with pytest.raises(ValueError, match="database file"):
            SQLiteKeyStore(path)
    with pytest.raises(ValueError, match="timeout"):
        SQLiteKeyStore(tmp_path / "keys.db", timeout=-1)


def test_metadata_that_is_not_json_writes_nothing(open_store):
    keys = APIKeyFactory(store=open_store())
    with pytest.raises(TypeError):
        keys.issue({"not", "json"})
    assert len(keys.store) == 0


def test_an_unopenable_file_is_store_unavailable(tmp_path):
    with pytest.raises(StoreUnavailable, match="unable to open"):
        SQLiteKeyStore(tmp_path / "no-such-directory" / "keys.db")


async def test_a_locked_database_is_store_unavailable_for_writes_only(tmp_path, open_store):
    store = open_store(timeout=0)
    await store.put("key-1", 1)
    with closing(sqlite3.connect(tmp_path / "keys.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.put("key-2", 2)
        # WAL: readers (the API-key filter) are not blocked by a writer.
        assert await store.contains("key-1") is True
        other.execute("ROLLBACK")
    await store.put("key-2", 2)
    assert await store.get("key-2") == 2


async def test_synchronous_methods_inside_trio_work_and_leave_the_store_working(open_store):
    """``keys.issue()`` in a handler blocks the loop for one statement but works, and
    must not leave a token of the store's thread limiter behind (which would hang
    every later async call)."""
    keys = APIKeyFactory(store=open_store())
    for _ in range(20):
        assert keys.issue({"user": "eve"}) in keys
    with trio.fail_after(5):
        key = await keys.aissue({"user": "eve"})
        assert await keys.acontains(key) is True
    assert len(keys.store) == 21


class _SpyStore(SQLiteKeyStore):
    """Records which thread ran each statement."""

    def __init__(self, *args, **kwargs) -> None:
        self.threads: list = []
        super().__init__(*args, **kwargs)

    def _run_blocking(self, function):
        self.threads.append(threading.current_thread())
        return super()._run_blocking(function)


async def test_a_real_server_checks_keys_in_the_file_off_the_event_loop(tmp_path):
    path = tmp_path / "keys.db"
    # A key issued by another process, as an admin would.
    demo = await trio.run_process(
        [sys.executable, "-m", "asyncapy", "keys", "issue", "--metadata", '{"user": "carol"}', "--store", f"sqlite:///{path}"],
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
    )
    script_key = demo.stdout.decode().strip()
    assert len(script_key) == 32

    store = _SpyStore(path)
    store.threads.clear()  # the constructor creates the schema, synchronously: not a lookup
    keys = APIKeyFactory(store=store)
    server = Server(timeout=5)

    @server.add_handler(Filters.APIFactory(keys, "key"))
    async def whoami(client, packet):
        metadata = await keys.aget(packet["key"])
        await client.send(Packet({"user": metadata["user"]}, encoding=client.encoding))

    @server.add_handler()
    async def refuse(client, packet):
        await client.send(Packet({"error": "a valid key is required"}, encoding=client.encoding))

    refused = {"error": "a valid key is required"}
    async with serving(server) as (host, port):
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"key": script_key}) == {"user": "carol"}
            assert await client.request({"key": "not-a-key"}) == refused
            assert await client.request({"key": 42}) == refused

            own_key = await keys.aissue({"user": "dave"})
            assert await client.request({"key": own_key}) == {"user": "dave"}
            await keys.arevoke(script_key)
            assert await client.request({"key": script_key}) == refused
            assert await client.request({"key": own_key}) == {"user": "dave"}

    assert store.threads, "the server never used the store"
    assert threading.main_thread() not in store.threads
    await store.aclose()
