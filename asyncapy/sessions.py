"""Sessions: each admitted connection served, from admission to release.

:meth:`Sessions.serve` is one session's whole life, in order: admission by the session
store (or a refusal reply), the :class:`~asyncapy.core.Client` and
:class:`~asyncapy.core.Session` handlers see, the session loop (:meth:`Sessions.run`:
read, feed the :class:`~asyncapy.domain.connection.Connection`, dispatch each request,
reply to each protocol error), the close, the release, and
:meth:`~asyncapy.server.Server.session_ended`. Every session takes this one path: those
the listeners accept (:mod:`asyncapy.listening`) and those of the test client
(:mod:`asyncapy.testing`).

Also here, what the sessions of one server share: the live sessions by id, the
:class:`~asyncapy.transport.Pacer` of their writes, the packet memory budget, the
bounded lingering closes of refused connections, the shutdown event, and the services
that run beside them (the store's upkeep, the idle reaper, the pacer's flusher). The
state the session loop shares with its channel and the reaper is documented in
:class:`asyncapy.session_state.SessionState`.

Log lines go to the ``asyncapy.server`` logger, as the rest of the serving machinery's.
"""

from __future__ import annotations

import logging
import time
import uuid
from bisect import bisect_left
from typing import Any, Callable, Optional

import trio

from asyncapy.domain.addresses import session_group
from asyncapy.domain.codecs import JSON, codec_named
from asyncapy.domain.connection import NEED_DATA, Connection, ProtocolError, Request, error_payload
from asyncapy.domain.dispatch import HandlerFailed
from asyncapy.domain.errors import (
    ERR_INTERNAL,
    ERR_SESSION_LIMIT_REACHED,
    ERR_TIMED_OUT,
    ERR_UNAVAILABLE,
    StoreUnavailable,
)
from asyncapy.domain.framing import Framer
from asyncapy.domain.limits import PacketMemory
from asyncapy.domain.ports import SessionRecord

from .core import Client, Packet, Session
from .logs import log_context
from .session_state import SHUTDOWN, STUCK, LogLimit, SessionState, reap_idle
from .transport import STREAM_ERRORS, Channel, Pacer, Refusals, linger_close, read_now, receive_waiting

__all__ = ["Sessions"]

logger = logging.getLogger("asyncapy.server")

REFUSED_LOG_INTERVAL = 1.0
"""Seconds between two log lines about connections refused for ``session_limit`` or
for an unavailable store (each kind apart); the lines carry the count of those not
logged."""


class Sessions:
    """The sessions of one server: admission, the session loop, release, and what
    they share.

    ``server`` is the :class:`~asyncapy.server.Server` whose settings and handlers
    these are (not imported: the server composes this, not the other way round).
    Settings are read when they are used, as they may change until the server
    serves; the session loop reads its own once per session."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.live: dict[str, Session] = {}
        """The sessions being served, by id."""
        self.states: dict[str, SessionState] = {}
        """Their states (see :class:`~asyncapy.session_state.SessionState`), by id."""
        self.pacer = Pacer()
        """Direct writes since a read, for all sessions (see :class:`~asyncapy.transport.Pacer`)."""
        self.packet_memory = PacketMemory(server.max_packet_memory)
        """What large packets hold, across sessions (see :mod:`asyncapy.domain.limits`)."""
        self.refusals = Refusals()
        """The lingering closes of refused connections, bounded."""
        self.stopping: Optional[trio.Event] = None
        """Set to shut down: made by :meth:`ready`; sessions end once they wait for bytes."""
        self.idle: Optional[trio.Event] = None
        """Set once no session is left, while :meth:`drain` waits for it."""
        self.limit_log = LogLimit(1, REFUSED_LOG_INTERVAL)
        self.unavailable_log = LogLimit(1, REFUSED_LOG_INTERVAL)

    def ready(self) -> None:
        """Make sessions servable: they check :attr:`stopping`, which a serve() of the
        server makes anew on each start, as does the test client of
        :mod:`asyncapy.testing`, which serves sessions without serve(). Keep a live
        one (a serve() of this server is running); replace a set one, left by a
        serve() that ended, or every new session would end at once."""
        if self.stopping is None or self.stopping.is_set():
            self.stopping = trio.Event()

    def new_channel(self, stream: trio.abc.Stream) -> Channel:
        """A channel, and the protocol state it writes for, for ``stream``."""
        server = self.server
        self.packet_memory.limit = server.max_packet_memory  # as set since (load_config, --config)
        return Channel(
            stream,
            Connection(
                server.header_size,
                server.byteorder,
                server.max_packet_size,
                codec_named(server.encoding),
                self.packet_memory,
            ),
            self.pacer,
        )

    async def serve(
        self,
        stream: trio.abc.Stream,
        address: str,
        *,
        release_slot: Callable[[], None] = lambda: None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve one session on ``stream``, a connection from ``address``: admission,
        the session, its release. Every session takes this one path: the accept loop's
        with the socket's peer address, :func:`asyncapy.testing.open_test_client`'s with
        an in-memory stream and the address the test chose.

        ``task_status.started(admitted)`` is called once admission is decided (an
        admitted session is registered by then), so ``await nursery.start(...)``
        returns once the session counts towards ``session_limit`` and
        :meth:`~asyncapy.core.Client.get_sessions`.

        ``release_slot`` is called when the connection is refused, before its
        lingering close: the accept loop's frees the ``max_connections`` slot.

        The store gets ``store_timeout`` seconds to answer the admission; past
        them, or when it fails, the client is answered ``ERR_UNAVAILABLE``.
        """
        server = self.server
        store = server.store
        recorder = server.metrics_recorder
        session_id = uuid.uuid4()
        log_context(session_id, address)  # every record of this task names the session
        group = session_group(address, server.session_limit_ipv6_prefix)
        record = SessionRecord(str(session_id), group, time.time(), server.server_id)
        admitted = False
        failure: Optional[str] = None
        traceback = False
        with trio.move_on_after(server.store_timeout) as deadline:
            try:
                admitted = await store.admit(record, server.session_limit)
            except StoreUnavailable as exc:
                failure = str(exc)
            except Exception:
                failure = "the store failed"
                traceback = True
        if deadline.cancelled_caught:
            failure = f"no answer within store_timeout ({server.store_timeout}s)"
        if failure is not None:
            recorder.connection("store_unavailable")
            log = self.unavailable_log
            if log.allow():
                logger.error(
                    "(%s) Session store unavailable, refusing %s: %s%s",
                    session_id,
                    address,
                    failure,
                    log.take_suppressed("refused alike"),
                    exc_info=traceback,
                    extra={"error_code": ERR_UNAVAILABLE},
                )
            task_status.started(False)
            release_slot()
            await self._refuse(stream, ERR_UNAVAILABLE)
            return
        if not admitted:
            recorder.connection("refused_session_limit")
            log = self.limit_log
            if log.allow():
                logger.warning(
                    "(%s) %s already holds %d session(s): limit reached%s",
                    session_id,
                    address if group == address else f"{address} (as {group})",
                    server.session_limit,
                    log.take_suppressed("refused for session_limit"),
                    extra={"error_code": ERR_SESSION_LIMIT_REACHED},
                )
            task_status.started(False)
            release_slot()
            await self._refuse(stream, ERR_SESSION_LIMIT_REACHED)
            return
        channel = self.new_channel(stream)
        client = Client(address, server, stream, None, server.encoding)
        client._channel = channel
        session = client.session = Session(session_id, client, record.date, server.server_id)
        recorder.connection("admitted")
        meter = channel.meter = recorder.session_started(client)
        self.live[record.session_id] = session
        state = self.states[record.session_id] = SessionState(trio.current_time(), channel)
        task_status.started(True)
        logger.info("(%s) Session started for %s", session_id, address)
        reason = "closed"
        try:
            reason = await self.run(client, channel, state)
        except STREAM_ERRORS:
            reason = "connection lost"
        except Exception:
            reason = "internal error"
            logger.exception("(%s) Unexpected error serving the session", session_id)
        except trio.Cancelled:
            reason = "cancelled"  # busy past shutdown_grace, or a second signal
            raise
        finally:
            self.states.pop(record.session_id, None)
            if state.logs is not None:
                state.logs.report(session_id)
            with trio.CancelScope(shield=True):
                await channel.aclose()
                with trio.move_on_after(server.store_timeout) as deadline:
                    try:
                        await store.release(record)
                    except Exception:
                        logger.warning("(%s) Could not release the session in the store", session_id, exc_info=True)
                if deadline.cancelled_caught:
                    logger.warning(
                        "(%s) The session store did not release the session within "
                        "store_timeout (%ss); its lease expires by itself",
                        session_id,
                        server.store_timeout,
                    )
            del self.live[record.session_id]
            recorder.session_ended(meter)
            logger.info("(%s) Session ended: %s", session_id, reason)
            if server._session_ended_overridden():
                await self._call_session_ended(client, reason)
            if self.idle is not None and not self.live:
                self.idle.set()

    async def run(self, client: Client, channel: Channel, state: SessionState) -> str:
        """The session loop: read, feed the connection, dispatch each request and reply
        to each protocol error, until the session ends; returns why (the ``Session
        ended`` log line's reason). The flags it shares with its channel and the
        reaper are documented in :class:`~asyncapy.session_state.SessionState`."""
        server = self.server
        connection = channel.connection
        framer = connection.framer
        stream = channel.stream
        fd = channel.fd  # read directly (see asyncapy.transport), or None: the stream
        pacer = channel.pacer
        # Chosen once per session: without handler_timeout, a packet costs no scope.
        if server.handler_timeout is None:
            dispatch = server._dispatcher.dispatch
        else:
            dispatch = self._dispatch_within_deadline
        stopping = self.stopping
        buf = server.buf
        session_id = client.session.session_id
        # Metrics (asyncapy.metrics): plain int additions on this session's meter
        # (a shared, never-read one when they are off), and the dispatch timed only
        # when they are on.
        recorder = server.metrics_recorder
        meter = channel.meter
        timed = recorder.enabled
        perf_counter = time.perf_counter
        # The histogram of the handler timed last (a session mostly reaches one):
        # looked up again only when another handler ran.
        timed_handler: Any = None
        timings: Any = None
        debug = logger.isEnabledFor(logging.DEBUG)
        now = trio.lowlevel.current_clock().current_time  # trio.current_time, minus a hop
        # One cancel scope for the whole session, not one per read. A shutdown cancels
        # it only while the session waits for bytes; the reaper (see reap_idle) then,
        # or when the session's writes have been blocked for ``timeout`` (STUCK).
        # A handler that is neither waiting nor writing is never cancelled here.
        first_read = True
        errors = 0  # protocol errors in a row (reset by every request)
        max_errors = server.max_protocol_errors
        with state.scope:
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
                        # A read yields first (see asyncapy.transport). Once the round
                        # is over, this session's deferred reply is written with the
                        # round's others before the read, and if the next request
                        # is there already, the server is busy: defer the reply to
                        # it too (see Pacer). If not, wait, and write it at once.
                        await trio.lowlevel.checkpoint()
                        pacer.unyielded = 0
                        if channel.deferred:
                            pacer.flush()
                        data = read_now(fd, buf)
                        if data is None:
                            channel.deferring = False
                            data = await receive_waiting(fd, buf)
                        else:
                            # Not on a session's first read: a client that writes
                            # its request with the connect says nothing of the load.
                            channel.deferring = not first_read
                        first_read = False
                    else:
                        data = await stream.receive_some(buf)
                    state.waiting = False
                    if state.cancelled:
                        break  # cancelled just as bytes arrived: it still counts
                    if not data:
                        return "client closed the connection"
                    meter.received += len(data)
                    framer.receive_data(data)
                    event = connection.next_event()
                    continue
                # More pipelined packets already here? Then gather the replies and
                # write them together once the batch is handled.
                more = channel.holding = framer.complete_buffered()
                if type(event) is Request:
                    errors = 0
                    meter.requests += 1
                    codec = event.codec
                    client.encoding = codec.name
                    if debug:
                        logger.debug("(%s) Packet of %d field(s) in %s", session_id, len(event.fields), codec.name)
                    try:
                        if timed:
                            # The handler that ran last gets the packet's time (one
                            # handler answers a packet, mostly); None if none ran.
                            client.handler = None
                            started = perf_counter()
                            try:
                                await dispatch(client, Packet._received(event.fields, codec, client))
                            finally:
                                handler = client.handler
                                if handler is not None:
                                    elapsed = perf_counter() - started
                                    if handler is not timed_handler:
                                        timed_handler = handler
                                        timings = recorder.handler_timings(handler.name)
                                    timings.counts[bisect_left(timings.bounds, elapsed)] += 1
                                    timings.total += elapsed
                        else:
                            await dispatch(client, Packet._received(event.fields, codec, client))
                    except HandlerFailed as failure:
                        cause = failure.__cause__
                        if isinstance(cause, STREAM_ERRORS):
                            return "connection lost while replying"
                        logs = state.logs or state.start_logs()
                        if logs.failures.allow():
                            suppressed = logs.failures.take_suppressed("handler failures not logged")
                            if failure.unavailable:  # an outage, not a bug: one line
                                logger.warning(
                                    "(%s) %s: replied %s%s", session_id, failure, failure.code, suppressed,
                                    extra={"error_code": failure.code},
                                )
                            else:
                                logger.error(
                                    "(%s) %s%s", session_id, failure, suppressed, exc_info=cause,
                                    extra={"error_code": failure.code},
                                )
                        if not channel.closed:
                            recorder.error_reply(failure.code)
                            await channel.send(connection.error_bytes(failure.code))
                    if channel.closed:
                        return "closed by a handler"
                else:
                    assert type(event) is ProtocolError
                    errors += 1
                    logs = state.logs or state.start_logs()
                    if logs.errors.allow():
                        logger.warning(
                            "(%s) %s: %s%s",
                            session_id,
                            event.code,
                            event.detail,
                            logs.errors.take_suppressed("protocol errors not logged"),
                            extra={"error_code": event.code},
                        )
                    reply = connection.error_bytes(event.code, event.codec)
                    close = event.close
                    if errors == max_errors:
                        logger.warning(
                            "(%s) %d protocol errors in a row (max_protocol_errors): "
                            "closing the session",
                            session_id,
                            errors,
                        )
                        close = True
                    if close:
                        if channel.writing or channel.interrupted:
                            # A deferred reply is still being written (or was cut
                            # short): the error reply cannot follow it on the wire.
                            channel.closed = True
                            await trio.aclose_forcefully(stream)
                            return event.code if event.close else "too many protocol errors"
                        # Framing is lost: the client may still be sending the rest of
                        # the packet, so close lingering or the reply dies in a reset.
                        recorder.error_reply(event.code)
                        meter.sent += len(reply)  # the held replies were counted already
                        reply = channel.take_pending() + reply
                        channel.closed = True
                        await linger_close(stream, reply)
                        return event.code if event.close else "too many protocol errors"
                    recorder.error_reply(event.code)
                    await channel.send(reply)
                # The idle clock starts once the packet is handled, not when it
                # arrived: a handler slower than ``timeout`` must not time out the
                # next read at once.
                state.last_active = now()
                if connection.held:  # a large packet's share of max_packet_memory
                    connection.release()
                # Only the session feeds the framer: with no whole packet buffered
                # after this one, the next event is a read.
                event = connection.next_event() if more else NEED_DATA
        if stopping.is_set():
            return "server shutting down"
        stuck = state.cancelled == STUCK
        if stuck or channel.writing or channel.interrupted:
            # Cancelled in the middle of a write, perhaps, or another task's (a
            # deferred reply's) is under way or was cut short: no reply can follow.
            channel.closed = True
            await trio.aclose_forcefully(stream)
            if channel.interrupted and not stuck:
                return "connection lost"  # a deferred reply's write failed
            return f"the client read no reply for {server.timeout}s"
        logger.debug("(%s) No complete packet for %ss: timing out", session_id, server.timeout)
        # A client still sending (a packet trickling in) would turn a plain close into
        # a TCP reset, which can destroy the reply before the client reads it: close
        # lingering, as on a framing error.
        channel.closed = True
        recorder.error_reply(ERR_TIMED_OUT)
        reply = connection.error_bytes(ERR_TIMED_OUT)
        meter.sent += len(reply)  # the held replies were counted already
        await linger_close(stream, channel.take_pending() + reply)
        return "timed out"

    async def _dispatch_within_deadline(self, client: Client, packet: Packet) -> None:
        """Dispatch under ``handler_timeout`` (the session loop's ``dispatch`` when
        it is set). Past the deadline, the running handler is cancelled and logged,
        and the client gets ``ERR_INTERNAL``; if it was cancelled while writing, part
        of a reply may be on the wire already, so the session is closed instead."""
        server = self.server
        with trio.move_on_after(server.handler_timeout) as deadline:
            await server._dispatcher.dispatch(client, packet)
        if not deadline.cancelled_caught:
            return
        name = client.handler.name if client.handler is not None else "?"
        channel = client._writer()
        session_id = client.session.session_id
        if channel.interrupted and not channel.closed:
            logger.warning(
                "(%s) Handler %s ran past handler_timeout (%ss) while writing: "
                "cancelled, and the session closed",
                session_id,
                name,
                server.handler_timeout,
            )
            channel.closed = True
            await trio.aclose_forcefully(channel.stream)
            return
        logger.warning(
            "(%s) Handler %s ran past handler_timeout (%ss): cancelled",
            session_id,
            name,
            server.handler_timeout,
            extra={"error_code": ERR_INTERNAL},
        )
        if not channel.closed:
            server.metrics_recorder.error_reply(ERR_INTERNAL)
            await channel.send(channel.connection.error_bytes(ERR_INTERNAL))

    async def _refuse(self, stream: trio.abc.Stream, code: str) -> None:
        """Reply ``code`` in JSON (no encoding is known yet), then close lingering."""
        server = self.server
        server.metrics_recorder.error_reply(code)
        data = Framer(server.header_size, server.byteorder, server.max_packet_size).frame(
            JSON.encode(error_payload(code)), JSON.code
        )
        await self.refusals.close(stream, data)

    async def _call_session_ended(self, client: Client, reason: str) -> None:
        """Await the server's ``session_ended(client, reason)``, shielded for at most
        ``shutdown_grace`` seconds; log what it raises."""
        server = self.server
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + server.shutdown_grace
            try:
                await server.session_ended(client, reason)
            except Exception:
                logger.exception("(%s) session_ended() raised", client.session.session_id)
        if scope.cancelled_caught:
            logger.warning(
                "(%s) session_ended() ran past shutdown_grace (%ss): cancelled",
                client.session.session_id,
                server.shutdown_grace,
            )

    async def run_services(self) -> None:
        """Run, until cancelled, what live sessions need beside them: the store's upkeep
        (lease renewals), the idle reaper and the pacer's flusher. The server's
        serve() runs it in its session nursery; the test client of
        :mod:`asyncapy.testing`, which serves sessions without serve(), in its own."""
        async with trio.open_nursery() as services:
            services.start_soon(self.server.store.maintain)
            services.start_soon(reap_idle, self.states, self.server)
            services.start_soon(self.pacer.run)

    async def drain(self) -> None:
        """Stop reading on every session; give in-flight handlers the grace period."""
        grace = self.server.shutdown_grace
        for state in list(self.states.values()):
            if state.waiting:
                state.cancel(SHUTDOWN)
        if not self.live:
            return
        logger.info("Waiting up to %ss for %d session(s)", grace, len(self.live))
        self.idle = trio.Event()
        with trio.move_on_after(grace):
            await self.idle.wait()
        if self.live:
            logger.warning("Grace period over: closing %d busy session(s)", len(self.live))

    def report_refusals(self) -> None:
        """Log the refusals for ``session_limit`` and for an unavailable store that
        the rate limits kept out of the log (when the server stops)."""
        for log, what in (
            (self.limit_log, "refused for session_limit"),
            (self.unavailable_log, "refused with the session store unavailable"),
        ):
            if log.suppressed:
                logger.warning("%d more connection(s) %s, not logged", log.suppressed, what)
                log.suppressed = 0

    async def sessions_of(self, address: str) -> list[Session]:
        """The sessions of ``address``'s client group in the store: this process's
        as they are served, other processes' as bare :class:`~asyncapy.core.Session`
        objects."""
        server = self.server
        records = await server.store.sessions(session_group(address, server.session_limit_ipv6_prefix))
        local = self.live
        return [
            local.get(r.session_id)
            or Session(uuid.UUID(r.session_id), None, r.date, r.server_id)
            for r in records
        ]
