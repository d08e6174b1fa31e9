"""Redis stores: sessions and API keys shared by every server process.

How a trio server talks to Redis
--------------------------------
redis-py's asynchronous client is built on asyncio and cannot run inside trio. These
adapters therefore use redis-py's *synchronous* client. A call made from a trio task
is queued for the store's one worker thread, which writes every call queued meanwhile
to Redis as one pipeline on its own connection and wakes the waiting tasks with one
wakeup of the event loop (see :class:`_RedisAdapter`): one thread hop and one round
trip per batch, never per call, and the event loop never blocks on the network.
Called outside any event loop (a script, the ``asyncapy keys`` command) the same
methods run the blocking call directly on a pooled connection, so one adapter and one
connection pool per process serve both the server and synchronous code.

The server makes store calls once per connection (admission, release) and once per
renewal period for all of its sessions, never per packet; the API-key filter makes
one per key check that misses the process's key cache.

Every check-and-set is a server-side Lua script (``register_script``): admission
drops expired leases, counts the live ones and admits under the limit in one atomic
step, so N processes racing for the last slot admit exactly one. Every failure of
Redis (unreachable, timed out, or refusing the command: loading, read-only, OOM...)
surfaces as :class:`asyncapy.domain.errors.StoreUnavailable`; the pool's health checks and
reconnects bring the adapter back by itself when Redis returns.

Sessions are leases
-------------------
A session is a member of the sorted set ``<prefix>sessions:<address>`` whose score is
its lease's expiry (Redis server time, in ms), with its record (JSON) in the hash
``<prefix>session-data:<address>``. The process that admitted a session renews the
leases of all of its live sessions every ``lease / 3`` seconds in one round trip
(:meth:`RedisSessionStore.maintain`), and releases each session when it ends. A
process killed with SIGKILL renews nothing: its leases expire after ``lease``
seconds and the next admission for that address drops them.

API keys
--------
A key is stored only as its SHA-256 (``<prefix>key:<hex digest>``), with its metadata
as JSON. :class:`RedisKeyStore` itself caches nothing: every call is a Redis command.
``APIKeyFactory(store=URL)`` puts it behind a
:class:`~asyncapy.adapters.key_cache.CachedKeyStore`, which :meth:`RedisKeyStore.track`
keeps coherent with Redis's client-side-caching invalidations
(:mod:`asyncapy.adapters.redis_tracking`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import urllib.parse
from typing import Any, Optional, Sequence

import redis
import trio

from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import BLOCKING, KeyStore, SessionRecord, SessionStore
from asyncapy.domain.redaction import redact

__all__ = ["RedisSessionStore", "RedisKeyStore", "connect", "check_url", "URL_FORMS", "DEFAULT_PREFIX"]

logger = logging.getLogger("asyncapy.redis")

DEFAULT_PREFIX = "asyncapy:"
"""Prefix of every Redis key the adapters write."""


# Any error of redis-py means the store did not do what was asked: not only a lost
# connection or a timeout, but a Redis still loading its data, a read-only replica
# after a failover, OOM, a failed AUTH... The callers treat them all alike: refuse
# the session (ERR_UNAVAILABLE), fail the key check closed, retry the renewal later.
_FAILURES = (redis.RedisError, OSError)


DB_MAX = 2**31 - 1
"""The highest database number a URL may name (Redis's own bound on ``databases``)."""

URL_FORMS = (
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... (the same over TLS) or "
    "unix://[[USER]:PASSWORD@]/PATH[?db=DB], with PORT from 1 to 65535 and DB from 0 to "
    f"{DB_MAX} (a server's 'databases' setting may allow fewer; 16 by default), and "
    "/ ? # @ % in a user name or password percent-encoded"
)
"""The URLs :func:`connect` accepts, for error messages."""

_DIGITS = re.compile(r"[0-9]+")


def _database(text: str, where: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) > DB_MAX:
        raise ValueError(f"the database in {where} is not an integer from 0 to {DB_MAX}")
    return int(text)


def _check_parts(url: str) -> None:
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in ("redis", "rediss", "unix"):
        raise ValueError("the scheme is not redis://, rediss:// or unix://")
    parts = urllib.parse.urlparse(url)
    if "#" in url:
        raise ValueError("a '#' in the URL: percent-encode it (%23) in a password")
    after_host = parts.query if scheme == "unix" else parts.path + parts.query
    if "@" in after_host:
        raise ValueError("an '@' after the host: percent-encode / ? # @ in a user name or password")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if "db" in query:
        _database(query["db"][0], "?db=")
    if scheme == "unix":
        if parts.netloc.rpartition("@")[2]:
            raise ValueError("a host in a unix:// URL: the path follows a third slash, unix:///PATH")
        if not parts.path:
            raise ValueError("the socket path is missing: unix:///PATH")
        return
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    path = urllib.parse.unquote(parts.path)
    if path not in ("", "/"):
        _database(path[1:], "the path")


def _pool(url: str, max_connections: int = 16, timeout: float = 2.0) -> redis.BlockingConnectionPool:
    _check_parts(url)
    try:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=15,
            retry_on_timeout=False,
        )
    except ValueError as exc:  # its messages name a query parameter, never the URL
        raise ValueError(redact(str(exc))) from None
    try:  # a connection object (no socket yet) takes the query's parameters: or not
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        match = re.search(r"keyword argument '(\w+)'", str(exc))
        name = f" {match.group(1)!r}" if match else ""
        raise ValueError(f"an unknown query parameter{name}") from None
    return pool


def check_url(url: str) -> None:
    """Refuse (:class:`ValueError`) a Redis ``url`` that is not one of :data:`URL_FORMS`.

    redis-py reads some broken URLs without complaint, and wrongly: a database that is
    not a number (``/abc``) silently becomes database 0, a negative one -1, a password
    with an unencoded ``/`` leaves part of itself in the path; and a query parameter
    it does not know fails only at the first command. All are refused here, before
    anything connects. The message says which part is wrong and never quotes the URL,
    which may hold a password.
    """
    _pool(url)


def connect(url: str, max_connections: int = 16, timeout: float = 2.0) -> redis.Redis:
    """A redis-py client for ``url`` with a bounded, health-checked connection pool.

    ``timeout`` bounds connecting and every command, so an unreachable Redis turns
    into :class:`StoreUnavailable` promptly instead of a hung thread. A ``url`` that
    :func:`check_url` refuses is a :class:`ValueError` (no connection is attempted).
    """
    return redis.Redis(connection_pool=_pool(url, max_connections, timeout))


def _offload() -> bool:
    """Whether a call should go to a worker thread: inside a trio run, unless a
    synchronous caller drives the coroutine (:data:`asyncapy.domain.ports.BLOCKING`)."""
    if BLOCKING.get():
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _where(client: redis.Redis) -> str:
    """``redis://host:port/db`` of a client, without credentials, for logs."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


class _Call:
    """Commands to send back to back, their replies (or an error), and who waits."""

    __slots__ = ("commands", "replies", "error", "task", "token")

    def __init__(self, commands: Sequence[tuple]) -> None:
        self.commands = commands
        self.replies: list = []
        self.error: Optional[BaseException] = None
        self.task: Any = None
        self.token: Any = None

    def result(self) -> list:
        error = self.error
        if error is None:
            return self.replies
        # redis-py's messages name the host and port, not the password; redact() all
        # the same, since the message goes to logs and the terminal.
        if isinstance(error, redis.ResponseError):
            raise StoreUnavailable(f"Redis refused the command: {redact(str(error))}") from error
        if isinstance(error, (redis.RedisError, OSError)):
            raise StoreUnavailable(f"Redis is unreachable: {redact(str(error))}") from error
        raise error


def _wake(calls: list[_Call]) -> None:
    """In the trio thread: resume the tasks waiting for ``calls``."""
    for call in calls:
        trio.lowlevel.reschedule(call.task)


class _RedisAdapter:
    """Calls into redis-py, off the event loop when there is one, in batches.

    Every store call made from a trio task (admissions, releases, key lookups that
    missed the cache...) is queued for the adapter's one worker thread, which owns a
    connection: each time it is free, it takes *every* call queued meanwhile and writes
    them to Redis as one pipeline, reads the replies, and wakes the waiting tasks with
    one wakeup of the event loop for the batch. The busier the server, the bigger the
    batches: one thread hop and one round trip for many calls, instead of one of each
    per call, and the event loop never blocks on the network. Every call keeps its own
    reply, and its own error: a script refused by Redis fails that call only. Each
    call is one command Redis runs atomically (a Lua script, or a MULTI/EXEC block),
    so batching changes no call's meaning; calls are sent in the order they were
    made, and never retried. A call cancelled while still queued is withdrawn; one
    already sent is waited for (its effect in Redis cannot be undone).

    Synchronous callers (a script, ``asyncapy keys``) run their call directly on a
    pooled connection instead.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        pool_size = getattr(client.connection_pool, "max_connections", 16) or 16
        self._limiter = trio.CapacityLimiter(min(int(pool_size), 64))
        self._scripts: dict[str, str] = {}
        self._queue: list[_Call] = []
        self._queued = threading.Condition(threading.Lock())
        self._worker: Optional[threading.Thread] = None
        self._closing = False
        self.batches = 0
        """Batches sent (round trips), for benchmarks."""
        self.calls = 0
        """Calls sent in them."""

    def _script(self, source: str) -> Any:
        script = self.redis.register_script(source)
        self._scripts[script.sha] = source
        return script

    # -- the worker thread ------------------------------------------------------------
    def _work(self) -> None:
        pool = self.redis.connection_pool
        conn = None
        try:
            while True:
                with self._queued:
                    while not self._queue and not self._closing:
                        self._queued.wait()
                    batch, self._queue = self._queue, []
                if not batch:
                    return  # closing, and nothing left to send
                if conn is None:
                    try:
                        conn = pool.get_connection()
                    except _FAILURES as exc:
                        for call in batch:
                            call.error = exc
                if conn is not None:
                    self._send_on(conn, batch)
                by_run: dict = {}
                for call in batch:
                    by_run.setdefault(call.token, []).append(call)
                for token, calls in by_run.items():
                    try:
                        token.run_sync_soon(_wake, calls)
                    except trio.RunFinishedError:  # pragma: no cover - the run ended first
                        pass
        finally:
            if conn is not None:
                pool.release(conn)

    def _send_on(self, conn: Any, batch: list[_Call]) -> None:
        """Run ``batch`` on ``conn``: one write, then every reply."""
        self.batches += 1
        self.calls += len(batch)
        try:
            commands = [command for call in batch for command in call.commands]
            conn.send_packed_command(conn.pack_commands(commands))
            reload: list[_Call] = []
            for call in batch:
                for _ in call.commands:
                    try:
                        call.replies.append(conn.read_response())
                    except redis.ResponseError as exc:
                        if isinstance(exc, redis.exceptions.NoScriptError) and len(call.commands) == 1:
                            reload.append(call)  # Redis restarted: its script cache is empty
                        elif call.error is None:
                            call.error = exc
            if reload:
                self._reload(conn, reload)
        except _FAILURES as exc:
            conn.disconnect()  # the next batch reconnects
            for call in batch:
                if call.error is None and len(call.replies) < len(call.commands):
                    call.error = exc
        except BaseException as exc:  # a bug: fail the calls, never the worker
            conn.disconnect()
            for call in batch:
                call.error = call.error or exc

    def _reload(self, conn: Any, calls: list[_Call]) -> None:
        shas = list(dict.fromkeys(call.commands[0][1] for call in calls))
        commands = [("SCRIPT", "LOAD", self._scripts[sha]) for sha in shas]
        commands += [call.commands[0] for call in calls]
        conn.send_packed_command(conn.pack_commands(commands))
        for _ in shas:
            conn.read_response()
        for call in calls:
            call.replies = []
            try:
                call.replies.append(conn.read_response())
            except redis.ResponseError as exc:
                call.error = exc

    def _send(self, batch: list[_Call]) -> None:
        """Run ``batch`` in this thread, on a pooled connection (synchronous callers)."""
        pool = self.redis.connection_pool
        try:
            conn = pool.get_connection()
        except _FAILURES as exc:
            for call in batch:
                call.error = exc
            return
        try:
            self._send_on(conn, batch)
        finally:
            pool.release(conn)

    # -- the caller's side -------------------------------------------------------------
    async def _run(self, *commands: tuple) -> list:
        """The replies of ``commands``, sent back to back in the next batch."""
        call = _Call(commands)
        if not _offload():  # a script, the CLI, or a synchronous API call: just block
            self._send([call])
            return call.result()
        call.task = trio.lowlevel.current_task()
        call.token = trio.lowlevel.current_trio_token()
        with self._queued:
            self._queue.append(call)
            if self._worker is None:
                self._start_worker()
            self._queued.notify()

        def abort(_: Any) -> Any:
            # A call still queued is withdrawn (a deadline such as the server's
            # store_timeout works); one sent cannot be taken back (an admission may be
            # made already), so its task waits for the reply, as for a thread it started.
            with self._queued:
                try:
                    self._queue.remove(call)
                except ValueError:
                    return trio.lowlevel.Abort.FAILED
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return call.result()

    async def _command(self, *args: Any) -> Any:
        """The reply of one command."""
        return (await self._run(args))[0]

    async def _eval(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The reply of a registered Lua script."""
        return (await self._run(("EVALSHA", script.sha, len(keys), *keys, *args)))[0]

    def _start_worker(self) -> None:
        # (lock held)
        self._worker = threading.Thread(
            target=self._work, name=f"asyncapy-redis-{type(self).__name__}", daemon=True
        )
        self._worker.start()

    def _stop_worker(self) -> None:
        """Let the worker send what is queued and end; a later call starts another."""
        with self._queued:
            self._closing = True
            worker = self._worker
            self._queued.notify()
        if worker is None or worker is threading.current_thread():
            return
        worker.join(5)
        with self._queued:
            if self._worker is worker and not worker.is_alive():
                self._closing = False
                self._worker = None
                if self._queue:  # queued after the worker's last look
                    self._start_worker()

    async def aclose(self) -> None:
        """Send what is queued, stop the worker, disconnect the pool (idempotent)."""
        if not _offload():
            self._stop_worker()
            self.redis.connection_pool.disconnect()
            return
        await trio.to_thread.run_sync(self._stop_worker, limiter=self._limiter)
        await trio.to_thread.run_sync(self.redis.connection_pool.disconnect, limiter=self._limiter)


_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 1, #expired do
  redis.call('ZREM', KEYS[1], expired[i])
  redis.call('HDEL', KEYS[2], expired[i])
end
local limit = tonumber(ARGV[3])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
-- Only ever extend the keys' TTL: a process configured with a shorter lease must not
-- make the keys (and the longer leases of other processes) vanish early.
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
if redis.call('PTTL', KEYS[2]) < lease then redis.call('PEXPIRE', KEYS[2], lease) end
return 1
"""

# KEYS: zset, hash pairs; ARGV: lease, then (session id, record) pairs.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local j = i + 1
  redis.call('ZADD', KEYS[i], now + lease, ARGV[j])
  redis.call('HSET', KEYS[j], ARGV[j], ARGV[j + 1])
  if redis.call('PTTL', KEYS[i]) < lease then redis.call('PEXPIRE', KEYS[i], lease) end
  if redis.call('PTTL', KEYS[j]) < lease then redis.call('PEXPIRE', KEYS[j], lease) end
end
return #KEYS / 2
"""

# HMGET in chunks: unpack() of a whole list fails past Lua's C stack limit (8,000
# values: "too many results to unpack"), and one address may hold more sessions.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local rows = {}
for first = 1, #ids, 1000 do
  local chunk = redis.call('HMGET', KEYS[2], unpack(ids, first, math.min(first + 999, #ids)))
  for i = 1, #chunk do rows[#rows + 1] = chunk[i] end
end
return rows
"""


class RedisSessionStore(_RedisAdapter, SessionStore):
    """Sessions as leases in Redis, shared by every process using the same Redis.

    :param client: a redis-py client (see :func:`connect`).
    :param lease: seconds a session outlives its process's last renewal (30).
    :param prefix: prefix of the Redis keys.
    """

    def __init__(self, client: redis.Redis, lease: float = 30.0, prefix: str = DEFAULT_PREFIX) -> None:
        if type(lease) not in (int, float) or lease < 1:
            raise ValueError(f"lease must be a number of seconds of at least 1, not {lease!r}")
        super().__init__(client, prefix)
        self.lease = float(lease)
        self._lease_ms = int(lease * 1000)
        self._admit = self._script(_ADMIT)
        self._renew = self._script(_RENEW)
        self._live = self._script(_LIVE)
        self._held: dict[str, tuple[SessionRecord, str]] = {}
        self._renewing = trio.Lock()
        self._renewal: Optional[trio.Event] = None  # set while a renewal is in flight

    def _keys(self, address: str) -> list[str]:
        return [f"{self.prefix}sessions:{address}", f"{self.prefix}session-data:{address}"]

    @staticmethod
    def _dump(record: SessionRecord) -> str:
        return json.dumps(
            {"session_id": record.session_id, "address": record.address, "date": record.date, "server_id": record.server_id}
        )

    async def admit(self, record: SessionRecord, limit: int) -> bool:
        data = self._dump(record)
        admitted = await self._eval(
            self._admit, self._keys(record.address), [record.session_id, data, limit, self._lease_ms]
        )
        if admitted:
            self._held[record.session_id] = (record, data)
        return bool(admitted)

    async def release(self, record: SessionRecord) -> None:
        self._held.pop(record.session_id, None)
        zset, data = self._keys(record.address)
        remove = (("MULTI",), ("ZREM", zset, record.session_id), ("HDEL", data, record.session_id), ("EXEC",))
        # A renewal in flight may carry this session in its snapshot: let it land
        # first, or it would put the session back. Releases never wait for each other
        # (they batch), and a renewal begun from now on no longer holds this session.
        while self._renewal is not None and _offload():
            await self._renewal.wait()
        await self._run(*remove)

    async def sessions(self, address: str) -> list[SessionRecord]:
        rows = await self._eval(self._live, self._keys(address), [])
        records = []
        for row in rows:
            if row is None:
                continue
            fields = json.loads(row)
            records.append(SessionRecord(**fields))
        records.sort(key=lambda r: r.date)
        return records

    async def renew(self) -> int:
        """Extend the lease of every session this store admitted; return how many."""
        async with self._renewing:
            held = list(self._held.values())
            if not held:
                return 0
            keys: list[str] = []
            args: list[Any] = [self._lease_ms]
            for record, data in held:
                keys.extend(self._keys(record.address))
                args.extend((record.session_id, data))
            self._renewal = landed = trio.Event()
            try:
                return int(await self._eval(self._renew, keys, args))
            finally:
                self._renewal = None
                landed.set()

    async def maintain(self) -> None:
        """Renew leases every ``lease / 3`` seconds, forever (run it in a nursery)."""
        period = self.lease / 3
        failing = False
        while True:
            await trio.sleep(period)
            try:
                await self.renew()
            except StoreUnavailable as exc:
                if not failing:
                    logger.warning("Cannot renew session leases: %s", exc)
                failing = True
            except Exception:
                # Never let upkeep take the server down with it: log, retry next period.
                logger.exception("Renewing session leases failed")
                failing = True
            else:
                if failing:
                    logger.info("Redis reachable again: session leases renewed")
                failing = False

    def __repr__(self) -> str:
        return f"RedisSessionStore({_where(self.redis)}, lease={self.lease:g}s)"


_REPLACE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""


class RedisKeyStore(_RedisAdapter, KeyStore):
    """API keys in Redis, stored as SHA-256 digests, metadata as JSON.

    :param client: a redis-py client (see :func:`connect`).
    :param prefix: prefix of the Redis keys.
    """

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(client, prefix)
        self._replace = self._script(_REPLACE)

    def _name(self, key: str) -> str:
        if type(key) is not str:
            raise KeyError(key)
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.prefix}key:{digest}"

    async def put(self, key: str, metadata: Any) -> None:
        await self._command("SET", self._name(key), json.dumps(metadata))

    async def get(self, key: str) -> Any:
        raw = await self._command("GET", self._name(key))
        if raw is None:
            raise KeyError(key)
        return json.loads(raw)

    async def delete(self, key: str) -> None:
        if not await self._command("DEL", self._name(key)):
            raise KeyError(key)

    async def contains(self, key: str) -> bool:
        if type(key) is not str:
            return False
        return bool(await self._command("EXISTS", self._name(key)))

    async def update(self, key: str, metadata: Any) -> None:
        if await self._command("SET", self._name(key), json.dumps(metadata), "XX") is None:
            raise KeyError(key)

    async def replace(self, old_key: str, new_key: str) -> None:
        if not await self._eval(self._replace, [self._name(old_key), self._name(new_key)], []):
            raise KeyError(old_key)

    def track(self, cache: Any) -> Any:
        """Keep ``cache`` (a :class:`~asyncapy.adapters.key_cache.KeyCache`) coherent with
        the keys in Redis: the :class:`~asyncapy.adapters.redis_tracking.KeyTracker` of
        :class:`~asyncapy.adapters.key_cache.CachedKeyStore`'s push mode."""
        from asyncapy.adapters.redis_tracking import KeyTracker

        return KeyTracker(self.redis, f"{self.prefix}key:", cache)

    def __repr__(self) -> str:
        return f"RedisKeyStore({_where(self.redis)})"
