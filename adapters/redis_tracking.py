"""Redis-assisted client-side caching of API keys: the invalidation link.

Redis documents how a client keeps a local cache coherent (server-assisted client-side
caching): ``CLIENT TRACKING ON BCAST PREFIX <prefix>`` makes the server announce every
change of every key under the prefix (written, deleted, renamed, expired, evicted, or
the whole database flushed) on the Pub/Sub channel ``__redis__:invalidate`` of the
connection named by ``REDIRECT``; and a client must *flush its cache when the
invalidation link is lost*, since what was announced meanwhile is gone.

:class:`KeyTracker` is that link for one :class:`~asyncapy.adapters.key_cache.KeyCache`:
one dedicated connection (never one of the pool's) which enables tracking with a
redirect to itself, subscribes to the channel, and is read by one long-lived daemon
thread. The thread applies each invalidation to the cache directly, under the cache's
lock: no event loop is involved, so an invalidation costs no hop to trio, and the
server's loop pays nothing for it. Broadcasting mode, rather than the default mode,
because the default mode remembers, per client, every key it read: memory in Redis
proportional to the keys checked, and a "key read" that must happen on the tracked
connection itself. ``BCAST`` costs Redis nothing per key, and the prefix
(``<prefix>key:``) excludes the session leases, which change all the time.

Link health
-----------
The thread sends ``PING`` every ``interval`` seconds on the same connection. Redis
answers in order, so a pong proves that every change made before Redis read the ping
has been delivered before it: the thread then lets the cache answer from memory for
``window`` seconds from the ping's sending (:meth:`KeyCache.alive`). Thus:

* Redis restarted, or the connection killed (``CLIENT KILL``): the socket reports it,
  the cache is dropped at once (:meth:`KeyCache.link_down`), lookups go to Redis
  (failing closed while it is unreachable), and the thread reconnects, retrying with a
  backoff up to one second; the cache starts empty when tracking is on again.
* A silent network cut: no pong; the cache stops answering ``window`` seconds after the
  last proof, and after ``dead_after`` seconds without a reply the link is declared
  lost and rebuilt, as above.

Following a failover
--------------------
With Redis Sentinel the link is on whichever node the sentinels name master when it
connects; with a Redis Cluster, on the master serving the keys' hash slot (every API
key lives in that one slot). A master killed breaks the link at once, and the thread
reconnects to the node named *then*: the new master. A master cut off from the others
but alive would keep the link up while the writes go to its successor, so every
``recheck`` seconds (1) the thread also asks (``verify``) whether its node is still
the one: the sentinels' master, or the node serving the slot (a slot moved by a
resharding too). If not, the link is rebuilt, the cache dropped first, as above.

Through a slot migration
------------------------
While the keys' slot is being migrated (the source ``MIGRATING``, the target
``IMPORTING``), the link stays on the source, which still announces every change of
the keys it holds, and of each key ``MIGRATE`` takes away. A key already moved is read
and written on the target after an ``ASK``: such an answer is never kept in the cache
(:meth:`KeyCache.discard_fetches`), so it is always read from Redis until the move is
over. When it is (``MOVED``), the store calls :meth:`KeyTracker.relink`: the cache is
dropped and the link made again on the new owner at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from typing import Any, Callable, Optional, Union

import redis

from asyncapy.domain.redaction import redact

from .key_cache import KeyCache

__all__ = ["KeyTracker", "INVALIDATION_CHANNEL"]

logger: logging.Logger = logging.getLogger("asyncapy.redis")

INVALIDATION_CHANNEL = b"__redis__:invalidate"
"""The Pub/Sub channel Redis announces invalidations on (protocol RESP2)."""

# Settings of the pool's connections that belong to redis-py's RESP3 maintenance
# notifications: the tracker's connection speaks RESP2 (Pub/Sub), without them.
_RESP3_ONLY = ("maint_notifications", "orig_")


def _connection(client: redis.Redis, timeout: float) -> Any:
    """A new connection (not the pool's) with ``client``'s address, TLS and credentials,
    speaking RESP2."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if not k.startswith(_RESP3_ONLY)}
    kwargs.update(protocol=2, socket_timeout=timeout, health_check_interval=0)
    kwargs.setdefault("socket_connect_timeout", timeout)
    return pool.connection_class(**kwargs)


class KeyTracker:
    """A thread keeping ``cache`` coherent with the keys under ``prefix`` in Redis.

    Started by its constructor; :meth:`close` stops it. The thread holds the cache only
    weakly: a cache nobody uses any more ends its tracker too.

    :param client: the redis-py client (its connection settings are reused), or a
        function returning the client of the node to link to now (called at each link).
    :param prefix: the key-name prefix to track, e.g. ``asyncapy:key:``; each name's
        remainder is the key's SHA-256 in hex.
    :param cache: the cache to invalidate.
    :param interval: seconds between pings (0.05).
    :param window: seconds the cache may answer after a ping is answered (0.25).
    :param dead_after: seconds without a reply to a ping before the link is rebuilt (1).
    :param verify: ``verify(client, link_connection)``, called every ``recheck``
        seconds: false (or an error) when the link's node is no longer the one to
        track (a failover, a resharding); the link is then rebuilt.
    :param recheck: seconds between two ``verify`` calls (1).
    """

    def __init__(
        self,
        client: Union[redis.Redis, Callable[[], redis.Redis]],
        prefix: str,
        cache: KeyCache,
        *,
        interval: float = 0.05,
        window: float = 0.25,
        dead_after: float = 1.0,
        verify: Optional[Callable[[Any, Any], bool]] = None,
        recheck: float = 1.0,
    ) -> None:
        self.client = client
        self.verify = verify
        self.recheck = recheck
        self.prefix: bytes = prefix.encode()
        self.interval = interval
        self.window = window
        self.dead_after = dead_after
        self._cache = weakref.ref(cache)
        self._stop = threading.Event()
        self._relink = threading.Event()
        self._conn: Optional[Any] = None
        self._outage = False
        self.links = 0
        """How many times tracking was enabled (1 + reconnections)."""
        self.invalidations = 0
        """Invalidation messages received."""
        self._thread = threading.Thread(target=self._run, name=f"asyncapy-key-tracker-{prefix}", daemon=True)
        self._thread.start()

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            before = self.links
            try:
                self._serve_link()
            except Exception as exc:
                # Any failure, expected (a Redis error, a lost socket) or not (redis-py
                # reading a connection that close() just tore down from another thread
                # raises AttributeError), means one thing: the cache can no longer be
                # told of changes. Stopping, that is the end; otherwise the cache is
                # dropped and the link made again, so no failure leaves it trusted.
                if self._stop.is_set():
                    return
                cache = self._cache()
                if cache is None:
                    return
                cache.link_down()
                del cache
                if not self._outage:  # once per outage
                    self._outage = True
                    logger.warning(
                        "API-key cache off: invalidation link to Redis lost (%s); keys are "
                        "checked in Redis until it is back",
                        redact(str(exc)),
                    )
            else:
                return  # stopped, or the cache is gone
            finally:
                self._disconnect()
            backoff = 0.05 if self.links > before else min(backoff * 2, 1.0)
            if self._stop.wait(backoff):
                return

    def _serve_link(self) -> None:
        client = self.client if isinstance(self.client, redis.Redis) else self.client()
        conn = self._conn = _connection(client, self.dead_after)
        conn.connect()
        since = time.monotonic()
        conn.send_command("CLIENT", "ID")
        client_id = conn.read_response()
        conn.send_command(
            "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self.prefix
        )
        reply = conn.read_response()
        if reply not in (b"OK", "OK"):
            raise _LinkLost(f"CLIENT TRACKING answered {reply!r}")
        conn.send_command("SUBSCRIBE", INVALIDATION_CHANNEL)
        while True:  # the subscription's confirmation
            message = conn.read_response()
            if isinstance(message, list) and message[:1] in ([b"subscribe"], ["subscribe"]):
                break
        cache = self._cache()
        if cache is None:
            return
        self.links += 1
        if self._outage:
            self._outage = False
            logger.warning("API-key cache on again: invalidation link to Redis restored")
        cache.link_up(since)
        cache.alive(since, self.window)
        del cache
        pings: collections.deque = collections.deque()
        next_ping = time.monotonic()
        next_check = next_ping + self.recheck
        start = len(self.prefix)
        while not self._stop.is_set():
            if self._relink.is_set():
                self._relink.clear()
                raise _LinkLost("the keys' hash slot moved to another node")
            now = time.monotonic()
            if self.verify is not None and now >= next_check:
                if not self.verify(client, conn):
                    raise _LinkLost("Redis named another node for the keys (a failover or a resharding)")
                next_check = time.monotonic() + self.recheck
                now = time.monotonic()
            if now >= next_ping:
                conn.send_command("PING", check_health=False)
                pings.append(now)
                next_ping = now + self.interval
            if pings and now - pings[0] > self.dead_after:
                raise _LinkLost(f"no reply from Redis in {self.dead_after:g}s")
            if not conn.can_read(timeout=max(0.0, next_ping - now)):
                continue
            message = conn.read_response()
            cache = self._cache()
            if cache is None:
                return
            kind = message[0] if isinstance(message, list) and message else None
            if kind in (b"message", "message") and message[1] in (INVALIDATION_CHANNEL, INVALIDATION_CHANNEL.decode()):
                self.invalidations += 1
                names = message[2]
                if names is None:  # FLUSHDB / FLUSHALL
                    cache.invalidate_all()
                else:
                    for name in names:
                        if isinstance(name, str):
                            name = name.encode()
                        try:
                            cache.invalidate(bytes.fromhex(name[start:].decode("ascii")))
                        except ValueError:
                            cache.invalidate_all()  # a name we cannot map: be safe
            elif kind in (b"pong", "pong") and pings:
                cache.alive(pings.popleft(), self.window)
            del cache

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:  # pragma: no cover - closing a broken socket
                pass

    # -- control ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread and close its connection (idempotent). The cache is left
        untrusted: it answers nothing from memory any more."""
        self._stop.set()
        cache = self._cache()
        if cache is not None:
            cache.link_down()
        conn = self._conn
        if conn is not None:
            try:
                conn.disconnect()  # wakes the thread up from its read
            except Exception:  # pragma: no cover
                pass
        if self._thread is not threading.current_thread():
            self._thread.join(2)

    def relink(self) -> None:
        """The keys moved to another node (a ``MOVED`` reply for their slot): stop
        trusting the cache now and link to the node serving them, within one ping
        ``interval``, instead of waiting for the next ``verify``."""
        cache = self._cache()
        if cache is not None:
            cache.link_down()
        self._relink.set()

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread.is_alive()

    def __repr__(self) -> str:
        return f"KeyTracker({self.prefix!r}, links={self.links}, invalidations={self.invalidations})"


class _LinkLost(Exception):
    """The link answered wrongly or not at all."""
