"""Redis stores: sessions and API keys shared by every server process.

This module holds what the stores mean in Redis: their keys, their Lua scripts, their
leases. How their calls travel is the batching front's job, and each part of the way
has its own module, named for it:

* :mod:`asyncapy.adapters.redis_urls`: the URLs a store accepts, checked before
  anything connects, and :func:`connect`, the redis-py client for each;
* :mod:`asyncapy.adapters.redis_batching`: the batching front both stores derive from
  (every call queued meanwhile, one round trip), and its worker-thread transport for
  Sentinel, Cluster and TLS;
* :mod:`asyncapy.adapters.redis_trio_link`: its transport in the trio thread for one
  Redis node, over the RESP codec of :mod:`asyncapy.adapters.resp`;
* :mod:`asyncapy.adapters.redis_calls`: one call in flight, and how replies and
  failures reach it, the same for both transports;
* :mod:`asyncapy.adapters.redis_cluster`: a Redis Cluster's nodes and slot map;
* :mod:`asyncapy.adapters.redis_tracking`: the invalidation link that keeps a key
  cache coherent (:meth:`RedisKeyStore.track`).

The names people import from here (the stores, :func:`connect`, :func:`check_url`,
:data:`URL_FORMS`, :class:`ClusterClient`...) keep working: this module re-exports
them.

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
from typing import Any, Optional

import redis
import trio

from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import KeyStore, SessionRecord, SessionStore

# The ``name as name`` imports are re-exports: what people import from this module
# since before the split.
from .redis_batching import _RedisAdapter
from .redis_calls import _Call, _offload
from .redis_cluster import ClusterClient as ClusterClient
from .redis_cluster import _still_serving
from .redis_urls import CLUSTER_PORT as CLUSTER_PORT
from .redis_urls import DB_MAX as DB_MAX
from .redis_urls import SCHEMES as SCHEMES
from .redis_urls import SENTINEL_PORT as SENTINEL_PORT
from .redis_urls import check_url as check_url
from .redis_urls import connect as connect
from .redis_urls import wait_replicas as wait_replicas
from .store_urls import URL_FORMS as URL_FORMS

__all__ = ["RedisSessionStore", "RedisKeyStore", "connect", "check_url", "URL_FORMS", "DEFAULT_PREFIX"]

logger: logging.Logger = logging.getLogger("asyncapy.redis")

DEFAULT_PREFIX = "asyncapy:"
"""Prefix of every Redis key the adapters write."""


def _where(client: Any) -> str:
    """``redis://host:port/db`` of a client (or its Sentinel or Cluster URL), without
    credentials, for logs."""
    location = getattr(client, "location", None) or getattr(client, "asyncapy_location", None)
    if isinstance(location, str):
        return location
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if "SSL" in client.connection_pool.connection_class.__name__ else "redis"
    return f"{scheme}://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"



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

# KEYS: zset, hash; ARGV: session id. One command (one reply) instead of MULTI/EXEC's four.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
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
        self.lease: float = float(lease)
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
        keys = self._keys(record.address)
        # A renewal in flight may carry this session in its snapshot: let it land
        # first, or it would put the session back. Releases never wait for each other
        # (they batch), and a renewal begun from now on no longer holds this session.
        while self._renewal is not None and _offload():
            await self._renewal.wait()
        # Posted, not awaited: nothing needs the reply (a release lost with Redis is
        # undone by the lease anyway), and it rides the next batch, usually an
        # admission's, instead of costing a round trip of its own.
        # EVAL, not EVALSHA: a NOSCRIPT would send it again after the calls behind it.
        self._post(_Call((("EVAL", _RELEASE, 2, *keys, record.session_id),), keys[0]))

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
        self.wait_timeout: float = float(wait_timeout)
        self._replace = self._script(_REPLACE)
        self._names = f"{prefix}{{key}}:" if self.cluster else f"{prefix}key:"
        self._tracked: Optional[tuple[Any, Any]] = None
        """With a Cluster: the cache and tracker of :meth:`track`, told of redirects."""

    def _redirected(self, call: Any, moved: bool) -> None:
        """A call for the keys' slot was redirected: after ``ASK`` (a migration) the
        answer comes from a node the tracker does not watch, so nothing fetched now is
        cached; after ``MOVED`` the keys have a new owner: the tracker links to it."""
        tracked = self._tracked
        if tracked is None:
            return
        cache, tracker = tracked
        if moved:
            tracker.relink()
        else:
            cache.discard_fetches()

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

            tracker = KeyTracker(locate, self._names, cache, verify=_still_serving(cluster.slot(tag)))
            self._tracked = (cache, tracker)
            return tracker
        if hasattr(self.redis, "asyncapy_location"):  # Sentinel: the master of now
            pool = self.redis.connection_pool
            return KeyTracker(
                self.redis, self._names, cache,
                verify=lambda client, link: tuple(pool.get_master_address()) == (link.host, link.port),
            )
        return KeyTracker(self.redis, self._names, cache)

    def __repr__(self) -> str:
        return f"RedisKeyStore({_where(self.redis)})"
