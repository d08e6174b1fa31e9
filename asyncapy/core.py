"""What handlers see: ``Client``, ``Packet``, ``Handler`` and ``Session``.

A handler is ``async def handler(client: Client, packet: Packet)``. It answers with
``await client.send(Packet({...}, encoding=client.encoding))``, may close the session
with ``await client.close()``, and may stop the packet from reaching later groups with
``packet.stop_propagation()``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import trio

from asyncapy.domain.codecs import CODECS_BY_NAME, Codec, codec_named
from asyncapy.domain.connection import Connection
from asyncapy.domain.dispatch import Handler
from asyncapy.domain.errors import StopPropagation

from . import _sockio
from .filters import normalise_address

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

__all__ = ["Client", "Packet", "Handler", "Session"]


HOLD_LIMIT = 64 * 1024
"""Most bytes of replies held back for one write while a pipelined batch is handled."""

WRITES_PER_YIELD = 16
"""On a plain TCP connection, a write the kernel takes at once does not yield to other
tasks (see :mod:`asyncapy._sockio`), and neither does a reply held or deferred for a
later write; every this-many-th such send in a row, on any of a server's sessions,
with no read in between, yields first: a handler that only ever sends (to its own
client, or to many others') cannot starve the rest."""


class Pacer:
    """How the direct writes of one server's channels are paced: the writes since a
    read, and the replies deferred to the next scheduling round.

    **The count** (:attr:`unyielded`) is shared, not per channel, because the task
    that writes is not always the session's own: a handler that broadcasts to a
    thousand other sessions makes one write on each, and must still yield every
    :data:`WRITES_PER_YIELD` writes. The server resets it after every read, which
    always yields (so the count only ever covers writes with no yield between them).

    **Deferred replies.** While a server is busy (the read that brought a request
    found it waiting, so other sessions are being served in the same round), a reply
    is not written at once: its channel is queued here, and the replies of the whole
    round are written together when the next round starts, by the first of these to
    run: the session whose reply it is, before it reads again; or this pacer's
    flusher task (:meth:`run`), which any deferral wakes, so that a reply is never
    later than that. Written one after the other, a round's replies reach their
    clients in a burst, and a client waiting on many connections is woken once
    rather than once per reply; on a machine where that wake-up is dear (a virtual
    one, where it is an inter-processor interrupt), it costs more than the reply. A
    reply the kernel cannot take whole is finished by a task of the flusher's, which
    holds its channel meanwhile, so later writes wait their turn. An idle server
    (the read had to wait) writes each reply at once, and so does a session's first
    read (a client that sends with its connect says nothing of the load): no latency
    is added where there is nothing to batch. Deferred sends count towards
    :data:`WRITES_PER_YIELD` as writes do.
    """

    __slots__ = ("unyielded", "deferred", "_task", "_parked", "_nursery")

    def __init__(self) -> None:
        self.unyielded = 0
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
    """The writing end of one connection: ordered, locked, closable once.

    Handlers never use it directly; :meth:`Client.send` and :meth:`Client.close` do.
    Writes from several tasks of one session are serialised, so packets never
    interleave on the wire. While :attr:`holding` is set (the server does so while the
    client has further pipelined requests waiting), replies are gathered and written
    together, in one system call, when the batch ends (or :data:`HOLD_LIMIT` is
    reached): the client is waiting for all of them anyway.

    On a plain TCP connection, writes are direct system calls (:mod:`asyncapy._sockio`)
    that yield only when the kernel has no room, and before every
    :data:`WRITES_PER_YIELD`-th write counted by ``pacer``. While :attr:`deferring` is
    set (by the server, when the server is busy), replies are gathered and written at
    the start of the next scheduling round, with every other session's (see
    :class:`Pacer`).
    """

    __slots__ = (
        "stream", "connection", "socket", "_busy", "_queue", "closed", "holding", "_pending",
        "interrupted", "pacer", "written", "deferring", "deferred", "fd",
    )

    def __init__(
        self, stream: trio.abc.Stream, connection: Connection, pacer: Optional[Pacer] = None
    ) -> None:
        self.stream = stream
        self.connection = connection
        self.socket = _sockio.raw_socket_of(stream)
        """The socket written and read directly, or None to use the stream's methods."""
        self.fd = None if self.socket is None else _sockio.fileno_source(self.socket)
        """What direct reads and writes ask for the descriptor (see
        :func:`asyncapy._sockio.fileno_source`), or None."""
        # Writes are serialised by hand: trio's locks register their owner task for
        # deadlock detection, which costs more than a small reply's write.
        self._busy = False
        self._queue = trio.lowlevel.ParkingLot()
        self.closed = False
        self.holding = False
        self._pending = bytearray()
        self.interrupted = False
        """True once a write did not complete (cancelled or failed midway)."""
        self.pacer = pacer if pacer is not None else Pacer()
        self.written = 0
        """Bytes of replies that waited for room, counted as the kernel takes them
        (direct writes only): how the server's reaper tells a client that reads a
        long reply slowly from one that stopped reading. Writes taken whole at once
        are not counted; they never wait."""
        self.deferring = False
        """Defer replies to the next scheduling round (direct writes only; set by the
        server's session loop while the server is busy, see :class:`Pacer`)."""
        self.deferred = False
        """True while this channel is queued in ``pacer`` for the next round."""

    async def send(self, data: bytes) -> None:
        """Write ``data`` whole (or hold or defer it, see above);
        ``trio.ClosedResourceError`` if the channel is closed, and
        ``trio.BrokenResourceError`` once a write on it failed or was cut short."""
        if self.closed:
            raise trio.ClosedResourceError("the session is closed")
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
                    # Queue this channel in the pacer and wake its flusher (inline:
                    # once a reply on a busy server).
                    self.deferred = True
                    pacer = self.pacer
                    pacer.deferred.append(self)
                    if pacer._parked:
                        pacer._parked = False
                        trio.lowlevel.reschedule(pacer._task)
                return
        if pending:
            pending += data
            data = bytes(pending)
            pending.clear()
        # The write itself, inline (a reply's path has no coroutine layer to spare).
        if self._busy:
            # Another write is under way: queue (FIFO). The writer before hands the
            # channel over on its way out, so ``_busy`` stays set for this one.
            await self._queue.park()
        else:
            self._busy = True
        try:
            if self.interrupted:  # checked once the turn came: the write before may be it
                raise trio.BrokenResourceError("an earlier write on this session was interrupted")
            if fd is None:
                await self.stream.send_all(data)
            else:
                sent = _sockio.write_now(fd, data)
                if sent < len(data):
                    self.written += sent
                    await _sockio.write_rest(fd, data, sent, self._wrote)
        except BaseException:
            # Part of ``data`` may be on the wire: the stream is out of step with the
            # framing, and nothing more may be written to it.
            self.interrupted = True
            raise
        finally:
            self._release()

    def _release(self) -> None:
        if self._queue:
            self._queue.unpark()
        else:
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
        try:
            sent = _sockio.write_now(self.fd, pending)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
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
            await _sockio.write_rest(self.fd, data, sent, self._wrote)
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

    async def aclose(self) -> None:
        """Write held and deferred replies, then close the stream (idempotent). Each
        step gets one second: a peer that stopped reading cannot hold the connection
        open."""
        self.connection.close()  # what it held of the server's packet memory
        if self.closed:
            return
        self.deferring = False
        if self.socket is not None and not self._pending:
            # Plain TCP with nothing held: closing the socket cannot block, and wakes
            # any task still waiting to write on it (ClosedResourceError). No timeout
            # scopes, no checkpoint: this is every session's last step.
            self.closed = True
            self.socket.close()
            return
        with trio.move_on_after(1) as flushing:
            try:
                await self.flush()
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


class Client:
    """The peer of a session, as a handler sees it.

    :param address: the client's IP address (the peer's, not the server's).
    :param server: the :class:`~asyncapy.server.Server` serving it.
    :param stream: the trio stream of the connection.
    :param session: the :class:`Session` (or its id, replaced by the server).
    :param encoding: the session's encoding, ``'json'`` or ``'ziproto'``.
    """

    __slots__ = ("address", "ip", "session", "encoding", "handler", "_server", "_stream", "_channel")

    def __init__(
        self,
        address: str,
        server: "Server",
        stream: trio.abc.Stream,
        session: Any,
        encoding: str,
    ) -> None:
        codec_named(encoding)
        self.address = address
        self.ip = normalise_address(address)
        """The address parsed by :mod:`ipaddress` (None if it is not an IP)."""
        self.session = session
        self.encoding = encoding
        self.handler: Optional[Handler] = None
        """The handler the dispatcher called last for this client (for logs)."""
        self._server = server
        self._stream = stream
        self._channel: Optional[Channel] = None

    def _writer(self) -> Channel:
        channel = self._channel
        if channel is None:
            channel = self._channel = self._server._new_channel(self._stream)
        return channel

    @property
    def closed(self) -> bool:
        """True once the session's connection is closed."""
        channel = self._channel
        return channel is not None and channel.closed

    async def send(self, packet: "Packet", close: bool = False) -> None:
        """Send ``packet`` to the client, in the packet's encoding.

        On a busy server the packet may be written a moment after this returns, with
        the other replies of the same scheduling round (see :class:`Pacer`): it is
        encoded and has its place on the connection, ahead of anything sent later.

        :param close: close the session right after the packet is written.
        :raises trio.ClosedResourceError: if the session is already closed.
        :raises trio.BrokenResourceError: if the client went away (or an earlier
            packet's deferred write found it gone).
        :raises asyncapy.domain.errors.CodecError: if the packet holds a value its encoding
            cannot represent (bytes in JSON, an integer beyond 64 bits in ZiProto).
        """
        channel = self._channel or self._writer()
        await channel.send(channel.connection.encode(packet._fields, packet._codec))
        if close:
            await self.close()

    async def close(self) -> None:
        """Close the session: the connection ends and no later group sees the packet."""
        await self._writer().aclose()

    async def get_sessions(self) -> list["Session"]:
        """The live sessions of this client's address (this one included)."""
        return await self._server._sessions_of(self.address)

    def __repr__(self) -> str:
        return f"Client({self.address})"


class Packet(Mapping):
    """A payload and its encoding; a read-only mapping of the payload's fields.

    ``"key" in packet``, ``packet["key"]``, ``packet.get("key")``, ``len(packet)`` and
    iteration work as on a dict; the packet itself cannot be changed.

    :param fields: a ``dict``, or a JSON object as ``str`` or UTF-8 ``bytes``.
    :param encoding: ``'json'`` or ``'ziproto'``: how the packet is written when sent.
    :param sender: the :class:`Client` that sent it (set by the server).
    :raises ValueError: on another encoding, malformed JSON, or JSON that is not an
        object.
    """

    __slots__ = ("_fields", "_codec", "sender")

    def __init__(
        self,
        fields: Union[dict, str, bytes],
        encoding: str,
        sender: Optional[Client] = None,
    ) -> None:
        if not isinstance(encoding, str) or encoding not in CODECS_BY_NAME:
            raise ValueError(f"encoding must be 'json' or 'ziproto', not {encoding!r}")
        if isinstance(fields, (str, bytes, bytearray)):
            try:
                fields = json.loads(fields)
            except ValueError as exc:
                raise ValueError(f"malformed JSON: {exc}") from None
            if not isinstance(fields, dict):
                raise ValueError(f"JSON must be an object, not {type(fields).__name__}")
        elif isinstance(fields, Mapping):
            fields = dict(fields)
        else:
            raise ValueError(f"fields must be a dict or a JSON object, not {type(fields).__name__}")
        self._fields = fields
        self._codec = CODECS_BY_NAME[encoding]
        self.sender = sender

    @classmethod
    def _received(cls, fields: dict, codec: Codec, sender: Client) -> "Packet":
        packet = cls.__new__(cls)
        packet._fields = fields
        packet._codec = codec
        packet.sender = sender
        return packet

    @property
    def encoding(self) -> str:
        """``'json'`` or ``'ziproto'``."""
        return self._codec.name

    @property
    def dict_payload(self) -> dict:
        """A copy of the fields as a plain ``dict`` (0.5 name)."""
        return dict(self._fields)

    @property
    def payload(self) -> str:
        """The fields as a JSON string (0.5 name)."""
        return json.dumps(self._fields)

    @property
    def length(self) -> int:
        """The length of :attr:`payload` (0.5 name)."""
        return len(self.payload)

    def stop_propagation(self) -> None:
        """Keep this packet from reaching later groups: raises ``StopPropagation``.

        A plain method, so both ``packet.stop_propagation()`` and the 0.5 spelling
        ``await packet.stop_propagation()`` work (the exception is raised before
        anything is awaited).
        """
        raise StopPropagation

    def __getitem__(self, key: Any) -> Any:
        return self._fields[key]

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of field ``key``, or ``default``."""
        return self._fields.get(key, default)

    def __repr__(self) -> str:
        return f"Packet({self._fields!r}, encoding={self.encoding!r})"


class Session:
    """One connection's session.

    :param session_id: the session's UUID4.
    :param client: the :class:`Client` of this session (``None`` for a session held
        by another server process sharing the store).
    :param date: UNIX timestamp of the session's creation.
    """

    __slots__ = ("session_id", "client", "date", "server_id")

    def __init__(
        self,
        session_id: uuid.UUID,
        client: Optional[Client],
        date: float,
        server_id: str = "",
    ) -> None:
        self.session_id = session_id
        self.client = client
        self.date = date
        self.server_id = server_id
        """The server process that owns the session."""

    async def close(self) -> None:
        """Close the session's connection (only for sessions of this process)."""
        if self.client is None:
            raise RuntimeError(
                f"session {self.session_id} belongs to server {self.server_id!r}; "
                "only its own process can close it"
            )
        await self.client.close()

    def get_client(self) -> Optional[Client]:
        """The session's :class:`Client` (``None`` if another process owns it)."""
        return self.client

    def __repr__(self) -> str:
        return f"Session({self.session_id})"

    def __str__(self) -> str:
        return str(self.session_id)

    def __hash__(self) -> int:
        return hash(self.session_id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Session):
            return self.session_id == other.session_id
        return NotImplemented
