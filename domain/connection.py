"""The protocol state of one session, sans I/O: bytes in, requests and errors out.

:class:`Connection` wraps a :class:`~domain.framing.Framer` and applies the rest of
AsyncAProto 22 to each frame: the version and encoding bytes, payload decoding, the
session's sticky encoding, and the encoding each error reply must be written in.
The server (a driving adapter) only moves bytes between the socket and this object.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Union

from .codecs import CODECS_BY_CODE, JSON, Codec
from .errors import (
    ERR_HEADER_INVALID,
    ERR_REQUEST_MALFORMED,
    CodecError,
)
from .framing import (
    DEFAULT_MAX_PACKET_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Framer,
    FramingError,
    _NeedData,
)

__all__ = ["Request", "ProtocolError", "Connection", "NEED_DATA", "error_payload"]

_tuple_new = tuple.__new__  # Request(...) in one C call, as Framer does for Frame


class Request(NamedTuple):
    """A valid packet: its decoded payload and the codec the session speaks."""

    fields: dict
    """The decoded payload (always a ``dict``)."""
    codec: Codec
    """The session's codec: the one handlers see, even when this packet declared the
    other valid encoding."""


class ProtocolError(NamedTuple):
    """A packet (or the stream) broke the protocol: send ``reply``; close if ``close``."""

    code: str
    """One of the ``ERR_*`` codes."""
    codec: Codec
    """The codec the error reply is written in."""
    close: bool
    """True when the session cannot go on (framing lost)."""
    detail: str
    """What was wrong, for the log (never sent to the client)."""


def error_payload(code: str) -> dict:
    """The payload of an error reply: ``{"status": "failure", "error": code}``."""
    return {"status": "failure", "error": code}


class Connection:
    """One session's protocol state.

    ``default_codec`` is the codec of error replies sent before the session's encoding
    is known (the ``encoding`` setting; JSON unless configured otherwise).
    """

    __slots__ = ("framer", "codec", "default_codec")

    def __init__(
        self,
        header_size: int = 4,
        byteorder: str = "big",
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        default_codec: Codec = JSON,
    ) -> None:
        self.framer = Framer(header_size, byteorder, max_packet_size)
        self.codec: Optional[Codec] = None
        """The session's codec, fixed by its first valid packet (None before)."""
        self.default_codec = default_codec

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer."""
        self.framer.receive_data(data)

    def next_event(self) -> Union[Request, ProtocolError, _NeedData]:
        """The next :class:`Request`, :class:`ProtocolError`, or :data:`NEED_DATA`."""
        frame = self.framer.next_event()
        if frame is NEED_DATA:
            return NEED_DATA
        if type(frame) is FramingError:
            return ProtocolError(
                frame.code,
                self.codec or self.default_codec,
                True,
                f"Content-Length {frame.content_length} cannot be framed",
            )
        declared = CODECS_BY_CODE.get(frame.encoding)
        if frame.version != PROTOCOL_VERSION or declared is None:
            return ProtocolError(
                ERR_HEADER_INVALID,
                declared or self.codec or self.default_codec,
                False,
                f"Protocol-Version {frame.version}, Content-Encoding {frame.encoding}",
            )
        if not frame.payload:
            return ProtocolError(ERR_REQUEST_MALFORMED, declared, False, "empty payload")
        try:
            fields = declared.decode(frame.payload)
        except CodecError as exc:
            return ProtocolError(ERR_REQUEST_MALFORMED, declared, False, str(exc))
        codec = self.codec
        if codec is None:
            codec = self.codec = declared
        return _tuple_new(Request, (fields, codec))

    def encode(self, fields: Mapping[Any, Any], codec: Codec) -> bytes:
        """The bytes of one packet carrying ``fields`` in ``codec``.

        Raises :class:`~domain.errors.CodecError` if ``fields`` cannot be encoded.
        """
        return self.framer.frame(codec.encode(fields), codec.code)

    def error_bytes(self, code: str, codec: Optional[Codec] = None) -> bytes:
        """The bytes of the error reply ``code`` in ``codec`` (default: the session's)."""
        return self.encode(error_payload(code), codec or self.codec or self.default_codec)
