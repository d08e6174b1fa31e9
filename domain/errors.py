"""Error codes of AsyncAProto 22 and the exceptions of the pure core.

Every error the server sends is an ordinary packet whose payload is
``{"status": "failure", "error": CODE}``; the codes are these constants.
"""

ERR_REQUEST_MALFORMED = "ERR_REQUEST_MALFORMED"
"""The payload does not decode in the declared encoding, is not a map, or is empty."""

ERR_HEADER_INVALID = "ERR_HEADER_INVALID"
"""Protocol-Version is not 22, or Content-Encoding is neither 0 nor 1."""

ERR_TIMED_OUT = "ERR_TIMED_OUT"
"""No complete packet arrived for ``timeout`` seconds; the session is closed."""

ERR_SESSION_LIMIT_REACHED = "ERR_SESSION_LIMIT_REACHED"
"""The client's address already holds ``session_limit`` live sessions."""

ERR_PACKET_TOO_LARGE = "ERR_PACKET_TOO_LARGE"
"""Content-Length exceeds the server's ``max_packet_size``; the session is closed."""

ERR_INTERNAL = "ERR_INTERNAL"
"""A handler (or one of its filters) raised; the traceback goes to the log only."""

ERR_UNAVAILABLE = "ERR_UNAVAILABLE"
"""A store could not be reached: to admit a new session (which is then closed), or
for a packet's dispatch (an API-key check, ``get_sessions()``), which goes no further."""

ERR_RATE_LIMITED = "ERR_RATE_LIMITED"
"""The packet is over a rate limit (its client address's, its API key's) or its
address made too many failed API-key checks: it goes no further, the session stays
open. The reply may carry ``"retry_after"``, seconds until a packet would be allowed
(see :func:`~domain.ratelimit.rate_limited_payload`)."""

ALL_CODES = (
    ERR_REQUEST_MALFORMED,
    ERR_HEADER_INVALID,
    ERR_TIMED_OUT,
    ERR_SESSION_LIMIT_REACHED,
    ERR_PACKET_TOO_LARGE,
    ERR_INTERNAL,
    ERR_UNAVAILABLE,
    ERR_RATE_LIMITED,
)


class StopPropagation(Exception):
    """Raised by a handler to keep the current packet from reaching later groups.

    ``packet.stop_propagation()`` raises it for you. Stopping propagation does not
    close the session: the next packet is dispatched from the lowest group again.
    """


class CodecError(ValueError):
    """A payload could not be decoded (or is not a map), or a value cannot be encoded."""


class StoreUnavailable(RuntimeError):
    """A store adapter cannot reach its backend right now.

    Adapters raise it (and only it) for connectivity failures, so that the server can
    fail closed with ``ERR_UNAVAILABLE`` instead of crashing or admitting blindly.
    """


class TooManyElements(CodecError):
    """A payload holds more elements than its decoder was allowed to build.

    A :class:`CodecError` like any other verdict on a payload (``ERR_REQUEST_MALFORMED``)
    when the limit was :data:`~domain.limits.MAX_ELEMENTS`, the fixed cap of a packet;
    :class:`~domain.connection.Connection` tells it apart when the limit was lower
    because the process's :class:`~domain.limits.PacketMemory` had no more room
    (``ERR_PACKET_TOO_LARGE``).
    """


class RateLimited(Exception):
    """Raised (by a filter, a handler, the serving layer) when a packet is over a limit:
    its dispatch ends with ``ERR_RATE_LIMITED`` and ``retry_after``, never a traceback
    (see :class:`~domain.dispatch.HandlerFailed`).

    :param retry_after: seconds until a packet would be allowed (0: unknown).
    :param limit: which limit refused it (``"address"``, ``"key"``, ``"key_failures"``...),
        for the log and a metric's label.
    """

    def __init__(self, retry_after: float = 0.0, limit: str = "") -> None:
        self.retry_after = float(retry_after)
        self.limit = limit
        which = f"the {limit} rate limit" if limit else "a rate limit"
        super().__init__(f"over {which}; retry after {self.retry_after:g}s")
