"""What the idle reaper and the shutdown need of each session, the reaper itself, and a
session's log limits.

The reaper is one task for all sessions: a session costs nothing per packet for its
timeout but a time stamp (:attr:`SessionState.last_active`). The channel's own flags
(held, deferred, writing, closed...) are documented on
:class:`~asyncapy.transport.Channel`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import trio

from .logs import LimitedLog, LogLimit
from .transport import Channel

__all__ = [
    "SessionState",
    "reap_idle",
    "SessionLogs",
    "SharedLogs",
    "IDLE",
    "STUCK",
    "SHUTDOWN",
    "LOG_BURST",
    "LOG_INTERVAL",
    "SHARED_LINES_PER_SECOND",
    "SESSION_LINES_PER_SECOND",
]

logger: logging.Logger = logging.getLogger("asyncapy.server")

LOG_BURST = 10
"""Protocol-error warnings (and, apart, handler tracebacks) one session logs per
:data:`LOG_INTERVAL`; the rest are counted, and the count is logged with the next
line let through, or when the session ends."""

LOG_INTERVAL = 10.0
"""Seconds of the window :data:`LOG_BURST` counts lines in."""

SHARED_LINES_PER_SECOND = 50
"""Protocol-error warnings (and, apart, handler failures, and the end-of-session counts
of what a session left out) all sessions together log per second: a client opening
connection after connection, each with one bad header, gets past every per-session
limit, and would otherwise write megabytes a minute."""

SESSION_LINES_PER_SECOND = 200
"""``Session started`` (and, apart, ``Session ended``) lines logged per second, across
sessions: enough for a busy server's every line, few enough that a flood of
connections writes tens of kilobytes a second, not megabytes."""

IDLE = "idle"
""":attr:`SessionState.cancelled`: no complete packet for ``timeout`` seconds."""

STUCK = "stuck"
""":attr:`SessionState.cancelled`: a write that made no progress for ``timeout`` seconds."""

SHUTDOWN = "shutdown"
""":attr:`SessionState.cancelled`: the server is shutting down."""


class SessionState:
    """One session as the reaper and the shutdown see it. The session loop sets
    :attr:`waiting` and :attr:`last_active`; the reaper and the shutdown set
    :attr:`cancelled` through :meth:`cancel`, which the loop reads after every read
    and once its scope is over, to choose how the session ends (``ERR_TIMED_OUT``, a
    close with no reply, or neither). Plain attributes: the loop touches them once
    per read or packet."""

    __slots__ = (
        "scope", "cancelled", "waiting", "last_active", "large_since", "channel", "writing_seen", "written_seen",
    )

    def __init__(self, now: float, channel: Channel) -> None:
        self.scope = trio.CancelScope()
        """The session loop's one cancel scope (not one per read)."""
        self.cancelled = ""
        """Why :attr:`scope` was cancelled (:data:`IDLE`, :data:`STUCK`,
        :data:`SHUTDOWN`), or ``""``."""
        self.waiting: bool = False
        """True while the session loop waits for bytes: only then does it time out,
        and only then does a shutdown stop it (busy ones get ``shutdown_grace``)."""
        self.last_active: float = now
        """When the session's last packet was handled (trio's clock)."""
        self.large_since: float = 0.0
        """When the large packet being received began to arrive (0.0: none is)."""
        self.channel: Channel = channel
        """The session's writing end, whose writes the reaper watches."""
        self.writing_seen: Optional[float] = None
        """When the reaper first found the session writing, in a run of looks that all
        did with no byte taken by the client in between; None otherwise."""
        self.written_seen: int = 0
        """``channel.written`` at the reaper's last look at a write under way."""

    def cancel(self, reason: str) -> None:
        """Cancel the session's scope for ``reason`` (the reaper's and the shutdown's way)."""
        self.cancelled = reason
        self.scope.cancel()


async def reap_idle(states: Mapping[Any, SessionState], settings: Callable[[], Any]) -> None:
    """Time out the sessions of ``states`` that waited ``timeout`` seconds for a
    complete packet (``large_packet_timeout`` for the rest of a large packet, from its
    first bytes: what it holds of the packet memory budget must not be held long), and
    those whose replies made no progress for ``timeout`` (``settings()`` says both).

    It wakes every ``timeout / 8`` seconds (at most 1 s, at least 50 ms), so a session
    times out at most one interval late. A client that pipelines requests and never
    reads its replies is never waiting for bytes: the server stops reading from it
    while a reply cannot be written (the backpressure that bounds its memory), so the
    session sits in a write. The reaper closes it once every look for ``timeout``
    seconds found that write with no byte taken in between; a client that reads a long
    reply slowly is not cut as long as it takes some of it every ``timeout`` seconds
    (as nginx's ``send_timeout``). Progress is seen on plain TCP
    (``Channel.written``); on TLS, a write that lasts ``timeout`` counts as stuck.
    """
    while True:
        current = settings()
        seconds = current.timeout
        large = min(current.large_packet_timeout, seconds)
        await trio.sleep(max(0.05, min(1.0, large / 8)))
        now = trio.current_time()
        cutoff = now - seconds
        for state in states.values():
            if state.waiting:
                if state.last_active <= cutoff or 0.0 < state.large_since <= now - large:
                    state.cancel(IDLE)
            elif state.channel.writing:
                written = state.channel.written
                if state.writing_seen is None or written != state.written_seen:
                    state.writing_seen = now
                    state.written_seen = written
                elif state.writing_seen <= cutoff:
                    state.cancel(STUCK)
                continue
            state.writing_seen = None


class SharedLogs:
    """The log limits all sessions of a server share (see
    :data:`SHARED_LINES_PER_SECOND` and :data:`SESSION_LINES_PER_SECOND`); a line a
    session's own limit lets through must pass these too. What they leave out is
    counted in the next line let through, and in :meth:`report`."""

    __slots__ = ("errors", "failures", "summaries", "started", "ended")

    def __init__(self, lines: int = SHARED_LINES_PER_SECOND, session_lines: int = SESSION_LINES_PER_SECOND) -> None:
        self.errors: LimitedLog = LimitedLog(logger, "protocol errors of all sessions not logged", lines)
        self.failures: LimitedLog = LimitedLog(logger, "handler failures of all sessions not logged", lines)
        self.summaries: LimitedLog = LimitedLog(logger, "sessions' counts not logged", lines)
        self.started: LimitedLog = LimitedLog(logger, "sessions started", session_lines)
        self.ended: LimitedLog = LimitedLog(logger, "sessions ended", session_lines)

    def report(self) -> None:
        """Log the lines left out since each kind's last line (periodically, and when
        the server stops)."""
        self.errors.report("%d protocol-error warning(s) of all sessions not logged (rate limit)")
        self.failures.report("%d handler failure(s) of all sessions not logged (rate limit)")
        self.summaries.report("%d session(s)' counts of lines left out not logged (rate limit)")
        self.started.report("%d 'Session started' line(s) not logged (rate limit)")
        self.ended.report("%d 'Session ended' line(s) not logged (rate limit)")


class SessionLogs:
    """One session's log limits: protocol-error warnings and handler tracebacks,
    :data:`LOG_BURST` of each per :data:`LOG_INTERVAL`. A client that sends garbage
    (or trips a handler) in a loop would otherwise write megabytes of log a second.
    Made on a session's first error: a session that never errs pays nothing."""

    __slots__ = ("errors", "failures")

    def __init__(self) -> None:
        self.errors: LogLimit = LogLimit(LOG_BURST, LOG_INTERVAL)
        self.failures: LogLimit = LogLimit(LOG_BURST, LOG_INTERVAL)

    def report(self, session_id: Any, shared: Optional[SharedLogs] = None) -> None:
        """Log what was suppressed and never reported, once the session ends (within
        the ``shared`` limit, if any)."""
        if self.errors.suppressed or self.failures.suppressed:
            log = shared.summaries.warning if shared is not None else logger.warning
            log(
                "(%s) Not logged (rate limit): %d protocol error(s), %d handler failure(s)",
                session_id,
                self.errors.suppressed,
                self.failures.suppressed,
            )
