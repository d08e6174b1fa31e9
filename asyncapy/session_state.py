"""What the server keeps per session beside the objects handlers see: its state, the
idle reaper that reads it, and its log rate limits.

The session loop (:mod:`asyncapy.sessions`) and the writes of its
:class:`~asyncapy.transport.Channel` share a few flags with the reaper and the
shutdown. They are documented here, in one place, in :class:`SessionState`'s docstring.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Mapping, Optional

import trio

from .transport import Channel

__all__ = ["SessionState", "reap_idle", "LogLimit", "SessionLogs", "IDLE", "STUCK", "SHUTDOWN"]

logger = logging.getLogger("asyncapy.server")

LOG_BURST = 10
"""Protocol-error warnings (and, apart, handler tracebacks) one session logs per
:data:`LOG_INTERVAL`; the rest are counted, and the count is logged with the next
line let through, or when the session ends."""

LOG_INTERVAL = 10.0
"""Seconds of the window :data:`LOG_BURST` counts lines in."""

IDLE = "idle"
""":attr:`SessionState.cancelled`: no complete packet for ``timeout`` seconds."""

STUCK = "stuck"
""":attr:`SessionState.cancelled`: a write that made no progress for ``timeout`` seconds."""

SHUTDOWN = "shutdown"
""":attr:`SessionState.cancelled`: the server is shutting down."""


class SessionState:
    """One session's state, as the session loop, its channel, the idle reaper and the
    shutdown share it. Each flag, what it means, who sets it, and who reads it:

    On the session's :class:`~asyncapy.transport.Channel` (the writing end):

    ``holding``
        More pipelined packets are buffered, so replies are gathered and written in
        one system call when the batch ends. Set by the session loop before each
        packet (from ``Framer.complete_buffered()``); cleared by ``Channel.flush``
        (the loop's, before it reads) and ``take_pending``. Read by ``Channel.send``.
    ``deferring``
        The server is busy: replies wait for the next scheduling round (see
        :class:`~asyncapy.transport.Pacer`). Set by the session loop after each direct
        read (True if the read found bytes at once, except on the first read; False
        if it had to wait); cleared by ``Channel.aclose``. Read by ``Channel.send``.
    ``deferred``
        This channel is queued in the pacer for the next round. Set by
        ``Channel.send``; cleared by ``Pacer.flush``. Read by the session loop (before
        a read, it flushes the round) and by ``Channel.send`` (queued once).
    ``writing``
        A write is under way (or queued behind one): ``Channel._busy``. Set and
        cleared by ``Channel.send`` and the pacer's finishing of a deferred reply.
        Read by the reaper (a write that never ends) and by the session loop's
        closing paths (no error reply can follow a write under way).
    ``interrupted``
        A write failed or was cut short: the stream is out of step with the framing,
        and nothing more may be written. Set by the channel's writes. Read by
        ``Channel.send`` (which raises), the session loop's closing paths and the
        handler deadline.
    ``closed``
        No more writes: set by ``Channel.aclose``, or by the session loop when it
        closes the stream itself (a lingering or forced close). Read by everyone.

    Here:

    :attr:`waiting`
        The loop is waiting for bytes (between its yield before a read and the
        read's return). Set and cleared by the session loop. Read by the reaper (a
        session only times out while waiting) and by the shutdown (which stops only
        waiting sessions; busy ones get ``shutdown_grace``).
    :attr:`cancelled`
        Why :attr:`scope` was cancelled (:data:`IDLE`, :data:`STUCK` or
        :data:`SHUTDOWN`), or ``""``. Set by :meth:`cancel` (the reaper, the
        shutdown). Read by the session loop after every read (bytes that arrived as
        it was cancelled do not undo it) and after the scope, to choose how the
        session ends: ``ERR_TIMED_OUT``, a close with no reply, or none.
    :attr:`last_active`
        When the last packet was handled. Set by the session loop; read by the reaper.
    :attr:`writing_seen`, :attr:`written_seen`
        The reaper's own notes on a write in progress.

    The loop keeps its flags in plain attributes, never behind properties or
    events: it reads them once per packet or per read.
    """

    __slots__ = ("scope", "cancelled", "waiting", "last_active", "channel", "writing_seen", "written_seen", "logs")

    def __init__(self, now: float, channel: Channel) -> None:
        self.scope = trio.CancelScope()
        """The session loop's one cancel scope (not one per read)."""
        self.cancelled = ""
        """Why :attr:`scope` was cancelled, or ``""`` (a plain attribute: the session
        loop reads it after every read, and ``scope.cancel_called`` is a property
        that reads the clock)."""
        self.waiting = False
        """True while the session loop waits for bytes."""
        self.last_active = now
        """When the session's last packet was handled (trio's clock)."""
        self.channel = channel
        """The session's writing end, whose writes the reaper watches."""
        self.writing_seen: Optional[float] = None
        """When the reaper first found the session writing, in a run of looks that all
        did (and, on plain TCP, found no more bytes written); None when the last look
        found no write."""
        self.written_seen = 0
        """``channel.written`` at the last look that found a write going on."""
        self.logs: Optional[SessionLogs] = None
        """The session's log rate limits, made on its first error (see :meth:`start_logs`)."""

    def start_logs(self) -> "SessionLogs":
        """The session's log rate limits, made now: a session that never errs pays
        nothing for them."""
        self.logs = SessionLogs()
        return self.logs

    def cancel(self, reason: str) -> None:
        """Cancel the session's scope for ``reason`` (the reaper's and the shutdown's way)."""
        self.cancelled = reason
        self.scope.cancel()


async def reap_idle(states: Mapping[str, SessionState], server: Any) -> None:
    """Time out the sessions of ``states`` that waited ``server.timeout`` seconds for a
    complete packet, and those whose replies made no progress for as long.

    One task for every session, waking every ``timeout / 8`` seconds (at most 1 s,
    at least 50 ms): a session costs nothing per packet for its timeout but the
    time stamp :attr:`SessionState.last_active`, and times out at most one interval late.

    A client that pipelines requests and never reads its replies is never waiting
    for bytes: the server stops reading from it while a reply cannot be written
    (that is the backpressure that bounds its memory), so the session sits in a
    write. The reaper sees that write in progress (its channel is busy) and closes
    the session once every look for ``timeout`` seconds found one, with no byte of
    it taken by the client in between: such a client would otherwise hold its
    connection, and a ``max_connections`` slot, forever. A client that reads a long
    reply slowly is not cut, however long the reply takes, as long as it takes some
    of it every ``timeout`` seconds (as nginx's ``send_timeout``). That progress is
    seen on plain TCP connections (``Channel.written``); on TLS ones, a write that
    lasts ``timeout`` seconds counts as stuck. The cost is the reaper's, never a
    packet's.
    """
    while True:
        timeout = server.timeout
        await trio.sleep(max(0.05, min(1.0, timeout / 8)))
        now = trio.current_time()
        cutoff = now - timeout
        for state in states.values():
            if state.waiting:
                if state.last_active <= cutoff:
                    state.cancel(IDLE)
            elif state.channel.writing:
                written = state.channel.written
                if state.writing_seen is None or written != state.written_seen:
                    # Writing, and (on a plain TCP connection, where it can be
                    # seen) the client took bytes since the last look: not stuck.
                    state.writing_seen = now
                    state.written_seen = written
                elif state.writing_seen <= cutoff:
                    state.cancel(STUCK)
                continue
            state.writing_seen = None


class LogLimit:
    """At most ``burst`` log lines per ``interval`` seconds; the rest are counted.

    Used on error paths only. A fixed window: the first ``burst`` lines of each
    window are let through (:meth:`allow` is True), the others counted in
    :attr:`suppressed`, which the next line let through reports
    (:meth:`take_suppressed`), and which whoever owns the limit reports when it is
    done with it."""

    __slots__ = ("burst", "interval", "window_start", "used", "suppressed")

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self.window_start = -math.inf
        self.used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        """True if a line may be logged now; else the line is counted as suppressed."""
        now = time.monotonic()
        if now - self.window_start >= self.interval:
            self.window_start = now
            self.used = 0
        if self.used < self.burst:
            self.used += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self, what: str) -> str:
        """``' (N more WHAT since)'`` for the suppressed lines, then forget them; ``''``
        if there were none."""
        count = self.suppressed
        if not count:
            return ""
        self.suppressed = 0
        return f" ({count} more {what} since)"


class SessionLogs:
    """One session's log rate limits: protocol-error warnings and handler tracebacks,
    :data:`LOG_BURST` of each per :data:`LOG_INTERVAL`. A client that sends garbage
    (or trips a handler) in a loop would otherwise write megabytes of log a second."""

    __slots__ = ("errors", "failures")

    def __init__(self) -> None:
        self.errors = LogLimit(LOG_BURST, LOG_INTERVAL)
        self.failures = LogLimit(LOG_BURST, LOG_INTERVAL)

    def report(self, session_id: Any) -> None:
        """Log what was suppressed and never reported, once the session ends."""
        if self.errors.suppressed or self.failures.suppressed:
            logger.warning(
                "(%s) Not logged (rate limit): %d protocol error(s), %d handler failure(s)",
                session_id,
                self.errors.suppressed,
                self.failures.suppressed,
            )
