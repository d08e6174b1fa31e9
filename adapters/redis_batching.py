"""The batching front of the Redis stores: every call queued meanwhile, one round trip.

redis-py's asynchronous client is built on asyncio and cannot run inside trio. The
stores use redis-py's *synchronous* client, and one batching front for both ways the
bytes travel (:class:`_RedisAdapter`, the base of both stores): a call made from a trio
task is queued; every call queued while the previous batch was out goes to Redis as one
pipeline, one write and one round trip, and a call still queued can be withdrawn (a
deadline such as the server's ``store_timeout``). The batch then travels by one of two
transports:

* **one Redis node** (``redis://``, ``unix://``): in the trio thread itself
  (:class:`~asyncapy.adapters.redis_trio_link._TrioLink`, which says why);
* **Sentinel, Cluster, TLS** (``redis+sentinel://``, ``redis+cluster://``, ``rediss://``
  and their ``rediss+`` forms) and connection classes of the user's: the store's one
  worker thread, here, with redis-py's own I/O, and one wakeup of the event loop per
  batch. There redis-py does more than move bytes (asking the sentinels where the
  master is on every new connection, the slot map of a Cluster, TLS; the redirections
  of a Cluster, ``MOVED``, ``ASK`` and ``TRYAGAIN``, are followed here), and those
  deployments have a network round trip between the processes and Redis that dwarfs
  the handoff.

Both transports give each call its replies or its error by the same rules
(:mod:`asyncapy.adapters.redis_calls`), and a batch sent is waited for, up to the
connection's socket timeout. Called outside any event loop (a script, the ``asyncapy
keys`` command) the same methods run the blocking call directly on a pooled
connection, so one adapter and one connection pool per process serve both the server
and synchronous code.

This module knows nothing of sessions or keys: the stores
(:mod:`asyncapy.adapters.redis`) build their commands and Lua scripts, and hand them
here as calls.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Optional, Sequence

import redis
import trio

from .redis_calls import _FAILURES, _answer, _Call, _fail, _lost, _offload, _report_posted, _wake
from .redis_cluster import ClusterClient
from .redis_trio_link import _TrioLink


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


REDIRECTS = 5
"""With a Cluster: how many times one batch's calls may be redirected (``MOVED``,
``ASK``) before they fail; a slot moves once per migration. (``TRYAGAIN`` is retried
for a time instead: :attr:`_RedisAdapter.retry_for`.)"""

TRYAGAIN_PAUSE = 0.02
"""Seconds between two tries of a call answered ``TRYAGAIN``."""


def _commands(calls: list[_Call], replies_only: bool = False) -> list[tuple]:
    """The commands of ``calls`` in order, ``ASKING`` before those sent after an ``ASK``
    (``replies_only``: the first command of each, as a script reloaded is sent again)."""
    commands: list[tuple] = []
    for call in calls:
        if call.asking:
            commands.append(("ASKING",))
        commands.extend(call.commands[:1] if replies_only else call.commands)
    return commands


def _asked(call: _Call, conn: Any) -> None:
    """Read the reply to the ``ASKING`` sent before ``call`` (``OK``)."""
    try:
        conn.read_response()
    except redis.ResponseError as exc:  # pragma: no cover - ASKING never fails on a cluster node
        call.error = call.error or exc


def pool_class_name(client: Any) -> str:
    """The name of ``client``'s connection class (``SSLConnection``...), or ``""``."""
    pool = getattr(client, "connection_pool", None)
    return getattr(getattr(pool, "connection_class", None), "__name__", "")


class _Script:
    """A Lua script known by its SHA-1 (``EVALSHA``; reloaded on ``NOSCRIPT``)."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _RedisAdapter:
    """Store calls in batches, off the event loop's back: the batching front.

    Every store call made from a trio task (admissions, releases, key lookups that
    missed the cache...) is queued; each time the connection is free, *every* call
    queued meanwhile is written to Redis as one pipeline, the replies read, and the
    waiting tasks woken. The busier the server, the bigger the batches: one round trip
    for many calls. Every call keeps its own reply, and its own error: a script refused
    by Redis fails that call only. Each call is one command Redis runs atomically (a
    Lua script, or a MULTI/EXEC block), so batching changes no call's meaning; calls
    are sent in the order they were made, and never retried unless Redis said it did
    not run it (a Cluster's ``MOVED``, ``ASK``, ``TRYAGAIN``). A call cancelled while
    still queued is withdrawn; one already sent is waited for (its effect in Redis
    cannot be undone).

    Two transports carry the batches (see this module's docstring): with one Redis node,
    :class:`_TrioLink`, in the trio thread (:attr:`native`); otherwise the adapter's one
    worker thread, which owns a connection and wakes the tasks with one wakeup of the
    event loop per batch.

    Synchronous callers (a script, ``asyncapy keys``) run their call directly on a
    pooled connection instead.

    With a Redis Cluster (a :class:`ClusterClient`), each call goes to the master
    serving its key's slot: the worker splits a batch by node and keeps one connection
    per node, so a batch is still one write per node, the round trips overlapping. A
    call answered ``MOVED``, ``ASK`` or ``TRYAGAIN`` was not run: it is sent again to
    the node named (:meth:`_dispatch`), so calls keep working while a slot migrates.
    A call nobody waits for (a release, :meth:`_post`) rides the next batch.
    """

    def __init__(self, client: Any, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self.cluster: bool = isinstance(client, ClusterClient)
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
        self._later: list[_Call] = []
        """Calls the worker will send again after a pause (``TRYAGAIN``)."""
        self._queued = threading.Condition(threading.Lock())
        self._worker: Optional[threading.Thread] = None
        self._closing = False
        self.batches = 0
        """Batches sent (round trips), for benchmarks."""
        self.calls = 0
        """Calls sent in them."""
        self.native: bool = _native(client)
        """Whether batches go through the trio transport (:class:`_TrioLink`: one Redis
        node, redis-py's plain TCP or Unix socket connection) rather than the
        worker thread."""
        self._link: Optional[_TrioLink] = None
        self.retry_for: float = 5.0
        """Seconds a Cluster call answered ``TRYAGAIN`` is tried again (a migration
        moving its keys); the server's default ``store_timeout``."""
        self.tls: bool = bool(client._kwargs.get("ssl")) if self.cluster else "SSL" in pool_class_name(client)
        """Whether the store speaks TLS (``rediss``): a failure to connect then says
        that the node may speak plain TCP."""

    def _unreachable(self, exc: BaseException) -> BaseException:
        """``exc``, a failure to connect, with a hint when the store speaks TLS: a node
        that speaks plain TCP answers no TLS handshake (a timeout or an SSL error)."""
        if not self.tls or isinstance(exc, redis.ResponseError):
            return exc
        hinted = redis.ConnectionError(f"{exc} (a TLS store: does each node speak TLS on its port?)")
        hinted.__cause__ = exc
        return hinted

    def _script(self, source: str) -> Any:
        script = _Script(source)
        self._scripts[script.sha] = source
        return script

    def _pool_for(self, call: _Call) -> Any:
        if self.cluster:
            return self.redis.pool(call.key)
        return self.redis.connection_pool

    def _dispatch(self, batch: list[_Call], conns: dict) -> list[_Call]:
        """Send ``batch``: each call on the connection (kept in ``conns``, by pool) of
        the node serving it. With a Cluster, a call redirected (``MOVED``, ``ASK``: see
        :meth:`_redirect`) is sent again at once, :data:`REDIRECTS` times at most; the
        calls answered ``TRYAGAIN`` (a multi-key call whose keys a migration has split)
        are returned, to be sent again :data:`TRYAGAIN_PAUSE` later, until
        :attr:`retry_for` seconds after their first ``TRYAGAIN`` (then they fail)."""
        redirects = 0
        later: list[_Call] = []
        while True:
            self._send_groups(batch, conns)
            if not self.cluster:
                return later
            if any(_lost(call) for call in batch):
                self.redis.stale()  # a node lost: maybe failed over
            again = []
            now = time.monotonic()
            for call in self._redirect(batch):
                if not isinstance(call.error, redis.exceptions.TryAgainError):
                    again.append(call)
                elif now < (call.retry_until or now + self.retry_for):
                    call.retry_until = call.retry_until or now + self.retry_for
                    call.error, call.replies = None, []
                    later.append(call)
                # else: the migration outlasted the retries: the call fails
            redirects += 1
            if not again or redirects > REDIRECTS:
                return later  # (past REDIRECTS: redirected round and round, they fail)
            for call in again:
                call.error, call.replies = None, []
            batch = again

    def _redirect(self, batch: list[_Call]) -> list[_Call]:
        """The calls of ``batch`` to send again: one answered ``MOVED`` (the slot map is
        updated; it goes to the new master), ``ASK`` (the slot is migrating and its
        keys are not here: it goes to the node named, after ``ASKING``, once) or
        ``TRYAGAIN`` (sent again shortly, to the slot's owner)."""
        again = []
        for call in batch:
            error = call.error
            if isinstance(error, redis.exceptions.MovedError):  # (a subclass of AskError)
                self.redis.moved(error)
                call.asking = None
                self._redirected(call, moved=True)
            elif isinstance(error, redis.exceptions.AskError):
                call.asking = (error.host, error.port)
                self._redirected(call, moved=False)
            elif isinstance(error, redis.exceptions.TryAgainError):
                pass  # same node again (after ASKING if it was asked: harmless once it owns the slot)
            else:
                continue
            again.append(call)
        return again

    def _redirected(self, call: _Call, moved: bool) -> None:
        """Told (in the sending thread) that ``call`` was redirected; the key store's
        cache uses it (see :class:`~asyncapy.adapters.redis.RedisKeyStore`)."""

    def _send_groups(self, batch: list[_Call], conns: dict) -> None:
        """Send ``batch`` once, each call on its node's connection, one write per node."""
        groups: dict[int, tuple[Any, list[_Call]]] = {}
        for call in batch:
            try:
                pool = self.redis.node_pool(*call.asking) if call.asking else self._pool_for(call)
            except _FAILURES as exc:
                call.error = self._unreachable(exc)
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
                        call.error = self._unreachable(exc)
                    continue
            self._send_on(held[1], calls)
            if any(_lost(call) for call in calls):
                # Back to the pool, and a fresh one for the next batch: the pool's
                # get_connection() connects where the pool says (with Sentinel, the
                # master the sentinels name now), a reused one where it was.
                del conns[key]
                pool.release(held[1])

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
                        if not self._later:
                            self._queued.wait()
                        elif not self._queued.wait(TRYAGAIN_PAUSE):
                            break  # the pause is over: send them again, alone if need be
                    # Those told TRYAGAIN (self._later) go first, as they were made first.
                    batch, self._later, self._queue = self._later + self._queue, [], []
                if not batch:
                    return  # closing, and nothing left to send
                later = self._dispatch(batch, conns)
                with self._queued:
                    self._later = later  # withdrawn if cancelled meanwhile (_run_calls)
                _report_posted(batch)
                waiting = set(map(id, later))
                by_run: dict = {}
                for call in batch:
                    if call.token is not None and id(call) not in waiting:  # None: posted (_post)
                        by_run.setdefault(call.token, []).append(call)
                for token, calls in by_run.items():
                    try:
                        token.run_sync_soon(_wake, calls)
                    except trio.RunFinishedError:  # pragma: no cover - the run ended first
                        pass
        finally:
            self._release(conns)

    def _send_on(self, conn: Any, batch: list[_Call]) -> None:
        """Run ``batch`` on ``conn``: one write, then every reply. A call sent after an
        ``ASK`` has ``ASKING`` just before it, in the same write."""
        self.batches += 1
        self.calls += len(batch)
        try:
            conn.send_packed_command(conn.pack_commands(_commands(batch)))
            reload: list[_Call] = []
            for call in batch:
                if call.asking:
                    _asked(call, conn)
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
                    if call.asking:
                        _asked(call, conn)
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
        commands += _commands(calls, replies_only=True)
        return shas, commands

    def _send(self, batch: list[_Call]) -> None:
        """Run ``batch`` in this thread, on pooled connections (synchronous callers)."""
        conns: dict = {}
        try:
            while batch:
                batch = self._dispatch(batch, conns)
                if batch:  # told TRYAGAIN: a slot is migrating
                    time.sleep(TRYAGAIN_PAUSE)
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
                held = (queue, self._later)  # the second: told TRYAGAIN, not run, waiting to go again
                if not all(any(call in place for place in held) for call in calls):
                    return trio.lowlevel.Abort.FAILED
                for call in calls:
                    for place in held:
                        if call in place:
                            place.remove(call)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _post(self, call: _Call) -> None:
        """Send ``call`` in the next batch without waiting for its reply (nothing needs
        it: a release, whose lease expires anyway if it is lost). From a trio task it
        only queues the call, which rides the next batch; it still goes before any
        call made after it, so this process's own next call sees its effect."""
        call.posted = True
        if not _offload():
            self._send([call])
            _report_posted([call])
            return
        token = trio.lowlevel.current_trio_token()
        link = self._trio_link(token) if self.native else None
        if link is not None:
            link.submit([call])
            return
        with self._queued:
            self._queue.append(call)
            if self._worker is None:
                self._start_worker()
            self._queued.notify()

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
