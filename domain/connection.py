"""The protocol state of one session, sans I/O: bytes in, requests and errors out.

:class:`Connection` wraps a :class:`~domain.framing.Framer` and applies the rest of
AsyncAProto 22 to each frame: the version and encoding bytes, payload decoding, the
session's sticky encoding, and the encoding each error reply must be written in.
The server (a driving adapter) only moves bytes between the socket and this object.

Given a :class:`~domain.limits.PacketMemory` (the server's budget for large packets),
it also does the accounting of the packets above
:data:`~domain.limits.FREE_PACKET_SIZE`: once a header is in, it reserves the packet's
bytes and what its strings may decode to (refusing the packet with
``ERR_PACKET_TOO_LARGE`` before it is buffered when they do not fit), gives its
decoder only the elements that still fit, and holds it all until the server is done
with the request (:meth:`Connection.release`).

Made with ``charge_on_arrival=True`` it charges a large packet's bytes as they arrive
instead of from its header's Content-Length (a header alone costs nothing), and with
an ``owner`` every reservation counts against that owner's share of the budget (see
:mod:`domain.limits`). Both are keyword-only; without them it keeps the accounting of
0.6, reserving from the header.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Union, final

from .codecs import CODECS_BY_CODE, JSON, Codec
from .errors import (
    ERR_HEADER_INVALID,
    ERR_PACKET_TOO_LARGE,
    ERR_REQUEST_MALFORMED,
    CodecError,
    TooManyElements,
)
from .framing import (
    DEFAULT_MAX_PACKET_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Framer,
    FramingError,
    _NeedData,
)
from .limits import ELEMENT_COST, FREE_PACKET_SIZE, MAX_ELEMENTS, STRING_FACTOR, PacketMemory

_BYTES_CHARGED = 1 + STRING_FACTOR
"""Per byte of a large packet, charged from its header on: the byte buffered, and
what its strings may decode to (its elements are charged once decoded)."""

__all__ = ["Request", "ProtocolError", "Connection", "NEED_DATA", "error_payload"]

_tuple_new = tuple.__new__  # Request(...) in one C call, as Framer does for Frame


@final  # so that a type checker narrows ``type(event) is Request`` both ways
class Request(NamedTuple):
    """A valid packet: its decoded payload and the codec the session speaks."""

    fields: dict[str, Any]
    """The decoded payload (always a ``dict``)."""
    codec: Codec
    """The session's codec: the one handlers see, even when this packet declared the
    other valid encoding."""


@final  # so that a type checker narrows ``type(event) is ProtocolError`` both ways
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


def error_payload(code: str) -> dict[str, Any]:
    """The payload of an error reply: ``{"status": "failure", "error": code}``."""
    return {"status": "failure", "error": code}


class Connection:
    """One session's protocol state.

    ``default_codec`` is the codec of error replies sent before the session's encoding
    is known (the ``encoding`` setting; JSON unless configured otherwise). ``memory``
    is the budget large packets are accounted in (None: no accounting; see the module
    docstring).

    :param owner: whose share of ``memory`` this session's packets count against (the
        client's address group); None counts them against the budget only.
    :param charge_on_arrival: charge a large packet as its bytes arrive, never by its
        declared length alone (False: from its header on, as before).
    """

    __slots__ = ("framer", "codec", "default_codec", "memory", "held", "owner", "charge_on_arrival", "_buffering")

    def __init__(
        self,
        header_size: int = 4,
        byteorder: str = "big",
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        default_codec: Codec = JSON,
        memory: Optional[PacketMemory] = None,
        *,
        owner: object = None,
        charge_on_arrival: bool = False,
    ) -> None:
        self.framer: Framer = Framer(header_size, byteorder, max_packet_size)
        self.codec: Optional[Codec] = None
        """The session's codec, fixed by its first valid packet (None before)."""
        self.default_codec: Codec = default_codec
        self.memory: PacketMemory | None = memory
        self.held = 0
        """Bytes of ``memory`` held for the last request handed out (0 for a small
        one): given back by :meth:`release`, or by the next :meth:`next_event`."""
        self.owner: object = owner
        """Whose share of ``memory`` this session's packets count against (None: nobody's)."""
        self.charge_on_arrival: bool = charge_on_arrival
        """Whether a large packet is charged as its bytes arrive (else from its header)."""
        self._buffering = 0
        """Bytes of ``memory`` reserved for the packet being received."""

    @property
    def receiving_large(self) -> bool:
        """True while a packet above the free size is being received (and charged to
        the memory budget): what a deadline for its body watches."""
        return self._buffering > 0

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer."""
        self.framer.receive_data(data)

    def next_event(self) -> Union[Request, ProtocolError, _NeedData]:
        """The next :class:`Request`, :class:`ProtocolError`, or :data:`NEED_DATA`.

        Asking for the next event means the last request is done with: what it held of
        the memory budget is given back first."""
        if self.held:
            self.release()
        frame = self.framer.next_event()
        if frame is NEED_DATA:
            pending = self.framer.pending
            if pending > FREE_PACKET_SIZE and self.memory is not None:
                if self.charge_on_arrival:
                    return self._charge_arrived(pending)
                if not self._buffering:
                    return self._reserve_buffer(pending)
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
            self._drop_buffering()  # the packet is whole, and refused: nothing to hold
            return ProtocolError(
                ERR_HEADER_INVALID,
                declared or self.codec or self.default_codec,
                False,
                f"Protocol-Version {frame.version}, Content-Encoding {frame.encoding}",
            )
        if not frame.payload:
            self._drop_buffering()
            return ProtocolError(ERR_REQUEST_MALFORMED, declared, False, "empty payload")
        if self.memory is not None and len(frame.payload) > FREE_PACKET_SIZE - 2:
            decoded = self._decode_within_budget(frame.payload, declared)
            if type(decoded) is ProtocolError:
                return decoded
            fields = decoded
        else:
            try:
                fields = declared.decode(frame.payload)
            except CodecError as exc:
                return ProtocolError(ERR_REQUEST_MALFORMED, declared, False, str(exc))
        codec = self.codec
        if codec is None:
            codec = self.codec = declared
        return _tuple_new(Request, (fields, codec))

    # -- the memory budget ----------------------------------------------------------
    def release(self) -> None:
        """Give back what the last request held of the memory budget: the server is
        done with it (its handlers returned). Idempotent."""
        if self.held:
            self.memory.release(self.held, self.owner)  # type: ignore[union-attr]
            self.held = 0

    def _drop_buffering(self) -> None:
        if self._buffering:
            self.memory.release(self._buffering, self.owner)  # type: ignore[union-attr]
            self._buffering = 0

    def close(self) -> None:
        """Give back everything this session holds of the memory budget (the request
        handed out and a packet being received): the session is over. Idempotent."""
        self.release()
        if self._buffering:
            self.memory.release(self._buffering, self.owner)  # type: ignore[union-attr]
            self._buffering = 0

    def _reserve_buffer(self, content_length: int) -> Union[ProtocolError, _NeedData]:
        amount = _BYTES_CHARGED * content_length
        if self.memory.reserve(amount, self.owner):  # type: ignore[union-attr]
            self._buffering = amount
            return NEED_DATA
        return self._refuse(content_length, f"{amount} bytes")

    def _charge_arrived(self, content_length: int) -> Union[ProtocolError, _NeedData]:
        """Top the packet's reservation up to what its bytes received so far cost."""
        arrived = min(self.framer.buffered - self.framer.header_size, content_length)
        extra = _BYTES_CHARGED * arrived - self._buffering
        if extra <= 0:
            return NEED_DATA
        if self.memory.reserve(extra, self.owner):  # type: ignore[union-attr]
            self._buffering += extra
            return NEED_DATA
        return self._refuse(content_length, f"{_BYTES_CHARGED * arrived} bytes for {arrived} received")

    def _refuse(self, content_length: int, wanted: str) -> ProtocolError:
        """``ERR_PACKET_TOO_LARGE`` for a packet the budget cannot hold; the stream
        cannot be framed past it (its bytes are not read), so the session closes."""
        self.framer.refuse(ERR_PACKET_TOO_LARGE, content_length)
        memory = self.memory
        whose = ""
        if self.owner is not None:
            whose = f"; this client holds {memory.held_by(self.owner)} of its {memory.owner_limit}"  # type: ignore[union-attr]
        return ProtocolError(
            ERR_PACKET_TOO_LARGE,
            self.codec or self.default_codec,
            True,
            f"Content-Length {content_length}: {wanted} do not fit the packet memory budget "
            f"({memory.used} of {memory.limit} bytes in use{whose})",  # type: ignore[union-attr]
        )

    def _decode_within_budget(self, payload: bytes, declared: Codec) -> Union[dict[str, Any], ProtocolError]:
        """Decode a large payload with only the elements the budget still has room
        for, and hold what it decoded to (estimated) until :meth:`release`."""
        memory: PacketMemory = self.memory  # type: ignore[assignment]
        content_length = len(payload) + 2
        owner = self.owner
        reserved, self._buffering = self._buffering, 0
        full = _BYTES_CHARGED * content_length
        if reserved < full:  # its last bytes (or all of them) came with the last read
            if not memory.reserve(full - reserved, owner):
                memory.release(reserved, owner)
                return self._refuse(content_length, f"{full} bytes")
            reserved = full
        limit = min(MAX_ELEMENTS, max(0, memory.free_for(owner)) // ELEMENT_COST)
        try:
            fields, elements = declared.decode_units(payload, limit)
        except TooManyElements as exc:
            memory.release(reserved, owner)
            if limit < MAX_ELEMENTS:
                memory.refusals += 1
                return self._refuse(content_length, f"more than {limit} elements to decode")
            return ProtocolError(ERR_REQUEST_MALFORMED, declared, False, str(exc))
        except CodecError as exc:
            memory.release(reserved, owner)
            return ProtocolError(ERR_REQUEST_MALFORMED, declared, False, str(exc))
        cost = elements * ELEMENT_COST
        memory.reserve(cost, owner)  # fits: the decoder was allowed no more
        self.held = reserved + cost
        return fields

    def encode(self, fields: Mapping[Any, Any], codec: Codec) -> bytes:
        """The bytes of one packet carrying ``fields`` in ``codec``.

        Raises :class:`~domain.errors.CodecError` if ``fields`` cannot be encoded.
        """
        return self.framer.frame(codec.encode(fields), codec.code)

    def error_bytes(self, code: str, codec: Optional[Codec] = None) -> bytes:
        """The bytes of the error reply ``code`` in ``codec`` (default: the session's)."""
        return self.encode(error_payload(code), codec or self.codec or self.default_codec)
