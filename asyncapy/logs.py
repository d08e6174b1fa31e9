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


def configure_server_logging(server: Any) -> None:
    """:func:`configure_logging` with a server's settings (``logging_level``,
    ``log_format``, ``console_format``, ``datefmt``; ``log_format`` is ``text`` when
    the server has none)."""
    configure_logging(
        server.logging_level,
        log_format=getattr(server, "log_format", "text"),
        console_format=server.console_format,
        datefmt=server.datefmt,
    )
