"""Redis stores: sessions and API keys shared by every server process.

How a trio server talks to Redis
--------------------------------
redis-py's asynchronous client is built on asyncio and cannot run inside trio. These
adapters use redis-py's *synchronous* client, and one batching front for both ways
the bytes travel (see :class:`_RedisAdapter`): a call made from a trio task is queued;
every call queued while the previous batch was out goes to Redis as one pipeline, one
write and one round trip, and a call still queued can be withdrawn (a deadline such as
the server's ``store_timeout``). The batch then travels by one of two transports:

* **one Redis node** (``redis://``, ``unix://``): in the trio thread itself
  (:class:`_TrioLink`). redis-py opens and authenticates the connection (in a worker
  thread, once, and again after a failure: its handshake, its URL options), then the
  batches are written and read on that socket, non-blocking, with a RESP packer and
  reply parser of our own (:mod:`asyncapy.adapters.resp`). No thread handoff per batch
  and no wakeup of the event loop from another thread: with connection churn under
  ``session_limit`` that handoff, its context switches and redis-py's per-command
  Python work were half of a connection's CPU time (``benchmarks/admission.py``);
* **Sentinel, Cluster, TLS** (``redis+sentinel://``, ``redis+cluster://``,
  ``rediss://``) and connection classes of the user's: the store's one worker thread,
  with redis-py's own I/O, and one wakeup of the event loop per batch. There redis-py
  does more than move bytes (asking the sentinels where the master is on every new
  connection, routing by hash slot and following ``MOVED``, TLS), and those deployments
  have a network round trip between the processes and Redis that dwarfs the handoff.

Both transports give each call its replies or its error by the same rules (a script
Redis forgot is loaded again, a failure fails the calls not answered whole), and a
batch sent is waited for, up to the connection's socket timeout. Called outside any
event loop (a script, the ``asyncapy keys`` command) the same methods run the blocking
call directly on a pooled connection, so one adapter and one connection pool per
process serve both the server and synchronous code.

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

import contextlib
import hashlib
import json
import logging
import math
import re
import threading
import urllib.parse
from typing import Any, Optional, Sequence

import redis
import trio

from .resp import INCOMPLETE, Replies, pack
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
_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


DB_MAX = 2**31 - 1
"""The highest database number a URL may name (Redis's own bound on ``databases``)."""

URL_FORMS = (
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... (the same over TLS), "
    "unix://[[USER]:PASSWORD@]/PATH[?db=DB], "
    "redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?wait_replicas=N] "
    "(the sentinels; port 26379 by default) or "
    "redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...] (some nodes of a Redis Cluster; "
    "port 6379 by default), with PORT from 1 to 65535 and DB from 0 to "
    f"{DB_MAX} (a server's 'databases' setting may allow fewer; 16 by default), and "
    "/ ? # @ % , in a user name or password percent-encoded"
)
"""The URLs :func:`connect` accepts, for error messages."""

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
"""The URL schemes of Redis stores."""

SENTINEL_PORT = 26379
CLUSTER_PORT = 6379

_DIGITS = re.compile(r"[0-9]+")


def _database(text: str, where: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) > DB_MAX:
        raise ValueError(f"the database in {where} is not an integer from 0 to {DB_MAX}")
    return int(text)


class _Multi:
    """The parts of a ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    __slots__ = ("scheme", "username", "password", "hosts", "service", "db", "wait_replicas")

    def __init__(self) -> None:
        self.scheme = ""
        self.username: Optional[str] = None
        self.password: Optional[str] = None
        self.hosts: list[tuple[str, int]] = []
        self.service = ""
        self.db = 0
        self.wait_replicas = 0


def _parse_multi(url: str) -> _Multi:
    """Split a Sentinel or Cluster URL, or say (``ValueError``, never quoting the URL,
    which may hold a password) which part is wrong. redis-py has no URL form for
    either: several hosts are not a URL's authority, so this parser is ours."""
    parts = _Multi()
    scheme, _, rest = url.partition("://")
    parts.scheme = scheme.lower()
    if "#" in rest:
        raise ValueError("a '#' in the URL: percent-encode it (%23) in a password")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    if "@" in path or "@" in query:
        raise ValueError("an '@' after the hosts: percent-encode / ? # @ in a user name or password")
    if at:
        user, colon, password = credentials.partition(":")
        parts.username = urllib.parse.unquote(user) or None
        parts.password = urllib.parse.unquote(password) if colon else None
        if parts.password is None and parts.username is not None:
            # redis://PASSWORD@host is redis-py's reading of a lone credential; the same here
            parts.password, parts.username = parts.username, None
    default = SENTINEL_PORT if parts.scheme == "redis+sentinel" else CLUSTER_PORT
    if not hosts:
        raise ValueError("no HOST[:PORT] before the path")
    for entry in hosts.split(","):
        if entry.startswith("["):  # [IPv6]:PORT
            host, bracket, port = entry[1:].partition("]")
            if not bracket or (port and not port.startswith(":")):
                raise ValueError("an IPv6 host not written [ADDRESS]:PORT")
            port = port[1:]
        else:
            host, _, port = entry.partition(":")
        if not host or any(c in host for c in " []"):
            raise ValueError("an empty or malformed host in the host list")
        if port == "":
            number = default
        elif _DIGITS.fullmatch(port) and 1 <= int(port) <= 65535:
            number = int(port)
        else:
            raise ValueError("a port that is not a number from 1 to 65535")
        parts.hosts.append((host, number))
    segments = [urllib.parse.unquote(segment) for segment in path.split("/")] if slash else []
    if parts.scheme == "redis+sentinel":
        if not segments or not segments[0]:
            raise ValueError("the service name is missing: redis+sentinel://HOSTS/SERVICE")
        parts.service = segments[0]
        if len(segments) > 2:
            raise ValueError("more than /SERVICE/DB after the hosts")
        if len(segments) == 2 and segments[1]:
            parts.db = _database(segments[1], "the path")
    elif segments not in ([], [""]):
        raise ValueError("a path in a redis+cluster:// URL: a cluster has database 0 only")
    if query:
        for name, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
            if name != "wait_replicas" or parts.scheme != "redis+sentinel":
                raise ValueError(f"an unknown query parameter {name!r}")
            if not _DIGITS.fullmatch(values[0]) or int(values[0]) > 100:
                raise ValueError("wait_replicas is not an integer from 0 to 100")
            parts.wait_replicas = int(values[0])
    return parts


def _check_parts(url: str) -> None:
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in SCHEMES:
        raise ValueError("the scheme is not redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://")
    if scheme in ("redis+sentinel", "redis+cluster"):
        _parse_multi(url)
        return
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
    if url.partition("://")[0].lower() in ("redis+sentinel", "redis+cluster"):
        _parse_multi(url)
    else:
        _pool(url)


def wait_replicas(url: str) -> int:
    """The ``wait_replicas`` of a ``redis+sentinel://`` URL (0 for any other URL): how
    many replicas must confirm each API-key write (Redis ``WAIT``)."""
    if url.partition("://")[0].lower() != "redis+sentinel":
        return 0
    return _parse_multi(url).wait_replicas


def connect(url: str, max_connections: int = 16, timeout: float = 2.0) -> Any:
    """A redis-py client for ``url`` with a bounded, health-checked connection pool.

    ``timeout`` bounds connecting and every command, so an unreachable Redis turns
    into :class:`StoreUnavailable` promptly instead of a hung thread. A ``url`` that
    :func:`check_url` refuses is a :class:`ValueError` (no connection is attempted).

    A ``redis+sentinel://`` URL gives a client of the service's master as the
    sentinels name it *now*: each new connection asks them (redis-py's
    ``Sentinel.master_for``), so after a failover the next connection goes to the new
    master. A ``redis+cluster://`` URL gives a :class:`ClusterClient`. Neither
    connects before its first command, like the others.
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "redis+cluster":
        parts = _parse_multi(url)
        return ClusterClient(
            parts.hosts, username=parts.username, password=parts.password,
            max_connections=max_connections, timeout=timeout, location=_location(parts),
        )
    if scheme == "redis+sentinel":
        from redis.sentinel import Sentinel

        parts = _parse_multi(url)
        sentinels = Sentinel(
            parts.hosts,
            # The sentinels themselves are asked without credentials (theirs are not
            # the data nodes'); the URL's user and password are the master's.
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        )
        client = sentinels.master_for(
            parts.service,
            db=parts.db,
            username=parts.username,
            password=parts.password,
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=15,
            retry_on_timeout=False,
        )
        client.asyncapy_location = _location(parts)
        return client
    return redis.Redis(connection_pool=_pool(url, max_connections, timeout))


def _location(parts: _Multi) -> str:
    """A Sentinel or Cluster URL rebuilt without its credentials, for logs."""
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parts.hosts)
    if parts.scheme == "redis+sentinel":
        return f"redis+sentinel://{hosts}/{parts.service}/{parts.db}"
    return f"redis+cluster://{hosts}"


class ClusterClient:
    """The nodes of a Redis Cluster, and which one serves each hash slot.

    A thin layer over redis-py's ``RedisCluster``, used only for what it knows well
    (discovering the nodes and the slot map, one connection pool per node): the stores
    send their calls themselves, each to the pool of the node serving its slot, so the
    batching of :class:`_RedisAdapter` works per node. Created without connecting (the
    slot map is fetched on first use, and again after a ``MOVED`` reply or a lost
    node), so a server can start while the cluster is down, as with one node.

    :param hosts: ``[(host, port), ...]``, any nodes of the cluster (more than one,
        so that one down node does not stop the discovery).
    """

    def __init__(
        self,
        hosts: Sequence[tuple[str, int]],
        *,
        username: Optional[str] = None,
        password: Optional[str] = None,
        max_connections: int = 16,
        timeout: float = 2.0,
        location: str = "redis+cluster://?",
    ) -> None:
        self.hosts = list(hosts)
        self.location = location
        """The cluster's URL without credentials, for logs."""
        self.max_connections = max_connections
        self._kwargs = dict(
            username=username, password=password, socket_timeout=timeout,
            socket_connect_timeout=timeout, health_check_interval=15, retry_on_timeout=False,
        )
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._stale = False

    def _client(self) -> Any:
        with self._lock:
            cluster = self._cluster
            if cluster is None:
                from redis.cluster import ClusterNode, RedisCluster

                cluster = self._cluster = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in self.hosts],
                    max_connections=self.max_connections,
                    **self._kwargs,
                )
                self._stale = False
            elif self._stale:
                self._stale = False
                cluster.nodes_manager.initialize()
            return cluster

    def stale(self) -> None:
        """The slot map may be wrong (a ``MOVED`` reply, a node lost): fetch it again
        before the next routing."""
        self._stale = True

    @staticmethod
    def slot(key: Optional[str]) -> int:
        """The hash slot of ``key`` (its ``{tag}`` if it has one); a call without a key
        goes to the node of slot 0's... any master would do."""
        from redis.crc import key_slot

        return key_slot((key or "").encode())

    def node_client(self, key: str) -> redis.Redis:
        """The redis-py client of the master serving ``key``'s slot now."""
        cluster = self._client()
        node = cluster.nodes_manager.get_node_from_slot(self.slot(key))
        return cluster.get_redis_connection(node)

    def pool(self, key: str) -> Any:
        """The connection pool of the master serving ``key``'s slot now."""
        return self.node_client(key).connection_pool

    def disconnect(self) -> None:
        """Close every node's connections."""
        with self._lock:
            cluster = self._cluster
        if cluster is not None:
            for node in list(cluster.nodes_manager.nodes_cache.values()):
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()

    def __repr__(self) -> str:
        return f"ClusterClient({self.location})"


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


def _where(client: Any) -> str:
    """``redis://host:port/db`` of a client (or its Sentinel or Cluster URL), without
    credentials, for logs."""
    location = getattr(client, "location", None) or getattr(client, "asyncapy_location", None)
    if isinstance(location, str):
        return location
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


class _Call:
    """Commands to send back to back, their replies (or an error), and who waits."""

    __slots__ = ("commands", "key", "replies", "error", "task", "token")

    def __init__(self, commands: Sequence[tuple], key: Optional[str] = None) -> None:
        self.commands = commands
        self.key = key
        """A Redis key the commands touch: which Cluster node they go to (all of a
        call's keys share one hash slot)."""
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
        if isinstance(error, _FAILURES):
            raise StoreUnavailable(f"Redis is unreachable: {redact(str(error))}") from error
        raise error


def _wake(calls: list[_Call]) -> None:
    """In the trio thread: resume the tasks waiting for ``calls`` (a task waiting for
    several calls is named by the first of them only)."""
    for call in calls:
        if call.task is not None:
            trio.lowlevel.reschedule(call.task)


# -- what both transports share: how replies and failures reach the calls -------------------
def _answer(call: _Call, reply: Any, reload: list[_Call]) -> None:
    """Give ``call`` the next of its replies: a value, or the :class:`redis.ResponseError`
    Redis answered in its place (a script it no longer knows goes to ``reload``)."""
    if isinstance(reply, redis.ResponseError):
        if isinstance(reply, redis.exceptions.NoScriptError) and len(call.commands) == 1:
            reload.append(call)  # Redis restarted: its script cache is empty
        elif call.error is None:
            call.error = reply
    else:
        call.replies.append(reply)


def _fail(batch: list[_Call], exc: BaseException) -> None:
    """``exc`` for every call of ``batch`` not answered whole."""
    for call in batch:
        if call.error is None and len(call.replies) < len(call.commands):
            call.error = exc


def _lost(call: _Call) -> bool:
    """Whether ``call`` failed to reach Redis (not refused by it)."""
    return isinstance(call.error, _FAILURES) and not isinstance(call.error, redis.ResponseError)


def _native(client: Any) -> bool:
    """Whether ``client``'s batches can go through :class:`_TrioLink`: one Redis node
    reached with redis-py's own plain connection classes (TCP or Unix socket). Sentinel
    (a master that moves), Cluster (one connection per node, ``MOVED``), TLS (an
    ``SSLSocket`` needs its own non-blocking dance) and a connection class of the
    user's keep the worker thread and redis-py's I/O."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or isinstance(client, ClusterClient) or hasattr(client, "asyncapy_location"):
        return False
    return pool.connection_class in (redis.Connection, redis.UnixDomainSocketConnection)


class _TrioLink:
    """The trio transport: one adapter's batches written and read in the trio thread.

    The same batches as the worker thread's (:class:`_RedisAdapter`), on one connection
    redis-py opened and authenticated in a worker thread (``pool.get_connection()``,
    once, and again only after a failure): its socket is then non-blocking and used
    here, the commands packed by :func:`asyncapy.adapters.resp.pack` and the replies read
    by :class:`~asyncapy.adapters.resp.Replies`. A system task of the run (the sender)
    takes every call queued while the previous batch was out, so batching is what it
    was; what goes is the handoff to a thread and the wakeup of the event loop back
    (two context switches and a lock per batch), and redis-py's per-command Python
    work.

    Calls stay queued, and can be withdrawn, until the sender takes them: while it
    connects or checks an idle connection too. A batch taken is answered, failed by
    the socket timeout of the pool (``socket_timeout``), or failed when the run ends.
    """

    def __init__(self, adapter: _RedisAdapter, token: Any) -> None:
        self.adapter = adapter
        self.token = token
        self.queue: list[_Call] = []
        self.done = False
        self._closing = False
        self._closed = trio.Event()
        self._task: Any = None
        self._parked = False
        pool = adapter.redis.connection_pool
        self._pool = pool
        kwargs = pool.connection_kwargs
        self._timeout = kwargs.get("socket_timeout") or math.inf
        self._check_every = kwargs.get("health_check_interval") or 0
        self._encoding = (kwargs.get("encoding") or "utf-8", kwargs.get("encoding_errors") or "strict")
        self._decode = kwargs.get("decode_responses", False)
        self._conn: Any = None
        self._sock: Any = None
        self._replies = Replies()
        self._used = 0.0

    def submit(self, calls: list[_Call]) -> None:
        """Queue ``calls`` (in the trio thread) and wake the sender if it waits."""
        self.queue.extend(calls)
        if self._parked:
            self._parked = False
            trio.lowlevel.reschedule(self._task)

    async def close(self) -> None:
        """Let the sender answer what is queued, then end and disconnect."""
        self._closing = True
        if self._parked:
            self._parked = False
            trio.lowlevel.reschedule(self._task)
        await self._closed.wait()

    async def run(self) -> None:
        """The sender: one batch at a time, each time every call queued meanwhile."""
        self._task = trio.lowlevel.current_task()
        try:
            while True:
                if not self.queue:
                    if self._closing:
                        return
                    self._parked = True
                    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
                    continue
                if not await self._ready():
                    continue
                if not self.queue:  # all withdrawn while connecting
                    continue
                batch, self.queue = self.queue, []
                await self._exchange(batch)
                _wake(batch)
        finally:
            self._parked = False
            self._drop()
            self.done = True
            self._closed.set()

    # -- the connection ----------------------------------------------------------------
    async def _ready(self) -> bool:
        """A connection to send on: the one held, checked with a ``PING`` after
        ``health_check_interval`` seconds idle (as redis-py would), or a new one. On
        failure the calls queued fail, and ``False``."""
        if self._sock is not None and self._check_every and trio.current_time() - self._used > self._check_every:
            try:
                with trio.fail_after(self._timeout):
                    await self._write(pack([("PING",)]))
                    await self._reply()
            except (trio.TooSlowError, *_FAILURES):
                self._drop()
        if self._sock is not None:
            return True
        try:
            conn = await trio.to_thread.run_sync(self._pool.get_connection, limiter=self.adapter._limiter)
        except _FAILURES as exc:
            self.adapter.outages += 1
            batch, self.queue = self.queue, []
            _fail(batch, exc)
            _wake(batch)
            return False
        sock = conn._sock
        sock.setblocking(False)
        self._conn, self._sock = conn, sock
        self._replies = Replies(self._decoder() if self._decode else None)
        self._used = trio.current_time()
        return True

    def _decoder(self) -> Any:
        encoding, errors = self._encoding
        return lambda value: value.decode(encoding, errors)

    def _drop(self) -> None:
        """Close the connection; the next batch opens another (after a failure, mid-batch
        bytes would confuse the next batch's replies)."""
        conn, sock = self._conn, self._sock
        self._conn = self._sock = None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            trio.lowlevel.notify_closing(sock)
        with contextlib.suppress(Exception):
            conn.disconnect()
        with contextlib.suppress(Exception):
            self._pool.release(conn)

    # -- one batch -------------------------------------------------------------------
    async def _exchange(self, batch: list[_Call]) -> None:
        adapter = self.adapter
        adapter.batches += 1
        adapter.calls += len(batch)
        encoding, errors = self._encoding
        try:
            with trio.move_on_after(self._timeout) as deadline:
                await self._write(pack([command for call in batch for command in call.commands], encoding, errors))
                reload: list[_Call] = []
                for call in batch:
                    for _ in call.commands:
                        _answer(call, await self._reply(), reload)
                if reload:
                    shas, commands = adapter._reload_commands(reload)
                    await self._write(pack(commands, encoding, errors))
                    for _ in shas:
                        reply = await self._reply()
                        if isinstance(reply, redis.ResponseError):
                            raise reply
                    for call in reload:
                        reply = await self._reply()
                        if isinstance(reply, redis.ResponseError):
                            call.error = reply
                        else:
                            call.replies = [reply]
            if deadline.cancelled_caught:
                raise redis.TimeoutError("Timeout reading from socket")
            self._used = trio.current_time()
        except _FAILURES as exc:
            self._drop()
            if not isinstance(exc, redis.ResponseError):
                adapter.outages += 1
            _fail(batch, exc)
        except (trio.Cancelled, KeyboardInterrupt):  # the run ends
            self._drop()
            _fail(batch, redis.ConnectionError("the event loop closed with the call in flight"))
            _wake(batch)
            raise
        except BaseException as exc:  # a bug: fail the calls, never the sender
            self._drop()
            for call in batch:
                call.error = call.error or exc

    async def _write(self, data: bytes) -> None:
        sock = self._sock
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            view = view[sent:]

    async def _reply(self) -> Any:
        replies = self._replies
        while True:
            reply = replies.next()
            if reply is not INCOMPLETE:
                return reply
            await trio.lowlevel.wait_readable(self._sock)
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise redis.ConnectionError("Connection closed by server.")
            replies.feed(data)


class _RedisAdapter:
    """Store calls in batches, off the event loop's back: the batching front.

    Every store call made from a trio task (admissions, releases, key lookups that
    missed the cache...) is queued; each time the connection is free, *every* call
    queued meanwhile is written to Redis as one pipeline, the replies read, and the
    waiting tasks woken. The busier the server, the bigger the batches: one round trip
    for many calls. Every call keeps its own reply, and its own error: a script refused
    by Redis fails that call only. Each call is one command Redis runs atomically (a
    Lua script, or a MULTI/EXEC block), so batching changes no call's meaning; calls
    are sent in the order they were made, and never retried. A call cancelled while
    still queued is withdrawn; one already sent is waited for (its effect in Redis
    cannot be undone).

    Two transports carry the batches (see the module's docstring): with one Redis node,
    :class:`_TrioLink`, in the trio thread (:attr:`native`); otherwise the adapter's one
    worker thread, which owns a connection and wakes the tasks with one wakeup of the
    event loop per batch.

    Synchronous callers (a script, ``asyncapy keys``) run their call directly on a
    pooled connection instead.

    With a Redis Cluster (a :class:`ClusterClient`), each call goes to the master
    serving its key's slot: the worker splits a batch by node and keeps one connection
    per node, so a batch is still one write per node, the round trips overlapping. A
    call answered ``MOVED`` was not run: the slot map is fetched again and the call
    sent once more, to the node named.
    """

    def __init__(self, client: Any, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self.cluster = isinstance(client, ClusterClient)
        """Whether the store is a Redis Cluster (keys laid out with hash tags)."""
        if self.cluster and ("{" in prefix or "}" in prefix):
            raise ValueError("a prefix for a Redis Cluster must not hold { or }: the stores add the hash tags")
        pool_size = client.max_connections if self.cluster else getattr(client.connection_pool, "max_connections", 16)
        self._limiter = trio.CapacityLimiter(min(int(pool_size or 16), 64))
        self.outages = 0
        """Batches that failed to reach Redis (counted by the worker): a renewal loop
        renews early after one, since a failover may have lost recent leases."""
        self._scripts: dict[str, str] = {}
        self._queue: list[_Call] = []
        self._queued = threading.Condition(threading.Lock())
        self._worker: Optional[threading.Thread] = None
        self._closing = False
        self.batches = 0
        """Batches sent (round trips), for benchmarks."""
        self.calls = 0
        """Calls sent in them."""
        self.native = _native(client)
        """Whether batches go through the trio transport (:class:`_TrioLink`: one Redis
        node, redis-py's plain TCP or Unix socket connection) rather than the
        worker thread."""
        self._link: Optional[_TrioLink] = None

    def _script(self, source: str) -> Any:
        script = _Script(source)
        self._scripts[script.sha] = source
        return script

    def _pool_for(self, call: _Call) -> Any:
        if self.cluster:
            return self.redis.pool(call.key)
        return self.redis.connection_pool

    def _dispatch(self, batch: list[_Call], conns: dict) -> None:
        """Send ``batch``: each call on the connection (kept in ``conns``, by pool) of
        the node serving it; with a Cluster, a call redirected by ``MOVED`` is sent
        once more after the slot map is fetched again."""
        for attempt in (0, 1):
            groups: dict[int, tuple[Any, list[_Call]]] = {}
            for call in batch:
                try:
                    pool = self._pool_for(call)
                except _FAILURES as exc:
                    call.error = exc
                    continue
                groups.setdefault(id(pool), (pool, []))[1].append(call)
            for key, (pool, calls) in groups.items():
                held = conns.get(key)
                if held is None:
                    try:
                        held = conns[key] = (pool, pool.get_connection())
                    except _FAILURES as exc:
                        self.outages += 1
                        if self.cluster:
                            self.redis.stale()
                        for call in calls:
                            call.error = exc
                        continue
                self._send_on(held[1], calls)
                if any(_lost(call) for call in calls):
                    # Back to the pool, and a fresh one for the next batch: the pool's
                    # get_connection() connects where the pool says (with Sentinel, the
                    # master the sentinels name now), a reused one where it was.
                    del conns[key]
                    pool.release(held[1])
            if not self.cluster:
                return
            if any(_lost(call) for call in batch):
                self.redis.stale()  # a node lost: maybe failed over
            moved = [call for call in batch if isinstance(call.error, redis.exceptions.MovedError)]
            if not moved or attempt:
                return
            self.redis.stale()
            for call in moved:
                call.error, call.replies = None, []
            batch = moved

    @staticmethod
    def _release(conns: dict) -> None:
        for pool, conn in conns.values():
            try:
                pool.release(conn)
            except Exception:  # pragma: no cover - a pool replaced by a new slot map
                conn.disconnect()
        conns.clear()

    # -- the worker thread ------------------------------------------------------------
    def _work(self) -> None:
        conns: dict = {}
        try:
            while True:
                with self._queued:
                    while not self._queue and not self._closing:
                        self._queued.wait()
                    batch, self._queue = self._queue, []
                if not batch:
                    return  # closing, and nothing left to send
                self._dispatch(batch, conns)
                by_run: dict = {}
                for call in batch:
                    by_run.setdefault(call.token, []).append(call)
                for token, calls in by_run.items():
                    try:
                        token.run_sync_soon(_wake, calls)
                    except trio.RunFinishedError:  # pragma: no cover - the run ended first
                        pass
        finally:
            self._release(conns)

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
                        reply = conn.read_response()
                    except redis.ResponseError as exc:
                        reply = exc
                    _answer(call, reply, reload)
            if reload:
                shas, commands = self._reload_commands(reload)
                conn.send_packed_command(conn.pack_commands(commands))
                for _ in shas:
                    conn.read_response()
                for call in reload:
                    try:
                        call.replies = [conn.read_response()]
                    except redis.ResponseError as exc:
                        call.error = exc
        except _FAILURES as exc:
            conn.disconnect()  # the next batch reconnects (to a new master, if one was named)
            self.outages += 1
            _fail(batch, exc)
        except BaseException as exc:  # a bug: fail the calls, never the worker
            conn.disconnect()
            for call in batch:
                call.error = call.error or exc

    def _reload_commands(self, calls: list[_Call]) -> tuple[list[str], list[tuple]]:
        """The scripts ``calls`` need loaded again (a Redis restarted, or ``SCRIPT FLUSH``):
        one ``SCRIPT LOAD`` each, then the calls once more."""
        shas = list(dict.fromkeys(call.commands[0][1] for call in calls))
        commands = [("SCRIPT", "LOAD", self._scripts[sha]) for sha in shas]
        commands += [call.commands[0] for call in calls]
        return shas, commands

    def _send(self, batch: list[_Call]) -> None:
        """Run ``batch`` in this thread, on pooled connections (synchronous callers)."""
        conns: dict = {}
        try:
            self._dispatch(batch, conns)
        finally:
            self._release(conns)

    # -- the caller's side -------------------------------------------------------------
    async def _run(self, *commands: tuple, key: Optional[str] = None) -> list:
        """The replies of ``commands``, sent back to back in the next batch (with a
        Cluster, to the node serving ``key``)."""
        call = _Call(commands, key)
        await self._run_calls([call])
        return call.result()

    async def _run_calls(self, calls: list[_Call]) -> None:
        """Send ``calls`` in one batch and wait until all are answered; each keeps its
        replies or its error (read them with :meth:`_Call.result`)."""
        if not _offload():  # a script, the CLI, or a synchronous API call: just block
            self._send(calls)
            return
        token = trio.lowlevel.current_trio_token()
        calls[0].task = trio.lowlevel.current_task()  # woken once, with the batch
        link = self._trio_link(token) if self.native else None
        if link is not None:  # the trio transport: queued in this thread, no lock
            link.submit(calls)
        else:
            for call in calls:
                call.token = token
            with self._queued:
                self._queue.extend(calls)
                if self._worker is None:
                    self._start_worker()
                self._queued.notify()

        def abort(_: Any) -> Any:
            # Calls still queued are withdrawn (a deadline such as the server's
            # store_timeout works); once sent they cannot be taken back (an admission may
            # be made already), so the task waits for the replies, as for a thread.
            with self._queued:
                queue = self._queue if link is None else link.queue
                if not all(call in queue for call in calls):
                    return trio.lowlevel.Abort.FAILED
                for call in calls:
                    queue.remove(call)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _trio_link(self, token: Any) -> Optional[_TrioLink]:
        """This trio run's link (started on first use), or ``None`` while another run,
        in another thread, still has one: that rare case uses the worker thread."""
        link = self._link
        if link is not None and not link.done:
            if link.token is token:
                return link
            return None
        link = self._link = _TrioLink(self, token)
        trio.lowlevel.spawn_system_task(link.run, name=f"asyncapy-redis-{type(self).__name__}")
        return link

    async def _command(self, *args: Any) -> Any:
        """The reply of one command (its first argument after the name is its key)."""
        return (await self._run(args, key=args[1] if len(args) > 1 else None))[0]

    async def _eval(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The reply of a registered Lua script."""
        return (await self._run(("EVALSHA", script.sha, len(keys), *keys, *args), key=keys[0] if keys else None))[0]

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

    def _disconnect(self) -> None:
        if self.cluster:
            self.redis.disconnect()
        else:
            self.redis.connection_pool.disconnect()

    async def aclose(self) -> None:
        """Send what is queued, stop the worker, disconnect the pool (idempotent)."""
        if not _offload():
            self._stop_worker()
            self._disconnect()
            return
        link = self._link
        if link is not None and link.token is trio.lowlevel.current_trio_token():
            await link.close()
        await trio.to_thread.run_sync(self._stop_worker, limiter=self._limiter)
        await trio.to_thread.run_sync(self._disconnect, limiter=self._limiter)


class _Script:
    """A Lua script known by its SHA-1 (``EVALSHA``; reloaded on ``NOSCRIPT``)."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


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
        if self.cluster:  # one address's two keys in one slot: {address} is their hash tag
            return [f"{self.prefix}sessions:{{{address}}}", f"{self.prefix}session-data:{{{address}}}"]
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
        await self._run(*remove, key=zset)

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
            # One script per hash slot (a Cluster runs a script on one slot only); with
            # one node, all of them in one script. Either way one batch, one round trip
            # (per node).
            groups: dict[int, tuple[list[str], list[Any]]] = {}
            for record, data in held:
                zset, hash_ = self._keys(record.address)
                slot = self.redis.slot(zset) if self.cluster else 0
                keys, args = groups.setdefault(slot, ([], [self._lease_ms]))
                keys.extend((zset, hash_))
                args.extend((record.session_id, data))
            calls = [
                _Call((("EVALSHA", self._renew.sha, len(keys), *keys, *args),), keys[0])
                for keys, args in groups.values()
            ]
            self._renewal = landed = trio.Event()
            try:
                await self._run_calls(calls)
            finally:
                self._renewal = None
                landed.set()
            return sum(int(call.result()[0]) for call in calls)

    async def maintain(self) -> None:
        """Renew leases every ``lease / 3`` seconds, forever (run it in a nursery)."""
        period = self.lease / 3
        failing = False
        renewed_at = trio.current_time()
        seen = self.outages
        while True:
            # Renew every period, and within a second of the store coming back after an
            # outage: after a Sentinel failover the new master may lack the leases of
            # the last instants (asynchronous replication); renewing puts them back, so
            # that session_limit holds there again.
            await trio.sleep(min(period, 1.0))
            due = trio.current_time() - renewed_at >= period
            if not (due or failing or self.outages != seen):
                continue
            seen = self.outages
            renewed_at = trio.current_time()
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

    With a Redis Cluster every key lives in one hash slot (the tag ``{key}``:
    ``<prefix>{key}:<digest>``), so that a reissue stays one atomic ``RENAME`` and
    one node's tracking sees every change; keys are few and their checks are answered
    from each process's cache, so one slot carries them easily.

    :param client: a redis-py client (see :func:`connect`).
    :param prefix: prefix of the Redis keys.
    :param wait_replicas: after each write (issue, update, reissue, revoke), wait
        until this many replicas have it (Redis ``WAIT``, up to ``wait_timeout``
        seconds), else fail with :class:`StoreUnavailable`, the write made on the
        master but not confirmed: what a failover could lose (0: do not wait).
    :param wait_timeout: seconds to wait for the replicas (1).
    """

    def __init__(
        self, client: Any, prefix: str = DEFAULT_PREFIX, *, wait_replicas: int = 0, wait_timeout: float = 1.0
    ) -> None:
        super().__init__(client, prefix)
        if type(wait_replicas) is not int or wait_replicas < 0:
            raise ValueError(f"wait_replicas must be an integer of at least 0, not {wait_replicas!r}")
        if type(wait_timeout) not in (int, float) or not wait_timeout > 0:
            raise ValueError(f"wait_timeout must be a number of seconds above 0, not {wait_timeout!r}")
        self.wait_replicas = wait_replicas
        self.wait_timeout = float(wait_timeout)
        self._replace = self._script(_REPLACE)
        self._names = f"{prefix}{{key}}:" if self.cluster else f"{prefix}key:"

    def _name(self, key: str) -> str:
        if type(key) is not str:
            raise KeyError(key)
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return self._names + digest

    async def _write(self, *command: Any) -> Any:
        """The reply of a write, confirmed by ``wait_replicas`` replicas if asked."""
        if not self.wait_replicas:
            return (await self._run(command, key=self._names))[0]
        replies = await self._run(
            command, ("WAIT", self.wait_replicas, int(self.wait_timeout * 1000)), key=self._names
        )
        if replies[1] < self.wait_replicas:
            raise StoreUnavailable(
                f"the API-key write was made on the Redis master but confirmed by {replies[1]} of "
                f"{self.wait_replicas} replicas within {self.wait_timeout:g}s: a failover now could lose it"
            )
        return replies[0]

    async def put(self, key: str, metadata: Any) -> None:
        await self._write("SET", self._name(key), json.dumps(metadata))

    async def get(self, key: str) -> Any:
        raw = await self._command("GET", self._name(key))
        if raw is None:
            raise KeyError(key)
        return json.loads(raw)

    async def delete(self, key: str) -> None:
        if not await self._write("DEL", self._name(key)):
            raise KeyError(key)

    async def contains(self, key: str) -> bool:
        if type(key) is not str:
            return False
        return bool(await self._command("EXISTS", self._name(key)))

    async def update(self, key: str, metadata: Any) -> None:
        if await self._write("SET", self._name(key), json.dumps(metadata), "XX") is None:
            raise KeyError(key)

    async def replace(self, old_key: str, new_key: str) -> None:
        old, new = self._name(old_key), self._name(new_key)
        if not await self._write("EVALSHA", self._replace.sha, 2, old, new):
            raise KeyError(old_key)

    def track(self, cache: Any) -> Any:
        """Keep ``cache`` (a :class:`~asyncapy.adapters.key_cache.KeyCache`) coherent with
        the keys in Redis: the :class:`~asyncapy.adapters.redis_tracking.KeyTracker` of
        :class:`~asyncapy.adapters.key_cache.CachedKeyStore`'s push mode."""
        from .redis_tracking import KeyTracker

        if self.cluster:
            cluster = self.redis
            tag = self._names

            def locate() -> Any:
                cluster.stale()  # the slot map of now, not of the last failure
                return cluster.node_client(tag)

            return KeyTracker(locate, self._names, cache, verify=_still_serving(cluster.slot(tag)))
        if hasattr(self.redis, "asyncapy_location"):  # Sentinel: the master of now
            pool = self.redis.connection_pool
            return KeyTracker(
                self.redis, self._names, cache,
                verify=lambda client, link: tuple(pool.get_master_address()) == (link.host, link.port),
            )
        return KeyTracker(self.redis, self._names, cache)

    def __repr__(self) -> str:
        return f"RedisKeyStore({_where(self.redis)})"


def _still_serving(slot: int) -> Any:
    """A check for a Cluster key tracker: does the node its link is on still serve the
    keys' slot? ``CLUSTER SLOTS`` asked of that node, on one of its pooled connections
    (the link itself is subscribed and can ask nothing)."""

    def verify(client: redis.Redis, link: Any) -> bool:
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("CLUSTER", "SLOTS")
            ranges = conn.read_response()
        finally:
            pool.release(conn)
        for row in ranges:
            if int(row[0]) <= slot <= int(row[1]):
                host, port = row[2][0], int(row[2][1])
                host = host.decode() if isinstance(host, bytes) else host
                return (host, port) == (link.host, link.port)
        return False

    return verify
