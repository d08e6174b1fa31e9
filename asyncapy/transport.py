"""The transport: how bytes move between a connection and the server, and how it ends.

Everything here is about one connection's stream, never about what the bytes mean (that
is :mod:`asyncapy.domain.connection`'s) nor about sessions (:mod:`asyncapy.sessions`):

* **Direct reads and writes** on a plain TCP connection, as single system calls
  (:func:`read_now`, :func:`receive_waiting`, :func:`write_now`, :func:`write_rest`);
* :class:`Channel`, the writing end of one connection (ordered, held and deferred
  replies), and :class:`Pacer`, how one server's channels share the event loop;
* the **lingering close** (:func:`linger_close`), the one way a connection is closed
  after a last reply the client may still be sending into, whatever the stream; and
  :class:`Refusals`, which bounds how many refused connections linger at once;
* **socket helpers**: the peer's address, the TCP stream under a TLS one.

Why direct reads and writes: ``trio.SocketStream`` is correct and general, and on a
small-packet server its cost per call shows: ``receive_some`` first tries ``recv``
(which, on a connection whose client waits for each reply, fails with ``EAGAIN`` and
raises), then waits for readability, then calls ``recv`` again; ``send_all`` writes and
then always yields to the scheduler, even when the kernel took every byte at once. Per
request that is two scheduling rounds, one failed system call and one exception, which
for a 50-byte request cost more than decoding and dispatching it.

Here, for a plain ``trio.SocketStream`` on a POSIX system (TLS streams and in-memory
test streams keep the stream methods):

* a read is the session loop's checkpoint (one scheduling round per read, as trio's
  own), then :func:`read_now`; only if nothing has arrived does it wait
  (:func:`receive_waiting`). Under load the next request is usually there by then,
  and the wait (an epoll registration, a wake-up) is skipped.
* a write is :func:`write_now`; only when the kernel cannot take everything does it
  wait for writability and go on (:func:`write_rest`). A write that completes does not
  yield: fairness is :class:`Channel`'s rule (it yields before every
  :data:`WRITES_PER_YIELD`-th such write in a row with no read between, counted across
  a server's sessions by :class:`Pacer`).

Both look the descriptor up on the socket right before each system call, with no
``await`` in between: once trio closes the socket, ``fileno()`` is -1, so a descriptor
number the kernel has since given to another connection is never touched. A socket
closed while a task waits on it wakes that task (trio's ``notify_closing``) with
``ClosedResourceError``. ``OSError`` becomes what ``SocketStream`` raises:
``ClosedResourceError`` for a closed socket, ``BrokenResourceError`` for the rest.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, Optional

import trio
from trio.lowlevel import wait_readable, wait_writable

from asyncapy.domain.addresses import canonical_address

from .metrics import SessionMeter

__all__ = [
    "HOLD_LIMIT", "WRITES_PER_YIELD", "LINGER_SECONDS", "MAX_LINGERING", "STREAM_ERRORS",
    "raw_socket_of", "fileno_source", "read_now", "receive_waiting", "write_now", "write_rest",
    "Pacer", "Channel", "linger_close", "Refusals", "close_at_once", "transport_of",
    "peer_address",
]

HOLD_LIMIT = 64 * 1024
"""Most bytes of replies held back for one write while a pipelined batch is handled."""

WRITES_PER_YIELD = 16
"""On a plain TCP connection, a write the kernel takes at once does not yield to other
tasks (see this module's docstring), and neither does a reply held or deferred for a
later write; every this-many-th such send in a row, on any of a server's sessions,
with no read in between, yields first: a handler that only ever sends (to its own
client, or to many others') cannot starve the rest."""


LINGER_SECONDS = 2.0
"""How long a connection closed lingering (:func:`linger_close`) is drained after its
last reply, at most."""

MAX_LINGERING = 256
"""Refused connections (past ``session_limit`` or ``max_connections``, or with the store
unavailable) closing lingering at once, at most (see :class:`Refusals`). They hold no
``max_connections`` slot, so a flood of them from one address cannot lock other
addresses out; this bounds the descriptors they hold instead. Past it, a refused
connection gets its reply and is closed at once (a client still sending may then see a
reset instead of the reply)."""

STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
"""What a read or write raises when the connection is gone (or closed under it)."""

_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})

_UNMETERED = SessionMeter()
"""The meter of a channel nobody meters (never read)."""


# -- direct reads and writes ---------------------------------------------------------

def raw_socket_of(stream: trio.abc.Stream) -> Optional[trio.socket.SocketType]:
    """The trio socket of ``stream`` if it is a plain ``trio.SocketStream`` on POSIX
    (where ``os.read``/``os.write`` work on sockets), else None: use the stream."""
    if os.name != "posix" or type(stream) is not trio.SocketStream:
        return None
    return stream.socket


def fileno_source(sock: trio.socket.SocketType) -> Any:
    """What to ask for ``sock``'s descriptor before each system call: the standard
    library socket inside trio's (its ``fileno()`` is what trio's forwards to, one
    Python-level call less per system call, and it reads -1 just the same once trio
    has closed the socket), or ``sock`` itself if it has none. Every function here
    takes either."""
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, socket.socket) else sock


def _stream_error(exc: OSError) -> Exception:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def read_now(sock: trio.socket.SocketType, max_bytes: int) -> Optional[bytes]:
    """Read at most ``max_bytes`` if any have arrived (``b""`` at end of stream), or
    return None at once if none have. Never yields."""
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc


async def receive_waiting(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Wait until ``sock`` is readable, then read at most ``max_bytes`` (``b""`` at
    end of stream); for after :func:`read_now` found nothing."""
    while True:
        await wait_readable(sock)
        data = read_now(sock, max_bytes)
        if data is not None:
            return data


def write_now(sock: trio.socket.SocketType, data: bytes) -> int:
    """Write what the kernel takes of ``data`` without waiting; return how many bytes
    that was (0 when it has no room). Never yields."""
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _stream_error(exc) from exc


async def write_rest(
    sock: trio.socket.SocketType,
    data: bytes,
    sent: int,
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Write ``data[sent:]``, waiting for room as often as needed; ``progress(n)`` is
    called after each write the kernel took ``n`` bytes of."""
    remaining = memoryview(data)[sent:]
    while remaining:
        await wait_writable(sock)
        written = write_now(sock, remaining)
        remaining = remaining[written:]
        if progress is not None and written:
            progress(written)



# -- the writing end of a connection ------------------------------------------------
class Pacer:
    """How the direct writes of one server's channels share the event loop: the count
    of writes since a read, and the replies deferred to the next scheduling round.

    **The count** (:attr:`unyielded`) is per server, not per channel: a handler that
    broadcasts to a thousand sessions writes once on each, and must still yield every
    :data:`WRITES_PER_YIELD` writes. Every read yields, so the session resets it then.

    **Deferred replies.** While the server is busy (a read found the next request
    already there), a reply is queued here rather than written, and the whole round's
    replies are written together when the next round starts: by the session whose
    reply it is, before it reads again, or by this pacer's flusher task (:meth:`run`),
    which any deferral wakes, so no reply waits longer than that. A client waiting on
    many connections is then woken once per round rather than once per reply, which on
    a virtual machine costs more than the reply. A reply the kernel cannot take whole
    is finished by a flusher task holding its channel, so later writes wait their turn.
    An idle server, and a session's first read, write at once: nothing to batch.
    """

    __slots__ = ("unyielded", "deferred", "_task", "_parked", "_nursery")

    def __init__(self) -> None:
        self.unyielded: int = 0
        self.deferred: list["Channel"] = []
        """Channels whose replies wait for the next round, in the order deferred."""
        self._task: Optional[trio.lowlevel.Task] = None
        self._parked = False
        self._nursery: Optional[trio.Nursery] = None

    def flush(self) -> None:
        """Write every deferred reply now, without waiting (never yields)."""
        deferred = self.deferred
        if deferred:
            self.deferred = []
            for channel in deferred:
                channel.deferred = False
                channel._write_deferred()

    def defer(self, channel: "Channel") -> None:
        """Queue ``channel``'s replies for the next round and wake the flusher (inline:
        this runs once per reply on a busy server)."""
        self.deferred.append(channel)
        if self._parked:
            self._parked = False
            trio.lowlevel.reschedule(self._task)

    def lend(self, nursery: Optional[trio.Nursery]) -> None:
        """Finish partly written replies in tasks of ``nursery`` (None: no more): for a
        pacer with no flusher task, whose owner flushes it itself (the reactor's, at
        the end of each pass: see :mod:`asyncapy.reactor`)."""
        self._nursery = nursery

    def spawn(self, function: Callable, *args: Any) -> bool:
        """Run ``function(*args)`` in the flusher's nursery; False when it is not running."""
        nursery = self._nursery
        if nursery is None:
            return False
        try:
            nursery.start_soon(function, *args)
        except RuntimeError:  # the nursery is closing
            return False
        return True

    async def run(self) -> None:
        """The flusher: writes deferred replies each time one is queued, and finishes
        the ones the kernel could not take whole. Runs until cancelled (the server
        runs it beside its sessions); without it, replies are still written by their
        sessions, but a handler that replies and then waits would delay its reply.
        A second call while one runs (a test client beside a serving server) has
        nothing to do: it waits to be cancelled."""
        if self._task is not None:
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._task = trio.lowlevel.current_task()
            try:
                while True:
                    self.flush()
                    self._parked = True
                    await trio.lowlevel.wait_task_rescheduled(self._abort)
            finally:
                self._parked = False
                self._task = None
                self._nursery = None
                self.flush()  # what was deferred up to here is not left behind

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._parked = False
        return trio.lowlevel.Abort.SUCCEEDED


class Channel:
    """The writing end of one connection: ordered, held or deferred, closable once.

    Handlers never use it directly; :meth:`Client.send <asyncapy.core.Client.send>`
    and :meth:`Client.close <asyncapy.core.Client.close>` do. Writes from several
    tasks of one session are serialised, so packets never interleave on the wire. On
    a plain TCP connection writes are direct system calls (see this module's
    docstring) that yield only when the kernel has no room, and before every
    :data:`WRITES_PER_YIELD`-th write counted by ``pacer``.

    The channel owns its state; the session sets it only through methods:

    :attr:`holding` (:meth:`hold`)
        More pipelined packets are buffered: replies are gathered and written in one
        system call when the batch ends (:meth:`flush`) or :data:`HOLD_LIMIT` is reached.
    :attr:`deferring` (:meth:`defer`)
        The server is busy: replies wait for the next scheduling round, written with
        every other session's (:class:`Pacer`). Direct writes only.
    :attr:`deferred`
        This channel is queued in the pacer for the next round.
    :attr:`writing`
        A write is under way (or queued behind one). The idle reaper reads it (a write
        that never ends), and so do the closing paths: no reply can follow it.
    :attr:`interrupted`
        A write failed or was cut short: the stream is out of step with the framing,
        and nothing more may be written.
    :attr:`closed`
        No more writes: set by :meth:`aclose`, :meth:`close_with` and :meth:`abort`.

    They are plain attributes, never properties or events: the session reads them
    once per packet or per read.
    """

    __slots__ = (
        "stream", "socket", "_busy", "_queue", "closed", "holding", "_pending",
        "interrupted", "pacer", "written", "deferring", "deferred", "fd", "meter", "on_close", "_queued",
    )

    def __init__(self, stream: trio.abc.Stream, pacer: Optional[Pacer] = None) -> None:
        self.stream = stream
        self.socket = raw_socket_of(stream)
        """The socket written and read directly, or None to use the stream's methods."""
        self.fd: Any | None = None if self.socket is None else fileno_source(self.socket)
        """What direct reads and writes ask for the descriptor (see
        :func:`fileno_source`), or None."""
        # Writes are serialised by hand: trio's locks register their owner task for
        # deadlock detection, which costs more than a small reply's write.
        self._busy = False
        self._queue = trio.lowlevel.ParkingLot()
        self._queued = 0
        """Writes parked in :attr:`_queue` (a plain count: asking the parking lot is a
        Python-level call per write)."""
        self.closed = False
        self.holding = False
        self._pending = bytearray()
        self.interrupted = False
        self.pacer: Pacer = pacer if pacer is not None else Pacer()
        self.written = 0
        """Bytes of replies that waited for room, counted as the kernel takes them
        (direct writes only): how the reaper tells a client that reads a long reply
        slowly from one that stopped reading."""
        self.deferring = False
        self.deferred = False
        self.meter: SessionMeter = _UNMETERED
        """The session's :class:`~asyncapy.metrics.SessionMeter`: every send adds its
        bytes to ``sent`` (a shared, unread one until the session sets its own)."""
        self.on_close: Optional[Callable[[], None]] = None
        """Called once as the channel starts to close, before its socket is: the
        reactor's, to take the socket out of its epoll set (see
        :mod:`asyncapy.reactor`); None for a session served by its own task."""

    def hold(self, more: bool = True) -> None:
        """Gather replies while ``more`` pipelined packets are buffered (cleared by
        :meth:`flush`)."""
        self.holding = more

    def defer(self, busy: bool) -> None:
        """Defer replies to the next scheduling round while the server is ``busy``."""
        self.deferring = busy

    async def send(self, data: bytes) -> None:
        """Write ``data`` whole (or hold or defer it, see above);
        ``trio.ClosedResourceError`` if the channel is closed, and
        ``trio.BrokenResourceError`` once a write on it failed or was cut short."""
        if self.closed:
            raise trio.ClosedResourceError("the session is closed")
        self.meter.sent += len(data)
        fd = self.fd
        if fd is not None:
            # Fairness: every WRITES_PER_YIELD-th send with no read between yields,
            # whether it writes now or is gathered (a handler that only sends must not
            # starve the others while its replies are held or deferred, either).
            pacer = self.pacer
            if pacer.unyielded >= WRITES_PER_YIELD - 1:
                # Before the write, not after: if this checkpoint is where a cancel
                # lands, nothing of ``data`` is on the wire and the session stays usable.
                pacer.unyielded = 0
                await trio.lowlevel.checkpoint()
                if self.closed:
                    raise trio.ClosedResourceError("the session is closed")
            else:
                pacer.unyielded += 1
        pending = self._pending
        # Gather: held for a pipelined batch, or deferred to the next round. Never
        # deferred behind a write under way (a flush skips a busy channel): that
        # send queues behind it instead.
        defer = self.deferring and not self._busy
        if self.holding or defer:
            if len(pending) + len(data) < HOLD_LIMIT:
                if self.interrupted:
                    raise trio.BrokenResourceError("an earlier write on this session was interrupted")
                pending += data
                if defer and not self.deferred:
                    self.deferred = True
                    self.pacer.defer(self)
                return
        if pending:
            pending += data
            data = bytes(pending)
            pending.clear()
        # The write itself, inline (a reply's path has no coroutine layer to spare).
        if self._busy:
            # Another write is under way: queue (FIFO). The writer before hands the
            # channel over on its way out, so ``_busy`` stays set for this one.
            self._queued += 1
            try:
                await self._queue.park()
            finally:  # handed the channel, or cancelled while waiting (then it never had it)
                self._queued -= 1
        else:
            self._busy = True
        try:
            if self.interrupted:  # checked once the turn came: the write before may be it
                raise trio.BrokenResourceError("an earlier write on this session was interrupted")
            if fd is None:
                await self.stream.send_all(data)
            else:
                sent = write_now(fd, data)
                if sent < len(data):
                    self.written += sent
                    await write_rest(fd, data, sent, self._wrote)
        except BaseException:
            # Part of ``data`` may be on the wire: the stream is out of step with the
            # framing, and nothing more may be written to it.
            self.interrupted = True
            raise
        finally:
            if self._queued:
                self._release()
            else:
                self._busy = False

    def _release(self) -> None:
        """Hand the channel to the next write parked for it, or free it (a parked one may
        have been cancelled since: the lot then wakes nobody)."""
        if not (self._queued and self._queue.unpark()):
            self._busy = False

    def _wrote(self, count: int) -> None:
        self.written += count

    def _write_deferred(self) -> None:
        """Write the deferred replies now (:meth:`Pacer.flush`); never yields. What
        the kernel does not take at once is finished by a task of the pacer's, which
        holds the channel meanwhile."""
        pending = self._pending
        if self.closed or not pending or self._busy or self.interrupted:
            # Closed: aclose() wrote them. Busy: only replies held for a pipelined
            # batch gather behind a write, and the session's flush at the batch's
            # end queues them behind it. Interrupted: nothing more may be written,
            # and the session's next send says so.
            return
        number = self.fd.fileno()  # write_now(), inline: one per deferred reply of a round
        try:
            sent = os.write(number, pending) if number >= 0 else -1
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = -1
        if sent < 0:  # closed, or the connection broke
            pending.clear()
            self.interrupted = True  # the session's next read or send finds out
            return
        if sent == len(pending):
            pending.clear()
        else:
            data = bytes(pending)
            pending.clear()
            self.written += sent
            self._busy = True
            if not self.pacer.spawn(self._finish_deferred, data, sent):
                # No flusher (the server is stopping): keep the rest for whoever
                # writes next, aclose() at the latest.
                self._busy = False
                pending[:0] = memoryview(data)[sent:]

    async def _finish_deferred(self, data: bytes, sent: int) -> None:
        try:
            await write_rest(self.fd, data, sent, self._wrote)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.interrupted = True
        except BaseException:
            self.interrupted = True
            raise
        finally:
            self._release()

    async def flush(self) -> None:
        """Write the held replies, if any (none once the channel is closed); while
        deferring, defer them instead."""
        self.holding = False
        if self._pending and not self.closed:
            await self.send(b"")

    @property
    def writing(self) -> bool:
        """True while a write is in progress (or waiting for another one): what the
        server's idle reaper looks at to find sessions whose client stopped reading."""
        return self._busy

    def take_pending(self) -> bytes:
        """Remove and return the held replies (to send them another way)."""
        data = bytes(self._pending)
        self._pending.clear()
        self.holding = False
        return data

    async def close_with(self, reply: bytes) -> bool:
        """Write the held replies and ``reply`` (a last error reply), then close
        lingering (:func:`linger_close`): the client may still be sending, and a plain
        close would turn into a reset that destroys the reply. False, and the stream
        closed at once, when no reply can follow what is on the wire: a write under
        way (a deferred reply's), or one cut short."""
        self._closing()
        if self._busy or self.interrupted:
            await self.abort()
            return False
        self.meter.sent += len(reply)  # the held replies were counted when sent
        data = self.take_pending() + reply
        self.closed = True
        await linger_close(self.stream, data)
        return True

    def _closing(self) -> None:
        on_close = self.on_close
        if on_close is not None:
            self.on_close = None
            on_close()

    async def abort(self) -> None:
        """Close now, with no reply: nothing more can be written in step."""
        self._closing()
        self.closed = True
        await trio.aclose_forcefully(self.stream)

    async def aclose(self) -> None:
        """Write held and deferred replies (after a write under way, if any), then close
        the stream (idempotent). Each step gets one second: a peer that stopped reading
        cannot hold the connection open."""
        if self.closed:
            return
        self._closing()
        self.deferring = False
        if self.socket is not None and not self._pending and not self._busy:
            # Plain TCP with nothing held or being written: closing the socket cannot
            # block. No timeout scopes, no checkpoint: this is every session's last step.
            self.closed = True
            self.socket.close()
            return
        with trio.move_on_after(1) as flushing:
            try:
                self.holding = False
                if not self.interrupted:
                    # Behind a write under way (the rest of a deferred reply the kernel
                    # could not take at once: its client may still be reading), then
                    # what is held. Closing under it would cut that reply short.
                    await self.send(b"")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self.closed = True
        if not flushing.cancelled_caught:
            with trio.move_on_after(1) as closing:
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            if not closing.cancelled_caught:
                return
        await trio.aclose_forcefully(self.stream)


# -- closing -------------------------------------------------------------------------
async def linger_close(stream: trio.abc.Stream, data: bytes) -> None:
    """Send ``data`` (a last reply), shut the write side, drain what the client still
    sends (for at most :data:`LINGER_SECONDS`), then close.

    The one way a connection is closed while its client may still be sending: a
    refusal, a framing error, a timeout with a packet trickling in. Closed at once
    with unread bytes in its receive buffer, a TCP connection ends in a reset, which
    can destroy the reply before the client reads it. Every network stream lingers,
    plain TCP (half-closed first) and TLS alike; a stream with no network under it
    (the in-memory one of :mod:`asyncapy.testing`) cannot be reset, and is closed
    once ``data`` is sent."""
    with trio.move_on_after(LINGER_SECONDS):
        try:
            if data:
                await stream.send_all(data)
            if _over_network(stream):
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                while await stream.receive_some(65536):
                    pass
        except STREAM_ERRORS:
            pass
    await trio.aclose_forcefully(stream)


def _over_network(stream: trio.abc.Stream) -> bool:
    """True if ``stream`` is, or wraps, a socket's stream."""
    while not hasattr(stream, "socket"):
        stream = getattr(stream, "transport_stream", None)
        if stream is None:
            return False
    return True


class Refusals:
    """The lingering closes of one server's refused connections, at most
    :data:`MAX_LINGERING` at once.

    Refused connections hold no ``max_connections`` slot, so this is what bounds the
    descriptors a flood of them holds: past the bound, a refused connection gets its
    reply (within :data:`LINGER_SECONDS`) and its caller closes it at once."""

    __slots__ = ("lingering",)

    def __init__(self) -> None:
        self.lingering = 0
        """Refused connections closing lingering now."""

    async def close(self, stream: trio.abc.Stream, data: bytes) -> None:
        """Send ``data`` to a refused connection and close it lingering, or, past the
        bound, only send it (the caller closes the stream)."""
        if self.lingering >= MAX_LINGERING:
            with trio.move_on_after(LINGER_SECONDS):
                try:
                    if data:
                        await stream.send_all(data)
                except STREAM_ERRORS:
                    pass
            return
        self.lingering += 1
        try:
            await linger_close(stream, data)
        finally:
            self.lingering -= 1


async def close_at_once(stream: trio.abc.Stream) -> None:
    """Close ``stream`` now, however its connection ended: a plain TCP socket is closed
    in place (idempotent and immediate: no checkpoint, no scheduling round), any other
    stream forcefully."""
    sock = raw_socket_of(stream)
    if sock is not None:
        sock.close()
    else:
        await trio.aclose_forcefully(stream)


# -- socket helpers ------------------------------------------------------------------
def transport_of(stream: trio.abc.Stream) -> trio.SocketStream:
    """The TCP stream under ``stream`` (itself, or what an SSLStream wraps)."""
    while not hasattr(stream, "socket"):
        stream = stream.transport_stream  # SSLStream
    return stream


def peer_address(stream: trio.abc.Stream) -> str:
    """The address of the peer of ``stream``'s TCP connection, canonical (see
    :func:`asyncapy.domain.addresses.canonical_address`); ``OSError`` if the client
    is gone already."""
    return canonical_address(transport_of(stream).socket.getpeername()[0])
