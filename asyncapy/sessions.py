"""Sessions: admission, the registry of live sessions, release, and the shutdown's drain.

:meth:`Sessions.serve` is one connection's life as a session, in order: admission by
the session store (or a refusal reply), the session itself (a
:class:`~asyncapy.session_protocol.SessionProtocol`, which reads, dispatches and
replies), the close, the release, and the application's ``session_ended``. Every
session takes this one path: those the listeners accept (:mod:`asyncapy.listening`)
and those of the test client (:mod:`asyncapy.testing`).

Also here, what the sessions of one server share: the live sessions by id, the
:class:`~asyncapy.transport.Pacer` of their writes, the packet memory budget, the
bounded lingering closes of refused connections, the shutdown event, and the services
that run beside them (the store's upkeep, the idle reaper, the pacer's flusher).

The server hands this object what it uses (settings, dispatch, the session store, the
metrics recorder, the ``session_ended`` hook) and hands it again when they change
before serving; nothing here reaches back into the server.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Optional

import trio

from asyncapy.domain.addresses import session_group
from asyncapy.domain.codecs import JSON, codec_named
from asyncapy.domain.connection import Connection, error_payload
from asyncapy.domain.errors import ERR_SESSION_LIMIT_REACHED, ERR_UNAVAILABLE, StoreUnavailable
from asyncapy.domain.framing import Framer
from asyncapy.domain.limits import DEFAULT_OWNER_SHARE, PacketMemory
from asyncapy.domain.ports import SessionRecord, SessionStore

from .core import Client, Session
from .limits import Limits
from .logs import LimitedLog, log_context
from .metrics import NULL_RECORDER, Recorder
from .reactor import Reactor, available
from .session_protocol import Dispatch, SessionProtocol
from .session_state import SHUTDOWN, SessionState, SharedLogs, reap_idle
from .transport import STREAM_ERRORS, Channel, Pacer, Refusals

__all__ = ["Sessions"]

logger: logging.Logger = logging.getLogger("asyncapy.server")

REFUSED_LOG_INTERVAL = 1.0
"""Seconds between two log lines about connections refused for ``session_limit`` or
for an unavailable store (each kind apart); the lines carry the count of those not
logged."""

SessionEnded = Callable[[Client, str], Awaitable[None]]
"""The application's ``session_ended(client, reason)`` hook."""


class Sessions:
    """The sessions of one server: admission, the live ones, release, and what they share.

    :param settings: the server's :class:`~asyncapy.config.Settings`.
    :param dispatch: the dispatcher's ``dispatch`` (metered when metrics are on).
    :param store: the :class:`~asyncapy.domain.ports.SessionStore`.
    :param recorder: where metrics go.
    :param server_id: this server process's name in a shared store.
    :param session_ended: the application's hook, or None when it has none (then
        a session's end costs nothing for it).
    :param limits: the rate limits and the failed-key-check throttle (None: none).
    """

    def __init__(
        self,
        settings: Any,
        dispatch: Dispatch,
        store: SessionStore,
        *,
        recorder: Recorder = NULL_RECORDER,
        server_id: str = "",
        session_ended: Optional[SessionEnded] = None,
        limits: Optional[Limits] = None,
    ) -> None:
        self.settings = settings
        self.dispatch = dispatch
        self.store = store
        self.recorder = recorder
        self.server_id = server_id
        self.session_ended = session_ended
        self.limits = limits
        self.live: dict[str, Session] = {}
        """The sessions being served, by id."""
        self.states: dict[str, SessionState] = {}
        """What the reaper and the shutdown see of them, by id."""
        self.pacer: Pacer = Pacer()
        """Direct writes since a read, for all sessions (see :class:`~asyncapy.transport.Pacer`)."""
        self.packet_memory: PacketMemory = PacketMemory(settings.max_packet_memory, share=DEFAULT_OWNER_SHARE)
        """What large packets hold, across sessions, charged as their bytes arrive, one
        client address group holding at most a share of it (see
        :mod:`asyncapy.domain.limits`)."""
        self.refusals: Refusals = Refusals()
        """The lingering closes of refused connections, bounded."""
        self.reactor: Reactor = Reactor()
        """What serves the plain-TCP sessions while the ``reactor`` setting is on (see
        :mod:`asyncapy.reactor`); run by :meth:`run_services`."""
        self.stopping: Optional[trio.Event] = None
        """Set to shut down (made by :meth:`ready`); sessions end once they wait for bytes."""
        self.idle: Optional[trio.Event] = None
        """Set once no session is left, while :meth:`drain` waits for it."""
        self.shared_logs: SharedLogs = SharedLogs()
        """The log limits all sessions share (see :class:`~asyncapy.session_state.SharedLogs`)."""
        self.limit_log: LimitedLog = LimitedLog(logger, "refused for session_limit", 1, REFUSED_LOG_INTERVAL)
        self.unavailable_log: LimitedLog = LimitedLog(logger, "refused alike", 1, REFUSED_LOG_INTERVAL)

    def ready(self) -> None:
        """Make sessions servable: they check :attr:`stopping`, which a serve() of the
        server makes anew on each start, as does the test client of
        :mod:`asyncapy.testing`, which serves sessions without serve(). Keep a live
        one (a serve() of this server is running); replace a set one, left by a
        serve() that ended, or every new session would end at once."""
        if self.stopping is None or self.stopping.is_set():
            self.stopping = trio.Event()

    # -- one session ---------------------------------------------------------------------
    async def serve(
        self,
        stream: trio.abc.Stream,
        address: str,
        *,
        release_slot: Callable[[], None] = lambda: None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve one session on ``stream``, a connection from ``address``: admission,
        the session, its release.

        ``task_status.started(admitted)`` is called once admission is decided (an
        admitted session is registered by then), so ``await nursery.start(...)``
        returns once the session counts towards ``session_limit`` and
        :meth:`~asyncapy.core.Client.get_sessions`. ``release_slot`` is called when
        the connection is refused, before its lingering close: the accept loop's
        frees the ``max_connections`` slot.
        """
        session_id = uuid.uuid4()
        log_context(session_id, address)  # every record of this task names the session
        group = session_group(address, self.settings.session_limit_ipv6_prefix)
        record = SessionRecord(str(session_id), group, time.time(), self.server_id)
        refusal = await self._admit(record, address)
        if refusal is not None:
            task_status.started(False)
            release_slot()
            await self._refuse(stream, refusal)
            return
        protocol = self._open(stream, address, record, session_id)
        task_status.started(True)
        self.shared_logs.started.log(logging.INFO, "(%s) Session started for %s", session_id, address)
        reason = "cancelled"  # busy past shutdown_grace, or a second signal
        try:
            reason = await self._run(protocol)
        finally:
            await self._close(protocol, record, reason)

    async def _admit(self, record: SessionRecord, address: str) -> Optional[str]:
        """Ask the store to admit ``record`` within ``store_timeout``: None if it did,
        else the error code to refuse with (logged, rate-limited)."""
        settings = self.settings
        admitted = False
        failure: Optional[str] = None
        traceback = False
        with trio.move_on_after(settings.store_timeout) as deadline:
            try:
                admitted = await self.store.admit(record, settings.session_limit)
            except StoreUnavailable as exc:
                failure = str(exc)
            except Exception:
                failure = "the store failed"
                traceback = True
        if deadline.cancelled_caught:
            failure = f"no answer within store_timeout ({settings.store_timeout}s)"
        if failure is not None:
            self.recorder.connection("store_unavailable")
            self.unavailable_log.error(
                "(%s) Session store unavailable, refusing %s: %s",
                record.session_id,
                address,
                failure,
                exc_info=traceback,
                extra={"error_code": ERR_UNAVAILABLE},
            )
            return ERR_UNAVAILABLE
        if not admitted:
            self.recorder.connection("refused_session_limit")
            self.limit_log.warning(
                "(%s) %s already holds %d session(s): limit reached",
                record.session_id,
                address if record.address == address else f"{address} (as {record.address})",
                settings.session_limit,
                extra={"error_code": ERR_SESSION_LIMIT_REACHED},
            )
            return ERR_SESSION_LIMIT_REACHED
        self.recorder.connection("admitted")
        return None

    def _open(
        self, stream: trio.abc.Stream, address: str, record: SessionRecord, session_id: uuid.UUID
    ) -> SessionProtocol:
        """The admitted session's parts, registered as live."""
        settings = self.settings
        client = Client(address, self, stream, None, settings.encoding)
        self.attach(client)
        channel = client._channel
        assert channel is not None and client._connection is not None
        session = Session(session_id, client, record.date, self.server_id)
        client.session = session
        channel.meter = self.recorder.session_started(client)
        state = SessionState(trio.current_time(), channel)
        reactor = self.reactor if self.reactor.running and channel.socket is not None else None
        self.live[record.session_id] = session
        self.states[record.session_id] = state
        if self.stopping is None:
            self.ready()
        assert self.stopping is not None
        return SessionProtocol(
            client,
            channel,
            client._connection,
            state,
            settings=settings,
            dispatch=self.dispatch,
            recorder=self.recorder,
            stopping=self.stopping,
            shared=self.shared_logs,
            limits=self.limits,
            group=record.address,
            reactor=reactor,
        )

    async def _run(self, protocol: SessionProtocol) -> str:
        """The session, and why it ended, however it did (cancellation aside)."""
        try:
            return await protocol.run()
        except STREAM_ERRORS:
            return "connection lost"
        except Exception:
            self.shared_logs.failures.error(
                "(%s) Unexpected error serving the session", protocol.session_id, exc_info=True
            )
            return "internal error"

    async def _close(self, protocol: SessionProtocol, record: SessionRecord, reason: str) -> None:
        """Close the connection, release the session in the store (within
        ``store_timeout``: past it the lease expires by itself), unregister it, and
        call ``session_ended``. Shielded: it runs during a cancellation too."""
        session_id = protocol.session_id
        self.states.pop(record.session_id, None)
        if protocol.logs is not None:
            protocol.logs.report(session_id, self.shared_logs)
        with trio.CancelScope(shield=True):
            protocol.connection.close()  # what it held of max_packet_memory
            await protocol.channel.aclose()
            with trio.move_on_after(self.settings.store_timeout) as deadline:
                try:
                    await self.store.release(record)
                except StoreUnavailable as exc:  # an outage, not a bug: one line
                    logger.warning(
                        "(%s) Could not release the session in the store (its lease expires by itself): %s",
                        session_id,
                        exc,
                    )
                except Exception:
                    logger.warning("(%s) Could not release the session in the store", session_id, exc_info=True)
            if deadline.cancelled_caught:
                logger.warning(
                    "(%s) The session store did not release the session within "
                    "store_timeout (%ss); its lease expires by itself",
                    session_id,
                    self.settings.store_timeout,
                )
        del self.live[record.session_id]
        self.recorder.session_ended(protocol.meter)
        self.shared_logs.ended.log(logging.INFO, "(%s) Session ended: %s", session_id, reason)
        if self.session_ended is not None:
            await self._call_session_ended(protocol.client, reason)
        if self.idle is not None and not self.live:
            self.idle.set()

    async def _refuse(self, stream: trio.abc.Stream, code: str) -> None:
        """Reply ``code`` in JSON (no encoding is known yet), then close lingering."""
        settings = self.settings
        self.recorder.error_reply(code)
        data = Framer(settings.header_size, settings.byteorder, settings.max_packet_size).frame(
            JSON.encode(error_payload(code)), JSON.code
        )
        await self.refusals.close(stream, data)

    async def _call_session_ended(self, client: Client, reason: str) -> None:
        """Await ``session_ended(client, reason)``, shielded for at most
        ``shutdown_grace`` seconds; log what it raises."""
        assert self.session_ended is not None
        grace = self.settings.shutdown_grace
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + grace
            try:
                await self.session_ended(client, reason)
            except Exception:
                logger.exception("(%s) session_ended() raised", client.session.session_id)
        if scope.cancelled_caught:
            logger.warning(
                "(%s) session_ended() ran past shutdown_grace (%ss): cancelled",
                client.session.session_id,
                grace,
            )

    # -- what a handler's Client asks (see asyncapy.core) -----------------------------------
    def attach(self, client: Client) -> None:
        """Give ``client`` the channel it writes through and the protocol state it
        encodes with, for its stream."""
        settings = self.settings
        self.packet_memory.limit = settings.max_packet_memory  # as set since (load_config, --config)
        client._channel = Channel(client._stream, self.pacer)
        client._limits = self.limits
        client._connection = Connection(
            settings.header_size,
            settings.byteorder,
            settings.max_packet_size,
            codec_named(settings.encoding),
            self.packet_memory,
            owner=session_group(client.address, settings.session_limit_ipv6_prefix),
            charge_on_arrival=True,
        )

    async def sessions_of(self, address: str) -> list[Session]:
        """The sessions of ``address``'s client group in the store: this process's
        as they are served, other processes' as bare :class:`~asyncapy.core.Session`
        objects."""
        records = await self.store.sessions(session_group(address, self.settings.session_limit_ipv6_prefix))
        local = self.live
        return [
            local.get(r.session_id) or Session(uuid.UUID(r.session_id), None, r.date, r.server_id)
            for r in records
        ]

    # -- beside the sessions, and the end -----------------------------------------------------
    async def run_services(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run, until cancelled, what live sessions need beside them: the store's upkeep
        (lease renewals), the idle reaper, the pacer's flusher and, with the
        ``reactor`` setting on where epoll exists, the reactor (sessions opened before
        it runs keep a task each). The server's serve() runs it in its session
        nursery; the test client, which serves sessions without serve(), in its own."""
        async with trio.open_nursery() as services:
            if self.settings.reactor and available() and not self.reactor.running:
                await services.start(self.reactor.run)
            services.start_soon(self.store.maintain)
            services.start_soon(reap_idle, self.states, lambda: self.settings)
            services.start_soon(self.pacer.run)
            task_status.started()

    async def drain(self) -> None:
        """Stop reading on every session; give in-flight handlers the grace period."""
        grace = self.settings.shutdown_grace
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
        """Log what the log limits kept out of the log since their last line: refusals
        and the sessions' lines (periodically, and when the server stops)."""
        self.shared_logs.report()
        self.limit_log.report("%d more connection(s) refused for session_limit, not logged")
        self.unavailable_log.report("%d more connection(s) refused with the session store unavailable, not logged")
