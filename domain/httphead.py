"""The head of an HTTP/1.x request, as the probe and metrics endpoint reads it (sans-I/O).

The endpoint (``asyncapy/probes.py``) answers ``GET`` and ``HEAD`` on three paths,
closes the connection after each response, and never reads a body: all it needs of
a request is its method and path. So this is not a general HTTP parser; it is a strict
reader of a request *head* (request line and header lines up to the empty line),
bounded in size, that refuses anything it does not understand with the status to
answer. Every byte comes from a scraper that may be hostile, so nothing here grows
with the input beyond :data:`MAX_HEAD` bytes and :data:`MAX_HEADERS` lines.
"""

from __future__ import annotations

import re
from typing import Union

import attrs

__all__ = ["MAX_HEAD", "MAX_HEADERS", "BadRequest", "RequestHead", "head_end", "parse_head"]

MAX_HEAD = 8192
"""Largest request head accepted, in bytes (as nginx's default header buffer)."""

MAX_HEADERS = 64
"""Most header lines accepted."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class BadRequest(Exception):
    """The head cannot be served: ``status`` (400, 431, 505) says what to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@attrs.frozen
class RequestHead:
    """A request's method, target and headers (names lower-cased)."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        """The target without its query string (``/metrics?x=1`` -> ``/metrics``)."""
        return self.target.split("?", 1)[0]

    def header(self, name: str, default: str = "") -> str:
        """The value of header ``name`` (case-insensitive; the first if repeated)."""
        name = name.lower()
        for field, value in self.headers:
            if field == name:
                return value
        return default


def head_end(buffer: Union[bytes, bytearray]) -> int:
    """Where the head in ``buffer`` ends (the index after its empty line), or -1 while
    it is incomplete. ``BadRequest(431)`` once more than :data:`MAX_HEAD` bytes came
    without an end."""
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end >= 0:
        return end + 4
    if len(buffer) > MAX_HEAD:
        raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
    return -1


def parse_head(head: Union[bytes, bytearray]) -> RequestHead:
    """The :class:`RequestHead` of ``head`` (through its empty line, as
    :func:`head_end` found it). ``BadRequest`` if it is not a valid HTTP/1.0 or 1.1
    request head within the limits."""
    if len(head) > MAX_HEAD + 4:
        raise BadRequest(431, f"request head larger than {MAX_HEAD} bytes")
    lines = bytes(head).split(b"\r\n")
    if lines[-2:] != [b"", b""]:
        raise BadRequest(400, "request head does not end with an empty line")
    lines = lines[:-2]
    if not lines:
        raise BadRequest(400, "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "request line is not 'METHOD TARGET HTTP/1.x'")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(400, "invalid method")
    if not _TARGET.fullmatch(target):
        raise BadRequest(400, "invalid request target")
    if not _VERSION.fullmatch(version):
        if version.startswith(b"HTTP/"):
            raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise BadRequest(400, "invalid HTTP version")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} header lines")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # A line without a colon, a space before it, or a folded line
            # (obsolete line folding, RFC 9112 section 5.2): refused, never guessed.
            raise BadRequest(400, "invalid header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise BadRequest(400, "invalid header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    decoded_target = target.decode("ascii")
    if not decoded_target.startswith("/"):
        # absolute-form (``http://host/path``), which a proxy may send: keep the path.
        scheme, sep, rest = decoded_target.partition("://")
        if not sep or not scheme.isalpha():
            raise BadRequest(400, "request target is neither a path nor an absolute URL")
        decoded_target = "/" + rest.partition("/")[2]
    return RequestHead(method.decode("ascii"), decoded_target, version.decode("ascii"), tuple(headers))
