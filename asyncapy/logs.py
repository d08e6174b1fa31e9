"""Log records as text or as one JSON object a line (``log_format``).

A log shipper (Fluent Bit, Vector, Promtail, a Kubernetes node's collector) reads
JSON lines without a parsing rule per application, and a query can then filter on
the session or the error code instead of grepping messages. With
``log_format = json`` every record becomes one line::

    {"time": "2024-05-01T12:00:00.123Z", "level": "WARNING", "logger": "asyncapy.server",
     "message": "(...) ERR_REQUEST_MALFORMED: ...", "session_id": "...",
     "client_address": "203.0.113.7", "error_code": "ERR_REQUEST_MALFORMED"}

``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger`` and ``message`` are always
there; ``session_id``, ``client_address`` and ``error_code`` where known, from the
record's ``extra=`` or else from the context of the task that logged
(:func:`log_context`: the server sets it once per session, so a handler's own log
lines carry their session too); ``exception`` holds a traceback, on the same line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import time
from typing import Any, Optional

__all__ = [
    "LOG_FORMATS",
    "SESSION_ID",
    "CLIENT_ADDRESS",
    "JsonFormatter",
    "log_context",
    "make_formatter",
    "configure_logging",
    "configure_server_logging",
    "LogLimit",
    "LimitedLog",
]

LOG_FORMATS = ("text", "json")
"""What ``log_format`` accepts."""

SESSION_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "asyncapy_session_id", default=None
)
"""The session the current task serves (set by :func:`log_context`)."""

CLIENT_ADDRESS: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "asyncapy_client_address", default=None
)
"""The client address of the session the current task serves."""

_FIELDS = ("session_id", "client_address", "error_code")


def log_context(session_id: Any, client_address: Optional[str]) -> None:
    """Name the session the current task serves, for every record it logs from now on.

    trio runs each task in a copy of its parent's context, so this marks the calling
    task (a session's) and the tasks it starts, and nothing else. Two context-variable
    writes: call it once per session, not per packet.
    """
    SESSION_ID.set(None if session_id is None else str(session_id))
    CLIENT_ADDRESS.set(client_address)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object on one line."""
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = {"session_id": SESSION_ID.get(), "client_address": CLIENT_ADDRESS.get()}
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is None:
                value = context.get(field)
            if value is not None:
                entry[field] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def make_formatter(log_format: str, console_format: str, datefmt: str) -> logging.Formatter:
    """The formatter of ``log_format``: :class:`JsonFormatter`, or text with
    ``console_format`` and ``datefmt``. ``ValueError`` for another format."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(console_format, datefmt)
    raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure_logging(
    level: int,
    *,
    log_format: str = "text",
    console_format: str = "[%(levelname)s] %(asctime)s %(message)s",
    datefmt: str = "%d/%m/%Y %H:%M:%S %p",
) -> None:
    """Send records to stderr in ``log_format`` (unless the application configured the
    root logger itself, as :func:`logging.basicConfig` would), and set the level of
    the ``asyncapy`` loggers.

    What :meth:`asyncapy.server.Server.configure_logging` does, with the format chosen.
    """
    formatter = make_formatter(log_format, console_format, datefmt)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("asyncapy").setLevel(level)


def configure_server_logging(settings: Any) -> None:
    """:func:`configure_logging` with a server's settings (``logging_level``,
    ``log_format``, ``console_format``, ``datefmt``)."""
    configure_logging(
        settings.logging_level,
        log_format=settings.log_format,
        console_format=settings.console_format,
        datefmt=settings.datefmt,
    )


# -- lines that a flood must not multiply -------------------------------------------------
class LogLimit:
    """At most ``burst`` lines per ``interval`` seconds; the rest are counted.

    A fixed window: the first ``burst`` lines of each window are let through
    (:meth:`allow` is True), the others counted in :attr:`suppressed`, which the next
    line let through reports (:meth:`take_suppressed`), and which the owner reports
    when it is done with it. Used on error paths only."""

    __slots__ = ("burst", "interval", "window_start", "used", "suppressed")

    def __init__(self, burst: int, interval: float) -> None:
        self.burst: int = burst
        self.interval: float = interval
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


class LimitedLog:
    """One kind of line (a refusal, a bad header, a failed handshake) through
    ``logger``, at most ``burst`` per ``interval`` seconds, so that a client opening
    connections in a loop cannot fill the disk: the lines left out are counted, and
    the next line let through ends with ``(N more WHAT since)``; :meth:`report` says
    what is still uncounted when the owner stops. Every per-session and
    per-connection warning of the server goes through one of these."""

    __slots__ = ("logger", "what", "limit")

    def __init__(self, logger: logging.Logger, what: str, burst: int = 1, interval: float = 1.0) -> None:
        self.logger = logger
        self.what: str = what
        """How the suffix names the lines left out (``'refused alike'``)."""
        self.limit: LogLimit = LogLimit(burst, interval)

    def log(self, level: int, message: str, *args: Any, stacklevel: int = 2, **kwargs: Any) -> bool:
        """Log ``message % args`` at ``level`` with the count of lines left out since,
        unless the limit is reached (then only count it); True if it was logged. The
        record names the caller's line, not this one."""
        if not self.logger.isEnabledFor(level):  # a line nobody would see is not counted
            return False
        limit = self.limit
        if not limit.allow():
            return False
        self.logger.log(
            level, message + "%s", *args, limit.take_suppressed(self.what), stacklevel=stacklevel, **kwargs
        )
        return True

    def warning(self, message: str, *args: Any, **kwargs: Any) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, message, *args, stacklevel=3, **kwargs)

    def error(self, message: str, *args: Any, **kwargs: Any) -> bool:
        """:meth:`log` at ERROR."""
        return self.log(logging.ERROR, message, *args, stacklevel=3, **kwargs)

    @property
    def suppressed(self) -> int:
        """Lines left out and not yet reported."""
        return self.limit.suppressed

    def report(self, message: str, *args: Any) -> None:
        """Log ``message % (*args, count)`` as a warning if lines were left out since the
        last one logged, and forget them (when the owner stops)."""
        count = self.limit.suppressed
        if count:
            self.limit.suppressed = 0
            self.logger.warning(message, *args, count)
