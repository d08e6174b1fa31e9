"""One admitted session as one object: bytes in; dispatch; replies and closes out.

:class:`SessionProtocol` owns what a session is made of (the handler's
:class:`~asyncapy.core.Client`, the :class:`~asyncapy.transport.Channel` it writes
through, the :class:`~asyncapy.domain.connection.Connection` that frames and decodes,
the :class:`~asyncapy.session_state.SessionState` the reaper watches) and the policy
around the pure core: a request is dispatched (within ``handler_timeout``), a
protocol error answered (and the session closed when framing is lost or errors
repeat), and every close that carries a last reply takes one path,
:meth:`SessionProtocol.close_with`.

It is split the way hypercorn's ``TCPServer`` and h11's ``Connection`` are: the
methods that take bytes and events (:meth:`~SessionProtocol.receive_data`,
:meth:`~SessionProtocol.handle_request`, :meth:`~SessionProtocol.handle_protocol_error`)
know nothing of how bytes arrive, and :meth:`~SessionProtocol.run` is one driver of
them, a trio task reading its own connection. Another driver (a reactor serving many
connections from one task) can feed the same object.

Admission, the registry of live sessions and the release are
:class:`asyncapy.sessions.Sessions`'.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Union

import trio

from asyncapy.domain.connection import NEED_DATA, Connection, ProtocolError, Request
from asyncapy.domain.dispatch import HandlerFailed
from asyncapy.domain.errors import ERR_INTERNAL, ERR_TIMED_OUT
from asyncapy.domain.ratelimit import rate_limited_payload

from .core import Client, Packet
from .limits import Limits
from .metrics import Recorder, SessionMeter
from .session_state import STUCK, SessionLogs, SessionState, SharedLogs
from .transport import STREAM_ERRORS, Channel, read_now, receive_waiting

if TYPE_CHECKING:  # pragma: no cover
    from .reactor import Reactor

__all__ = ["SessionProtocol"]

logger: logging.Logger = logging.getLogger("asyncapy.server")

Dispatch = Callable[[Client, Packet], Awaitable[int]]
"""A dispatcher's ``dispatch``: runs a packet through the handlers, returns how many ran."""


class SessionProtocol:
    """One admitted session: its parts, the handling of each event, its closes.

    :param client: what handlers see of the session (its ``session`` set).
    :param channel: the connection's writing end.
    :param connection: the session's protocol state (framing, codecs).
    :param state: what the reaper and the shutdown share with the session.
    :param settings: the server's :class:`~asyncapy.config.Settings`.
    :param dispatch: the dispatcher's ``dispatch`` (metered or not).
    :param recorder: where metrics go.
    :param stopping: set when the server shuts down.
    :param shared: the log limits all sessions share.
    :param limits: the server's rate limits (None: none).
    :param group: the client's address group (as ``session_limit`` counts it), which
        the per-address rate limit charges.
    :param reactor: the :class:`~asyncapy.reactor.Reactor` that serves the session
        (its socket is plain TCP), or None: :meth:`run` serves it in its own task.
    """

    __slots__ = (
        "client", "channel", "connection", "state", "settings", "dispatch", "recorder",
        "meter", "stopping", "shared", "session_id", "errors", "logs", "buf", "limits", "group",
        "_debug", "reactor", "reactor_fd", "reactor_task", "reactor_context", "reactor_registered",
        "reactor_active", "reactor_queued", "reactor_ended", "reactor_hangup", "reactor_suspended",
        "reactor_pacer",
    )

    def __init__(
        self,
        client: Client,
        channel: Channel,
        connection: Connection,
        state: SessionState,
        *,
        settings: Any,
        dispatch: Dispatch,
        recorder: Recorder,
        stopping: trio.Event,
        shared: Optional[SharedLogs] = None,
        limits: Optional[Limits] = None,
        group: str = "",
        reactor: Optional["Reactor"] = None,
    ) -> None:
        self.client: Client = client
        self.channel: Channel = channel
        self.connection: Connection = connection
        self.state: SessionState = state
        self.settings: Any = settings
        self.dispatch: Dispatch = dispatch
        """The dispatcher's ``dispatch``, under ``handler_timeout`` when there is one
        (chosen once: without a deadline, a packet costs no cancel scope)."""
        if settings.handler_timeout is not None:
            self.dispatch = functools.partial(self.dispatch_within_deadline, dispatch)
        self.recorder: Recorder = recorder
        self.meter: SessionMeter = channel.meter
        self.stopping = stopping
        self.shared: SharedLogs = shared if shared is not None else SharedLogs()
        self.limits: Limits | None = limits if limits is not None and limits.rate is not None else None
        """The server's limits when a per-address ``rate_limit`` is set (else None: a
        packet then costs no check)."""
        self.group: str = group
        self.session_id: Any = client.session.session_id
        self.errors = 0
        """Protocol errors in a row (reset by every request): ``max_protocol_errors``."""
        self.logs: Optional[SessionLogs] = None
        """The session's log limits, made on its first error."""
        self.buf: Any = settings.buf
        """Bytes asked of the connection per read."""
        self._debug = logger.isEnabledFor(logging.DEBUG)
        self.reactor: Optional["Reactor"] = reactor
        # What the reactor keeps of the session (see asyncapy.reactor): its descriptor,
        # the session's task (waiting for the end), the context handlers run in, and
        # whether the session is in the epoll set, being served, has packets left for
        # the next pass, has ended, or has a client that closed its side; its turns in
        # a row that suspended, and the pacer its channel had before it joined.
        self.reactor_fd = -1
        self.reactor_task: Optional[trio.lowlevel.Task] = None
        self.reactor_context: Any = None
        self.reactor_registered = False
        self.reactor_active = False
        self.reactor_queued = False
        self.reactor_ended = False
        self.reactor_hangup = False
        self.reactor_suspended = 0
        self.reactor_pacer: Any = None

    # -- bytes and events in -----------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the connection (never ``b""``: end of stream is the
        driver's to notice). A driver that then finds only part of a large packet
        (``connection.receiving_large``) notes when it began in ``state.large_since``,
        for ``large_packet_timeout``; :meth:`handled` clears it."""
        self.meter.received += len(data)
        self.connection.framer.receive_data(data)

    async def handle_request(self, event: Request) -> Optional[str]:
        """Dispatch one request; None, or why the session ends (a handler closed it,
        the connection was lost while replying)."""
        self.errors = 0
        self.meter.requests += 1
        client = self.client
        codec = event.codec
        client.encoding = codec.name
        if self._debug:
            logger.debug("(%s) Packet of %d field(s) in %s", self.session_id, len(event.fields), codec.name)
        if self.limits is not None:
            retry_after = await self.limits.packet(self.group)
            if retry_after is not None:
                await self.reply_failure(rate_limited_payload(retry_after), codec)
                return None
        try:
            ran = await self.dispatch(client, Packet._received(event.fields, codec, client))
            if not ran and self._debug:
                logger.debug(
                    "(%s) No handler matched a packet with fields %s", self.session_id, sorted(map(str, event.fields))
                )
        except HandlerFailed as failure:
            if isinstance(failure.__cause__, STREAM_ERRORS):
                return "connection lost while replying"
            if failure.rate_limited:  # the client's doing: counted where refused, not logged
                if not self.channel.closed:
                    await self.reply_failure(failure.payload, codec)
            else:
                self._log_failure(failure)
                if not self.channel.closed:
                    await self.reply_error(failure.code)
        return "closed by a handler" if self.channel.closed else None

    async def handle_protocol_error(self, event: ProtocolError) -> Optional[str]:
        """Answer one protocol error; None, or why the session ends (framing lost, or
        ``max_protocol_errors`` in a row)."""
        self.errors += 1
        logs = self.logs or self._start_logs()
        if logs.errors.allow():
            self.shared.errors.warning(
                "(%s) %s: %s%s",
                self.session_id,
                event.code,
                event.detail,
                logs.errors.take_suppressed("protocol errors not logged"),
                extra={"error_code": event.code},
            )
        too_many = self.errors == self.settings.max_protocol_errors
        if too_many:
            self.shared.errors.warning(
                "(%s) %d protocol errors in a row (max_protocol_errors): closing the session",
                self.session_id,
                self.errors,
            )
        if not (event.close or too_many):
            await self.reply_error(event.code, event.codec)
            return None
        await self.close_with(event.code, event.codec)
        return event.code if event.close else "too many protocol errors"

    def handled(self, now: float) -> None:
        """A packet was handled at ``now``: the idle clock starts again (not when it
        arrived: a handler slower than ``timeout`` must not time out the next read),
        and a large packet's share of ``max_packet_memory`` is given back."""
        state = self.state
        state.last_active = now
        state.large_since = 0.0
        connection = self.connection
        if connection.held:
            connection.release()

    # -- replies and closes out -----------------------------------------------------------
    async def reply_error(self, code: str, codec: Any = None) -> None:
        """Send the error reply ``code``; the session goes on."""
        self.recorder.error_reply(code)
        await self.channel.send(self.connection.error_bytes(code, codec))

    async def reply_failure(self, payload: dict, codec: Any) -> None:
        """Send a failure ``payload`` with more than its code (``ERR_RATE_LIMITED``'s
        ``retry_after``) in ``codec``; the session goes on."""
        self.recorder.error_reply(payload["error"])
        await self.channel.send(self.connection.encode(payload, codec))

    async def close_with(self, code: str, codec: Any = None) -> None:
        """Close the session with the error reply ``code``, after the replies held for
        it, lingering (the client may still be sending: see
        :func:`~asyncapy.transport.linger_close`); closed at once with no reply when
        none can follow what is on the wire."""
        channel = self.channel
        if not (channel.writing or channel.interrupted):  # else no reply can follow
            self.recorder.error_reply(code)
        reply = self.connection.error_bytes(code, codec)
        self.connection.close()  # what it held of max_packet_memory: not for the linger
        await channel.close_with(reply)

    # -- the trio driver --------------------------------------------------------------------
    async def run(self) -> str:
        """Serve the session until it ends, in this task or, with a reactor, from the
        reactor's while this one waits; return why (the ``Session ended`` log line's
        reason). One cancel scope for the whole session, not one
        per read: the reaper and the shutdown cancel it only while the session waits
        for bytes (or, for the reaper, while a write makes no progress)."""
        state = self.state
        with state.scope:
            if self.reactor is not None:
                reason: Optional[str] = await self.reactor.serve(self)
            else:
                reason = await self._serve()
            if reason is not None:
                return reason
        return await self._end_cancelled()

    async def serve_in_task(self) -> Optional[str]:
        """Serve the session in this task from now on (the read loop of :meth:`run`): for
        a session that leaves the reactor (see :data:`asyncapy.reactor.LEAVE_AFTER`)."""
        return await self._serve()

    async def _serve(self) -> Optional[str]:
        """Read, feed, handle, until a handler, the client, an error or the shutdown
        ends the session (its reason), or the scope is cancelled (None).

        The hot loop of every plain session, so what :meth:`receive_data` and
        :meth:`handled` do is done here on locals, and the read is inline: a coroutine
        or a method call per packet is a measurable share of a small request's cost
        (``python -m benchmarks.instructions``). Other drivers call those methods.

        The read: on plain TCP (see :mod:`asyncapy.transport`) it yields first. Once
        the round is over, the session's deferred reply is written with the round's
        others; if the next request is there already, the server is busy and the next
        reply is deferred too (:class:`~asyncapy.transport.Pacer`); if not, the read
        waits and the next reply is written at once. A session's first read says
        nothing of the load (a client that writes its request with the connect)."""
        connection = self.connection
        framer = connection.framer
        channel = self.channel
        state = self.state
        meter = self.meter
        stopping = self.stopping
        handle_request = self.handle_request
        fd, pacer, buf = channel.fd, channel.pacer, self.buf
        first_read = True
        now = trio.lowlevel.current_clock().current_time  # trio.current_time, minus a hop
        event = connection.next_event()
        while True:
            if event is NEED_DATA:
                if channel.holding:
                    await channel.flush()
                if channel.closed:
                    return "closed by a handler"
                if stopping.is_set():
                    return "server shutting down"
                state.waiting = True
                if fd is not None:
                    await trio.lowlevel.checkpoint()
                    pacer.unyielded = 0
                    if channel.deferred:
                        pacer.flush()
                    data: Union[bytes, bytearray, None] = read_now(fd, buf)
                    busy = data is not None and not first_read
                    if channel.deferring is not busy:  # the call only on a change
                        channel.defer(busy)
                    if data is None:
                        data = await receive_waiting(fd, buf)
                    first_read = False
                else:
                    data = await channel.stream.receive_some(buf)
                state.waiting = False
                if state.cancelled:
                    return None  # cancelled just as bytes arrived: it still counts
                if not data:
                    return "client closed the connection"
                meter.received += len(data)
                framer.receive_data(data)
                event = connection.next_event()
                if event is NEED_DATA and not state.large_since and connection.receiving_large:
                    state.large_since = now()  # its body has large_packet_timeout
                continue
            # More pipelined packets already here? Then gather the replies and write
            # them together once the batch is handled.
            more = framer.complete_buffered()
            if more or channel.holding:  # the call only on a change
                channel.hold(more)
            if type(event) is Request:
                reason = await handle_request(event)
            else:
                reason = await self.handle_protocol_error(event)
            if reason is not None:
                return reason
            state.last_active = now()
            if state.large_since:
                state.large_since = 0.0
            if connection.held:
                connection.release()
            # Only the session feeds the framer: with no whole packet buffered after
            # this one, the next event is a read.
            event = connection.next_event() if more else NEED_DATA

    async def _end_cancelled(self) -> str:
        """End a session whose scope the reaper or the shutdown cancelled."""
        if self.stopping.is_set():
            return "server shutting down"
        channel = self.channel
        stuck = self.state.cancelled == STUCK
        if stuck or channel.writing or channel.interrupted:
            # Cancelled in the middle of a write, perhaps, or another task's (a
            # deferred reply's) is under way or was cut short: no reply can follow.
            interrupted = channel.interrupted
            await channel.abort()
            if interrupted and not stuck:
                return "connection lost"  # a deferred reply's write failed
            return f"the client read no reply for {self.settings.timeout}s"
        logger.debug("(%s) No complete packet for %ss: timing out", self.session_id, self.settings.timeout)
        await self.close_with(ERR_TIMED_OUT)
        return "timed out"

    # -- handlers' deadline and failures ----------------------------------------------------
    async def dispatch_within_deadline(self, dispatch: Dispatch, client: Client, packet: Packet) -> int:
        """``dispatch`` under ``handler_timeout``. Past the deadline the running
        handler is cancelled and logged, and the client gets ``ERR_INTERNAL``; if it was
        cancelled while writing, part of a reply may be on the wire already, so the
        session is closed instead."""
        seconds = self.settings.handler_timeout
        ran = 0
        with trio.move_on_after(seconds) as deadline:
            ran = await dispatch(client, packet)
        if not deadline.cancelled_caught:
            return ran
        name = client.handler.name if client.handler is not None else "?"
        channel = self.channel
        if channel.interrupted and not channel.closed:
            self.shared.failures.warning(
                "(%s) Handler %s ran past handler_timeout (%ss) while writing: cancelled, and the session closed",
                self.session_id,
                name,
                seconds,
            )
            await channel.abort()
            return 1
        self.shared.failures.warning(
            "(%s) Handler %s ran past handler_timeout (%ss): cancelled",
            self.session_id,
            name,
            seconds,
            extra={"error_code": ERR_INTERNAL},
        )
        if not channel.closed:
            await self.reply_error(ERR_INTERNAL)
        return 1

    def _log_failure(self, failure: HandlerFailed) -> None:
        """A handler's failure: one line for an outage, a traceback for a bug; both
        within the session's log limits."""
        logs = self.logs or self._start_logs()
        if not logs.failures.allow():
            return
        suppressed = logs.failures.take_suppressed("handler failures not logged")
        if failure.unavailable:
            self.shared.failures.warning(
                "(%s) %s: replied %s%s", self.session_id, failure, failure.code, suppressed,
                extra={"error_code": failure.code},
            )
        else:
            self.shared.failures.error(
                "(%s) %s%s", self.session_id, failure, suppressed, exc_info=failure.__cause__,
                extra={"error_code": failure.code},
            )

    def _start_logs(self) -> SessionLogs:
        self.logs = SessionLogs()
        return self.logs
