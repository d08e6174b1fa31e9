"""Sans-I/O framing of AsyncAProto 22: bytes in, frames out; a frame in, bytes out.

A packet on the wire::

    Content-Length (header_size bytes) | Protocol-Version (1) | Content-Encoding (1) | payload

``Content-Length`` counts the two one-byte headers plus the payload. :class:`Framer`
only cuts the byte stream into :class:`Frame` objects; it does not judge the version
or encoding bytes nor decode payloads (that is :mod:`domain.connection`'s job), so the
client can use it to read raw replies too.

The receive buffer is one ``bytearray`` plus a read offset. Consumed bytes are dropped
in bulk, only once they make up more than half of the buffer, so every received byte
is copied O(1) times however the stream is split: a 1 MiB packet arriving in 1 KiB
pieces costs O(n), not O(n^2). A Content-Length above ``max_packet_size`` is refused
from the header alone, before a byte of its payload is buffered.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Literal, NamedTuple, Union, final

from .errors import ERR_PACKET_TOO_LARGE, ERR_REQUEST_MALFORMED

__all__ = [
    "PROTOCOL_VERSION",
    "HEADER_SIZES",
    "BYTEORDERS",
    "DEFAULT_MAX_PACKET_SIZE",
    "Frame",
    "FramingError",
    "NEED_DATA",
    "Framer",
]

PROTOCOL_VERSION = 22
"""The only legal Protocol-Version byte (0x16)."""

HEADER_SIZES = (2, 4, 8)
"""Legal sizes, in bytes, of the Content-Length header (4 is the standard)."""

BYTEORDERS = ("big", "little")
"""Legal byte orders of the Content-Length header (big is the standard)."""

DEFAULT_MAX_PACKET_SIZE = 16 * 1024 * 1024
"""Largest Content-Length accepted by default: 16 MiB."""

_STRUCT_CODES = {2: "H", 4: "I", 8: "Q"}
_tuple_new = tuple.__new__
"""Builds a NamedTuple in one C call (``Frame(...)`` goes through a Python-level
``__new__``): done once per packet on the hot path."""
_COMPACT_AT = 64 * 1024


class Frame(NamedTuple):
    """One complete packet as cut from the stream; nothing validated but its length."""

    version: int
    """The Protocol-Version byte."""
    encoding: int
    """The Content-Encoding byte."""
    payload: bytes
    """Everything after the two one-byte headers."""


@final  # so that a type checker narrows ``type(event) is FramingError`` both ways
class FramingError(NamedTuple):
    """The stream cannot be framed any further: reply with ``code``, then close."""

    code: str
    """``ERR_REQUEST_MALFORMED`` (Content-Length below 2) or ``ERR_PACKET_TOO_LARGE``."""
    content_length: int
    """The offending Content-Length, for the log."""


class _NeedData(enum.Enum):
    # A one-member enum, not a plain object: a type checker then narrows
    # ``event is NEED_DATA`` to the other members of the union (PEP 484's sentinel form).
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    __str__ = __repr__  # printed as before it was an enum


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by :meth:`Framer.next_event` when no complete packet is buffered yet."""


def _check_layout(header_size: int, byteorder: str) -> None:
    if type(header_size) is not int or header_size not in HEADER_SIZES:
        raise ValueError(f"header_size must be one of 2, 4 or 8, not {header_size!r}")
    if byteorder not in BYTEORDERS:
        raise ValueError(f"byteorder must be 'big' or 'little', not {byteorder!r}")


def length_struct(header_size: int, byteorder: str) -> struct.Struct:
    """The precompiled :class:`struct.Struct` of a Content-Length header."""
    _check_layout(header_size, byteorder)
    return struct.Struct((">" if byteorder == "big" else "<") + _STRUCT_CODES[header_size])


class Framer:
    """Cut a byte stream into frames, and frames into bytes.

    Feed it with :meth:`receive_data` whatever the transport delivered, in pieces of
    any size; then call :meth:`next_event` until it returns :data:`NEED_DATA`. After a
    :class:`FramingError` the stream is unframeable and the framer keeps returning the
    same error.
    """

    __slots__ = (
        "header_size",
        "byteorder",
        "max_packet_size",
        "_length",
        "_prefix",
        "_buffer",
        "_offset",
        "_error",
        "_eof",
        "_held",
        "pending",
    )

    def __init__(
        self,
        header_size: int = 4,
        byteorder: str = "big",
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        self._length = length_struct(header_size, byteorder)
        if type(max_packet_size) is not int or max_packet_size < 2:
            raise ValueError(
                f"max_packet_size must be an integer of at least 2, not {max_packet_size!r}"
            )
        self.header_size: int = header_size
        self.byteorder: Literal["big", "little"] = "big" if byteorder == "big" else "little"  # checked above
        self.max_packet_size: int = max_packet_size
        self._prefix = struct.Struct(self._length.format + "BB")
        self._buffer = bytearray()
        self._offset = 0
        self._error: FramingError | None = None
        self._eof = False
        self._held: bytes | None = None
        """A received chunk not copied into the buffer yet (see receive_data)."""
        self.pending: int = 0
        """The Content-Length of the packet being buffered, once its header is in:
        set when :meth:`next_event` returns :data:`NEED_DATA` (0 if the header is
        not complete yet), so that its memory can be reserved before it arrives."""

    # -- receiving -----------------------------------------------------------------
    def receive_data(self, data: Union[bytes, bytearray]) -> None:
        """Append bytes received from the peer (``b""`` is the end of the stream).

        A ``bytes`` chunk that arrives while nothing is buffered is held as it is,
        not copied: when it is exactly one packet (the common case of a client that
        waits for each reply), :meth:`next_event` slices the payload straight out of
        it. Anything else goes into the buffer."""
        if not data:
            self._eof = True
            return
        if self._held is None and not self._buffer and type(data) is bytes:
            self._held = data
        else:
            self._absorb()
            self._buffer += data

    def _absorb(self) -> None:
        if self._held is not None:
            self._buffer += self._held
            self._held = None

    @property
    def buffered(self) -> int:
        """How many received bytes are not consumed yet (the start of a next packet)."""
        self._absorb()
        return len(self._buffer) - self._offset

    def complete_buffered(self) -> bool:
        """True when :meth:`next_event` would not return :data:`NEED_DATA`: a whole
        packet (or an unframeable header) is already buffered. Lets a server batch
        the replies to pipelined requests."""
        if self._error is not None:
            return True
        if self._held is not None:  # _absorb(), the call only when there is a chunk
            self._absorb()
        available = len(self._buffer) - self._offset
        if available < self.header_size:
            return False
        content_length: int
        (content_length,) = self._length.unpack_from(self._buffer, self._offset)
        return (
            content_length < 2
            or content_length > self.max_packet_size
            or available >= self.header_size + content_length
        )

    @property
    def at_eof(self) -> bool:
        """True once :meth:`receive_data` was given ``b""``."""
        return self._eof

    def next_event(self) -> Union[Frame, FramingError, _NeedData]:
        """The next complete :class:`Frame`, a :class:`FramingError`, or :data:`NEED_DATA`."""
        if self._error is not None:
            return self._error
        held = self._held
        if held is not None:
            header_size = self.header_size
            if len(held) >= header_size + 2:
                content_length, version, encoding = self._prefix.unpack_from(held)
                if (
                    header_size + content_length == len(held)
                    and 2 <= content_length <= self.max_packet_size
                ):
                    self._held = None
                    return _tuple_new(Frame, (version, encoding, held[header_size + 2 :]))
            self._absorb()  # not exactly one packet: the general way
        buffer = self._buffer
        offset = self._offset
        available = len(buffer) - offset
        header_size = self.header_size
        if available < header_size:
            self.pending = 0
            return NEED_DATA
        (content_length,) = self._length.unpack_from(buffer, offset)
        if content_length < 2:
            self._error = FramingError(ERR_REQUEST_MALFORMED, content_length)
            return self._error
        if content_length > self.max_packet_size:
            self._error = FramingError(ERR_PACKET_TOO_LARGE, content_length)
            return self._error
        end = offset + header_size + content_length
        if len(buffer) < end:
            self.pending = content_length
            return NEED_DATA
        _, version, encoding = self._prefix.unpack_from(buffer, offset)
        payload = bytes(buffer[offset + header_size + 2 : end])
        if end == len(buffer):
            buffer.clear()
            self._offset = 0
        elif end >= _COMPACT_AT and end * 2 >= len(buffer):
            del buffer[:end]
            self._offset = 0
        else:
            self._offset = end
        return _tuple_new(Frame, (version, encoding, payload))

    def refuse(self, code: str, content_length: int) -> None:
        """Stop framing: from now on :meth:`next_event` returns a :class:`FramingError`
        with ``code``, as for a Content-Length refused from the header (the caller
        refused the packet of ``content_length`` for a reason of its own)."""
        self._error = FramingError(code, content_length)

    # -- sending -------------------------------------------------------------------
    def frame(self, payload: bytes, encoding: int, version: int = PROTOCOL_VERSION) -> bytes:
        """The bytes of one packet carrying ``payload`` with the given header bytes.

        Raises :class:`ValueError` when the payload is too long for a ``header_size``
        Content-Length (65533 bytes with a 2-byte header) or a header byte is not 0-255.
        """
        try:
            return self._prefix.pack(len(payload) + 2, version, encoding) + payload
        except struct.error:
            limit = (1 << (8 * self.header_size)) - 1 - 2
            if len(payload) > limit:
                raise ValueError(
                    f"a payload of {len(payload)} bytes does not fit a {self.header_size}-byte "
                    f"Content-Length (at most {limit} bytes): use a larger header_size"
                ) from None
            raise ValueError(
                f"Protocol-Version and Content-Encoding must be bytes (0-255), "
                f"not {version!r} and {encoding!r}"
            ) from None

    def split(self, raw: bytes) -> tuple[int, int, int, bytes]:
        """``(content_length, version, encoding, payload)`` of one packet's bytes."""
        header_size = self.header_size
        content_length = int.from_bytes(raw[:header_size], self.byteorder)
        return (
            content_length,
            raw[header_size] if len(raw) > header_size else 0,
            raw[header_size + 1] if len(raw) > header_size + 1 else 0,
            bytes(raw[header_size + 2 :]),
        )
