"""Exceptions and the protocol's error codes, as the public API exposes them.

``StopPropagation`` keeps a packet from reaching later handler groups; ``RateLimited``,
raised by a filter or handler, answers the packet ``ERR_RATE_LIMITED`` with its
``retry_after`` (the server raises it for its own limits); the ``ERR_*``
constants are the ``error`` values of the server's failure replies
(``{"status": "failure", "error": CODE}``), see ``docs/protocol.md``.
"""

from asyncapy.domain.errors import (
    ALL_CODES,
    ERR_HEADER_INVALID,
    ERR_INTERNAL,
    ERR_PACKET_TOO_LARGE,
    ERR_RATE_LIMITED,
    ERR_REQUEST_MALFORMED,
    ERR_SESSION_LIMIT_REACHED,
    ERR_TIMED_OUT,
    ERR_UNAVAILABLE,
    CodecError,
    RateLimited,
    StopPropagation,
    StoreUnavailable,
)

from .config import ConfigError

__all__ = [
    "StopPropagation",
    "ConfigError",
    "CodecError",
    "StoreUnavailable",
    "RateLimited",
    "ALL_CODES",
    "ERR_REQUEST_MALFORMED",
    "ERR_HEADER_INVALID",
    "ERR_TIMED_OUT",
    "ERR_SESSION_LIMIT_REACHED",
    "ERR_PACKET_TOO_LARGE",
    "ERR_INTERNAL",
    "ERR_UNAVAILABLE",
    "ERR_RATE_LIMITED",
]
