"""The trio transport of the batching front: one Redis node's batches written and read
in the trio thread itself.

With one Redis node (``redis://``, ``unix://``), redis-py opens and authenticates the
connection (in a worker thread, once, and again after a failure: its handshake, its URL
options), then the batches are written and read on that socket, non-blocking, with the
RESP packer and reply parser of :mod:`asyncapy.adapters.resp`. No thread handoff per
batch and no wakeup of the event loop from another thread: with connection churn under
``session_limit`` that handoff, its context switches and redis-py's per-command Python
work were half of a connection's CPU time (``benchmarks/admission.py``).

The front (:class:`~asyncapy.adapters.redis_batching._RedisAdapter`) decides which
transport a store uses and queues the calls; this module only moves one batch at a time
and answers its calls by the shared rules of :mod:`asyncapy.adapters.redis_calls`.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import redis
import trio

from .redis_calls import _FAILURES, _answer, _Call, _fail, _report_posted, _wake
from .resp import INCOMPLETE, Replies, pack

if TYPE_CHECKING:
    from .redis_batching import _RedisAdapter


class _TrioLink:
    """The trio transport: one adapter's batches written and read in the trio thread.

    The same batches as the worker thread's
    (:class:`~asyncapy.adapters.redis_batching._RedisAdapter`), on one connection
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
                # One pass of the scheduler first: tasks woken by the same I/O (several
                # connections accepted at once) queue their calls too, and share this
                # batch's round trip instead of each paying for one.
                await trio.lowlevel.cancel_shielded_checkpoint()
                if not self.queue:  # all withdrawn while connecting
                    continue
                batch, self.queue = self.queue, []
                await self._exchange(batch)
                _report_posted(batch)
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
            _report_posted(batch)
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
