"""An embedded, persistent :class:`~asyncapy.domain.ports.KeyStore`: API keys in an SQLite file.

``APIKeyFactory(store="sqlite:///keys.db")`` and ``asyncapy keys ... --store
sqlite:///keys.db`` use it: keys that survive a restart with nothing to run beside the
server, shared by every process on one machine that opens the same file (server
workers, admin scripts, the ``asyncapy keys`` command). Standard library only. Keys in
several machines' reach belong in Redis (:mod:`asyncapy.adapters.redis`).

It is also the worked example of the custom key store guide
(``docs/guide-custom-key-store.md``): small enough to read in one sitting, and it
passes the same contract suite as every bundled store
(``tests/contract/test_sqlite_key_store.py``). Copy it as the template of a
PostgreSQL, DynamoDB or Vault adapter of your own. In an application
(``APIKeyFactory`` from :mod:`asyncapy`, ``SQLiteKeyStore`` from this module)::

    keys = APIKeyFactory(store=SQLiteKeyStore("keys.db"))   # or store="sqlite:///keys.db"
    key = keys.issue({"user": "alice"})       # in a script: no event loop needed

    @server.add_handler(Filters.APIFactory(keys, "key"))   # in the server: never blocks
    async def private(client, packet): ...

The decisions, and why
----------------------
**Keys are stored as their SHA-256, never in clear.** Whoever reads the file (a
backup, a copied disk, a curious colleague) learns which keys *existed*, not what
they *are*, so cannot call the API with them. A plain, unsalted, fast hash is right
here, unlike for passwords: issued keys are 192 random bits, so there is nothing to
guess or precompute, and the lookup needs a deterministic digest to find the row by
its primary key. Hashing first also means the database compares digests, so the time
a lookup takes says nothing about how much of a guessed key was right. The price: a
lost key cannot be recovered from the store, only reissued. Metadata is kept as JSON
text, so any JSON value round-trips and every read returns a fresh copy.

**Every write is one SQL statement**, hence one atomic transaction of its own
(autocommit mode): ``put`` is an upsert, ``update`` is an ``UPDATE`` whose row count
tells whether the key existed, ``replace`` (what ``reissue`` uses) moves the row to
the new digest with a single ``UPDATE OR REPLACE``. No read-then-write across two
statements, so two processes sharing the file cannot interleave half-done changes,
and a reissue can never leave both keys valid, or neither.

**Several processes, one file.** The database runs in WAL mode, so readers (key
checks) never wait for a writer (a script issuing keys), nor writers for readers.
Writers take turns: a statement that finds the file locked waits for it, up to
``timeout`` seconds (SQLite's busy timeout), and a statement that SQLite refuses at
once with "database is locked" (which it does, rather than wait, where waiting could
deadlock: two connections creating the schema of a new file at the same moment, or
a WAL being recovered) is retried, with a growing pause, until the same deadline.
Retrying is safe because a refused statement did nothing: every statement is its own
transaction. Only past the deadline does the call fail, with ``StoreUnavailable``.

**One connection per process, shared by the threads behind a lock.** A
``sqlite3`` connection belongs to the thread that made it unless opened with
``check_same_thread=False``, and trio's worker threads are pooled: the thread that
runs one call need not be the one that runs the next. The alternatives are a
connection per call, which costs opening the file every time (about 260 us per lookup
against 6 us on a shared connection, on the machine this was written on), or a
connection per worker thread, which would belong to threads trio starts and retires
on its own, out of reach of :meth:`~SQLiteKeyStore.aclose`. So this store
opens one connection with ``check_same_thread=False`` and serialises its use with a
:class:`threading.Lock`; the lock is held for exactly one statement, and only one
statement per connection could run at a time anyway. A :class:`trio.CapacityLimiter`
of 1 in front of the lock makes tasks of the event loop queue *in trio*, where waiting
is cheap and cancellable, rather than each parking a worker thread on the lock.
The connection is opened again in a child process after a ``fork``
(``multiprocessing`` on Linux, a pre-forking process manager): SQLite forbids
using a connection across a fork. (``asyncapy run --workers N`` forks nothing: each
worker is a new process that imports the application, and so builds its own store.)

**Off the event loop inside trio, blocking outside it.** Each method checks whether
it runs in a trio task (:func:`trio.lowlevel.current_task` raises ``RuntimeError``
otherwise). Inside the server, the statement runs in a worker thread through
:func:`trio.to_thread.run_sync`, so a slow disk or a lock held by another process
stalls one task, not every client. In a plain script there is no event loop to
protect, so the statement runs right away and the coroutine finishes without ever
suspending; that is what lets the synchronous ``APIKeyFactory`` methods (``issue``,
``get``, ``key in keys`` ...) drive this store through
:func:`asyncapy.domain.ports.run_to_completion`, which sets
:data:`asyncapy.domain.ports.BLOCKING` so that the statement runs in the caller's
thread even inside a trio task.

**The file is shared, not cached.** Every call asks the database, and SQLite checks
the file for other writers at the start of every transaction, so a key issued or
revoked by a script, or by another server process, counts on the very next check.

**Failures tell the truth.** ``sqlite3.OperationalError`` (the file cannot be opened,
the database stayed locked longer than ``timeout``, the disk is full or read-only)
surfaces as :class:`asyncapy.domain.errors.StoreUnavailable`, the one exception a store
may raise for an unreachable backend: the API-key filter then answers the packet
``ERR_UNAVAILABLE`` ("retry later", not "your key is bad"), and nothing unchecked
gets through.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Optional, TypeVar, Union
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import BLOCKING, KeyStore

__all__ = ["SQLiteKeyStore", "digest", "parse_url", "URL_FORM"]

T = TypeVar("T")

_INHERITED: list = []
"""Connections a forked child inherited from its parent, kept from the garbage collector."""

URL_FORM = (
    "sqlite:///PATH (a path relative to the working directory, as sqlite:///keys.db) or "
    "sqlite:////ABSOLUTE/PATH (four slashes), optionally ?timeout=SECONDS"
)
"""What a ``sqlite://`` store URL looks like, for error messages (SQLAlchemy's form)."""

def parse_url(url: str) -> tuple[str, float]:
    """The path and timeout a ``sqlite://`` URL names, without opening anything (so a
    setting can be checked early); ``ValueError`` for anything else (a host, an empty
    path, ``:memory:``, an unknown parameter), never quoting the URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite" or parts.netloc or parts.fragment:
        raise ValueError("a host or a #fragment: sqlite:/// takes three slashes, then the path")
    path = unquote(parts.path)[1:]  # drop the slash that ends "sqlite://"
    if path in ("", ":memory:"):
        raise ValueError("a database file is required")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    timeout: Any = options.pop("timeout", 5.0)
    if options:
        raise ValueError(f"unknown parameter(s) {', '.join(sorted(options))}")
    try:
        timeout = float(timeout)
    except ValueError:
        raise ValueError("timeout is not a number of seconds") from None
    return path, timeout


SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    digest   TEXT PRIMARY KEY,  -- SHA-256 of the key, lowercase hex: never the key itself
    metadata TEXT NOT NULL      -- JSON
) WITHOUT ROWID
"""


def digest(key: str) -> str:
    """The SHA-256 of ``key`` in lowercase hex: what the database stores instead of it.

    ``surrogatepass`` lets even a key with lone surrogates (which no issued key has,
    but a client may send anything) hash instead of raising ``UnicodeEncodeError``;
    it is the same digest the Redis adapter computes.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds a lock (worth a retry)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _digest_of(key: Any) -> str:
    # The port's methods raise KeyError for a key that does not exist, and a non-string
    # key cannot exist: no key of another type is ever stored.
    if type(key) is not str:
        raise KeyError(key)
    return digest(key)


class SQLiteKeyStore(KeyStore):
    """API keys in an SQLite database file, hashed, with JSON metadata.

    :param path: the database file; it and its table are created if missing. Several
        processes (server workers, admin scripts) may share one file.
    :param timeout: seconds a statement waits for another process's write lock (and is
        retried when SQLite refuses it at once) before the call fails with
        :class:`~asyncapy.domain.errors.StoreUnavailable` (5).

    The constructor creates the schema synchronously, so build the store at start-up
    (import time, ``__main__``, ``setup()``), like opening any file; a path that
    cannot be opened fails there, with ``StoreUnavailable``, rather than on the first
    packet. A relative ``path`` is resolved against the working directory once, here.

    ``":memory:"`` (and ``""``) are refused: a database in memory would die with its
    connection, and would not be shared with the scripts that issue keys. Use a file,
    such as one under a temporary directory in tests.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], timeout: float = 5.0) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or path in ("", ":memory:"):
            raise ValueError(f"path must be the name of a database file, not {path!r}")
        if type(timeout) not in (int, float) or timeout < 0:
            raise ValueError(f"timeout must be a number of seconds of at least 0, not {timeout!r}")
        self.path: str = os.path.abspath(path)
        self.timeout: float = float(timeout)
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._connection: Optional[sqlite3.Connection] = None
        self._pid = 0
        self._run_blocking(self._create_schema)

    @classmethod
    def from_url(cls, url: str) -> "SQLiteKeyStore":
        """The store a ``sqlite://`` URL names (see :data:`URL_FORM` and :func:`parse_url`).

        ``sqlite:///keys.db`` is ``keys.db`` in the working directory,
        ``sqlite:////var/lib/app/keys.db`` the absolute path: SQLAlchemy's form, which
        many Python users know already.
        """
        path, timeout = parse_url(url)
        return cls(path, timeout=timeout)

    # -- plumbing: where and how a statement runs -----------------------------------
    def _connect(self) -> sqlite3.Connection:
        """This process's connection, opened on first use (and again after a fork)."""
        if self._connection is None or self._pid != os.getpid():
            if self._connection is not None:
                # Inherited across a fork: abandoned, never used nor closed here (closing
                # it could checkpoint or unlock files the parent is still using).
                _INHERITED.append(self._connection)
            self._connection = sqlite3.connect(
                self.path,
                timeout=self.timeout,
                isolation_level=None,  # autocommit: each statement is its own transaction
                check_same_thread=False,  # used by many threads, one at a time (the lock)
            )
            self._pid = os.getpid()
        return self._connection

    def _run_blocking(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(connection)`` under the lock, in the calling thread.

        A refusal of SQLite's that waiting did not cure ("database is locked": the
        busy timeout ran out, or SQLite refused at once where waiting could deadlock)
        is retried with a growing pause until ``timeout`` has passed since the first
        attempt; a refused statement did nothing, so running it again is safe.
        """
        deadline = time.monotonic() + self.timeout
        pause = 0.002
        with self._lock:
            while True:
                try:
                    return function(self._connect())
                except sqlite3.OperationalError as exc:
                    left = deadline - time.monotonic()
                    if left <= 0 or not _busy(exc):
                        raise StoreUnavailable(f"SQLite key store {self.path!r}: {exc}") from exc
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.1)

    async def _run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(connection)`` in a worker thread under trio, directly otherwise.

        The thread is not abandoned on cancellation: a statement is short and must
        either finish or not start, and the caller learns which.

        A synchronous ``APIKeyFactory`` method (``keys.issue()``...) drives this
        coroutine with :func:`asyncapy.domain.ports.run_to_completion`, which sets
        :data:`asyncapy.domain.ports.BLOCKING`: then the statement runs right here, in the
        caller's thread, even inside a trio task, because a synchronous caller
        cannot wait for a worker thread without suspending.
        """
        if BLOCKING.get():
            return self._run_blocking(function)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # no trio run in this thread: a script, or a worker thread
            return self._run_blocking(function)
        return await trio.to_thread.run_sync(self._run_blocking, function, limiter=self._limiter)

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        # WAL is a property of the file, kept once set: readers (key checks) never
        # wait for a writer (a script issuing keys), nor writers for readers. Asked
        # first, set only if needed: setting it takes the file's exclusive lock.
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute(SCHEMA)

    # -- the KeyStore port ---------------------------------------------------------
    async def put(self, key: str, metadata: Any) -> None:
        """Store ``key`` with ``metadata`` (an upsert: one statement)."""
        row = (_digest_of(key), json.dumps(metadata))  # not JSON? TypeError, nothing written
        await self._run(
            lambda db: db.execute(
                "INSERT INTO api_keys (digest, metadata) VALUES (?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET metadata = excluded.metadata",
                row,
            )
        )

    async def get(self, key: str) -> Any:
        """The metadata of ``key``, decoded from JSON (a fresh copy every time)."""
        name = _digest_of(key)
        row = await self._run(
            lambda db: db.execute("SELECT metadata FROM api_keys WHERE digest = ?", (name,)).fetchone()
        )
        if row is None:
            raise KeyError(key)
        return json.loads(row[0])

    async def delete(self, key: str) -> None:
        """Remove ``key``; the statement's row count says whether it existed."""
        name = _digest_of(key)
        deleted = await self._run(
            lambda db: db.execute("DELETE FROM api_keys WHERE digest = ?", (name,)).rowcount
        )
        if not deleted:
            raise KeyError(key)

    async def contains(self, key: str) -> bool:
        """Whether ``key`` exists: what the API-key filter asks for every packet."""
        if type(key) is not str:
            return False
        name = digest(key)
        row = await self._run(
            lambda db: db.execute("SELECT 1 FROM api_keys WHERE digest = ?", (name,)).fetchone()
        )
        return row is not None

    async def update(self, key: str, metadata: Any) -> None:
        """Replace the metadata of an existing ``key``: one ``UPDATE``, never an insert."""
        row = (json.dumps(metadata), _digest_of(key))
        updated = await self._run(
            lambda db: db.execute("UPDATE api_keys SET metadata = ? WHERE digest = ?", row).rowcount
        )
        if not updated:
            raise KeyError(key)

    async def replace(self, old_key: str, new_key: str) -> None:
        """Move ``old_key``'s row to ``new_key`` in one statement (``reissue``).

        ``UPDATE OR REPLACE`` overwrites a row already holding ``new_key`` (as the
        in-memory and Redis stores do) instead of failing on the primary key.
        """
        names = (_digest_of(new_key), _digest_of(old_key))
        moved = await self._run(
            lambda db: db.execute("UPDATE OR REPLACE api_keys SET digest = ? WHERE digest = ?", names).rowcount
        )
        if not moved:
            raise KeyError(old_key)

    async def aclose(self) -> None:
        """Close this process's connection (idempotent; a later call opens a new one)."""
        if self._connection is not None and self._pid == os.getpid():
            await self._run(self._close)

    def close(self) -> None:
        """Synchronous :meth:`aclose`, for scripts (never inside the event loop)."""
        if self._connection is not None and self._pid == os.getpid():
            self._run_blocking(self._close)

    def _close(self, db: sqlite3.Connection) -> None:
        db.close()
        self._connection = None

    def __len__(self) -> int:
        """How many keys the database holds (synchronous: for scripts and tests)."""
        return self._run_blocking(lambda db: db.execute("SELECT count(*) FROM api_keys").fetchone()[0])

    def __repr__(self) -> str:
        return f"SQLiteKeyStore({self.path!r})"

