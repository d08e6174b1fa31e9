"""Redis stores: sessions and API keys shared by every server process.

How a trio server talks to Redis
--------------------------------
redis-py's asynchronous client is built on asyncio and cannot run inside trio. These
adapters therefore use redis-py's *synchronous* client, and every call made from a
trio task runs in a worker thread (``trio.to_thread.run_sync``) behind a
:class:`trio.CapacityLimiter` sized to the connection pool: a thread never waits for a
pool connection while holding a slot another call could use, and the event loop never
blocks on the network. Called outside any event loop (a script, the ``asyncapy keys``
command) the same methods run the blocking call directly, so one adapter and one
connection pool per process serve both the server and synchronous code.

The cost is one thread hop per store call. The server makes store calls once per
connection (admission, release) and once per renewal period for all of its sessions,
never per packet; the API-key filter makes one per check.

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
as JSON. There is no cache: a key issued, reissued, updated or revoked by any process
is seen by every process on its next check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.parse
from typing import Any, Callable, TypeVar

import redis
import trio

from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import BLOCKING, KeyStore, SessionRecord, SessionStore
from asyncapy.domain.redaction import redact

__all__ = ["RedisSessionStore", "RedisKeyStore", "connect", "check_url", "URL_FORMS", "DEFAULT_PREFIX"]

logger = logging.getLogger("asyncapy.redis")

DEFAULT_PREFIX = "asyncapy:"
"""Prefix of every Redis key the adapters write."""

T = TypeVar("T")

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


class _RedisAdapter:
    """Calls into redis-py, off the event loop when there is one."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        pool_size = getattr(client.connection_pool, "max_connections", 16) or 16
        self._limiter = trio.CapacityLimiter(min(int(pool_size), 64))

    def _guarded(self, function: Callable[..., T], *args: Any) -> T:
        # redis-py's messages name the host and port, not the password; redact() all
        # the same, since the message goes to logs and the terminal.
        try:
            return function(*args)
        except _FAILURES as exc:
            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
                raise StoreUnavailable(f"Redis is unreachable: {redact(str(exc))}") from exc
            raise StoreUnavailable(f"Redis refused the command: {redact(str(exc))}") from exc

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        if not _offload():  # a script, the CLI, or a synchronous API call: just block
            return self._guarded(function, *args)
        return await trio.to_thread.run_sync(self._guarded, function, *args, limiter=self._limiter)

    async def aclose(self) -> None:
        """Disconnect the pool (idempotent)."""
        await self._call(self.redis.connection_pool.disconnect)


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
        self._admit = client.register_script(_ADMIT)
        self._renew = client.register_script(_RENEW)
        self._live = client.register_script(_LIVE)
        self._held: dict[str, tuple[SessionRecord, str]] = {}
        self._renewing = trio.Lock()

    def _keys(self, address: str) -> list[str]:
        return [f"{self.prefix}sessions:{address}", f"{self.prefix}session-data:{address}"]

    @staticmethod
    def _dump(record: SessionRecord) -> str:
        return json.dumps(
            {"session_id": record.session_id, "address": record.address, "date": record.date, "server_id": record.server_id}
        )

    async def admit(self, record: SessionRecord, limit: int) -> bool:
        data = self._dump(record)
        admitted = await self._call(
            self._admit, self._keys(record.address), [record.session_id, data, limit, self._lease_ms]
        )
        if admitted:
            self._held[record.session_id] = (record, data)
        return bool(admitted)

    async def release(self, record: SessionRecord) -> None:
        self._held.pop(record.session_id, None)
        zset, data = self._keys(record.address)

        def remove() -> None:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(zset, record.session_id)
                pipe.hdel(data, record.session_id)
                pipe.execute()

        if not _offload():
            self._guarded(remove)
            return
        async with self._renewing:  # a renewal in flight must not resurrect it
            await self._call(remove)

    async def sessions(self, address: str) -> list[SessionRecord]:
        rows = await self._call(self._live, self._keys(address), [])
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
            return int(await self._call(self._renew, keys, args))

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
        self._replace = client.register_script(_REPLACE)

    def _name(self, key: str) -> str:
        if type(key) is not str:
            raise KeyError(key)
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.prefix}key:{digest}"

    async def put(self, key: str, metadata: Any) -> None:
        await self._call(self.redis.set, self._name(key), json.dumps(metadata))

    async def get(self, key: str) -> Any:
        raw = await self._call(self.redis.get, self._name(key))
        if raw is None:
            raise KeyError(key)
        return json.loads(raw)

    async def delete(self, key: str) -> None:
        if not await self._call(self.redis.delete, self._name(key)):
            raise KeyError(key)

    async def contains(self, key: str) -> bool:
        if type(key) is not str:
            return False
        return bool(await self._call(self.redis.exists, self._name(key)))

    async def update(self, key: str, metadata: Any) -> None:
        if not await self._call(self._set_existing, self._name(key), json.dumps(metadata)):
            raise KeyError(key)

    def _set_existing(self, name: str, value: str) -> bool:
        return bool(self.redis.set(name, value, xx=True))

    async def replace(self, old_key: str, new_key: str) -> None:
        if not await self._call(self._replace, [self._name(old_key), self._name(new_key)], []):
            raise KeyError(old_key)

    def __repr__(self) -> str:
        return f"RedisKeyStore({_where(self.redis)})"
