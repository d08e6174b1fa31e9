"""What the fuzz campaign checks about one input: the properties, and a model to hold them to.

An input is one config byte followed by a byte stream (see :class:`Config`). The stream
goes through :class:`asyncapy.domain.connection.Connection` twice, whole and cut into random
pieces, and every complete payload through both codecs directly. A broken property
raises :class:`Finding`; anything else :func:`check` lets escape is a finding too.

The properties:

``connection-escape``
    Feeding bytes and asking for events raises nothing: the only outcomes are
    ``Request``, ``ProtocolError`` and ``NEED_DATA``.
``model``
    The events equal those of :func:`model_events`, an independent reading of
    ``protocol.md`` written here from the contract (not from ``asyncapy.domain.framing``): the
    error code, the codec of the reply, whether the session closes, the session's
    sticky encoding, and the decoded fields.
``split``
    The events do not depend on how the stream was cut into reads.
``complete-buffered``
    ``Framer.complete_buffered()`` predicts exactly whether ``next_event()`` has
    something, and ``Framer.buffered`` counts the bytes of the unfinished packet.
``sticky-close``
    After a closing error, the connection keeps returning that same error.
``error-reply``
    Every error reply is one packet of the right layout, version 22, in the reply's
    codec, carrying ``{"status": "failure", "error": CODE}``.
``round-trip``
    Every decoded request re-encodes (``Connection.encode``, in the encoding its
    packet declared) and reads back as equal fields through a fresh connection.
``codec-escape`` / ``codec-type``
    ``decode`` returns a ``dict`` or raises ``CodecError``; nothing else escapes, and
    a decoded value holds only the types of its encoding (no ``datetime`` from a
    MessagePack timestamp, no integer beyond 64 bits from ZiProto).
``codec-round-trip``
    ``decode(encode(decode(p))) == decode(p)`` for every payload ``p`` that decodes.
``json-vs-stdlib``
    The JSON codec accepts exactly what :func:`json.loads` (what AsyncAPY 0.5 peers
    used) accepts as an object, with equal values. A payload too deep for
    ``json.loads`` is not compared.
``engines``
    The accelerated codecs and their pure twins (msgspec and the standard library
    alone) give one verdict, one value and one element count for every payload, and
    both refuse it with ``TooManyElements`` one element short.
``budget``
    The connection is driven with a packet memory budget (ample, so nothing is
    refused for it); once it is closed, the budget is whole again.
``codec-depth``
    Whether a payload is nested too deeply does not depend on the caller's stack: a
    payload that decodes here decodes 40 frames deeper too, and one that ``json.loads``
    accepts is not refused by the JSON codec as too deep.

The ``Framer`` is checked through the ``Connection`` over it: its ``Frame``,
``FramingError`` and ``NEED_DATA`` become the events above.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from typing import Any, Callable, NamedTuple, Optional

from asyncapy.domain.codecs import CODECS_BY_NAME, JSON, MAX_DEPTH, ZIPROTO, Codec, JsonCodec, ZiProtoCodec
from asyncapy.domain.connection import (
    NEED_DATA,
    Connection,
    ProtocolError,
    Request,
    error_payload,
)
from asyncapy.domain.errors import CodecError, TooManyElements
from asyncapy.domain.framing import DEFAULT_MAX_PACKET_SIZE
from asyncapy.domain.limits import MAX_ELEMENTS, PacketMemory

_PURE = {"json": JsonCodec(pure=True), "ziproto": ZiProtoCodec(pure=True)}
"""The codecs on msgspec and the standard library alone, for the ``engines`` property."""

__all__ = [
    "Config",
    "Finding",
    "Outcome",
    "check",
    "config_byte",
    "config_of",
    "model_events",
    "same",
    "LAYOUTS",
]

LAYOUTS = ((4, "big"), (4, "little"), (2, "big"), (2, "little"), (8, "big"), (8, "little"))
"""Header layouts an input can select (index = config bits 0-2; 6 and 7 mean 4/big)."""

MAX_PACKET_SIZES = (DEFAULT_MAX_PACKET_SIZE, 64, 1024, 65535)
"""``max_packet_size`` an input can select (config bits 4-5)."""

SPLITS = ("random", "bytewise", "whole", "random")
"""How the stream is cut into reads (config bits 6-7)."""

BYTEWISE_LIMIT = 4096
"""Longer streams are cut at random instead of byte by byte, to keep inputs cheap."""

PROTOCOL_VERSION = 22
ENCODINGS = {0: "json", 1: "ziproto"}
UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)


class Config(NamedTuple):
    """How one input is run, decoded from its first byte."""

    header_size: int
    byteorder: str
    max_packet_size: int
    default_codec: str
    split: str

    @property
    def layout(self) -> tuple[int, str]:
        return self.header_size, self.byteorder


def config_of(byte: int) -> Config:
    """The :class:`Config` that the config byte ``byte`` selects."""
    header_size, byteorder = LAYOUTS[byte & 7] if byte & 7 < len(LAYOUTS) else LAYOUTS[0]
    return Config(
        header_size,
        byteorder,
        MAX_PACKET_SIZES[(byte >> 4) & 3],
        "ziproto" if byte & 8 else "json",
        SPLITS[(byte >> 6) & 3],
    )


def config_byte(layout_index: int = 0, default_ziproto: bool = False, size_index: int = 0, split_index: int = 0) -> int:
    """The config byte selecting these choices (the inverse of :func:`config_of`)."""
    return layout_index | (8 if default_ziproto else 0) | (size_index << 4) | (split_index << 6)


class Finding(Exception):
    """A broken property. ``check`` names it; the message says what was seen."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"[{check}] {message}")
        self.check = check
        self.message = message


class Outcome(NamedTuple):
    """What an input did, for the campaign's statistics and its feedback loop."""

    signature: tuple
    """The behaviour: event kinds and codes, and the codecs' verdict classes."""
    requests: int
    errors: dict
    """Error replies by code."""
    unrepresentable: int = 0
    """Requests whose values the session's (other) encoding cannot carry."""


# -- comparing values ------------------------------------------------------------------
def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def same(a: Any, b: Any) -> bool:
    """Deep equality that is type-strict (``1``, ``1.0`` and ``True`` differ), treats
    NaN as equal to NaN, keeps the sign of zero, compares maps in order, and never
    recurses (values may be nested a thousand deep)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        kind = type(x)
        if kind is not type(y):
            return False
        if kind is dict:
            if len(x) != len(y):
                return False
            for (kx, vx), (ky, vy) in zip(x.items(), y.items()):
                stack.append((kx, ky))
                stack.append((vx, vy))
        elif kind is list or kind is tuple:
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y))
        elif kind is float:
            if not _same_float(x, y):
                return False
        elif x != y:
            return False
    return True


_JSON_SCALARS = (type(None), bool, int, float, str)
_ZIPROTO_SCALARS = (type(None), bool, int, float, str, bytes)


def foreign_value(obj: Any, codec: Codec) -> Optional[str]:
    """A description of the first value in ``obj`` that ``codec`` cannot carry, or None.

    JSON: null, booleans, numbers, strings, arrays and objects with string keys.
    ZiProto: nil, booleans, integers of 64 bits, float64, str, bin, arrays and maps,
    with scalar keys only (an array or a map as a key is malformed: protocol.md).
    """
    ziproto = codec is ZIPROTO
    scalars = _ZIPROTO_SCALARS if ziproto else _JSON_SCALARS
    stack = [(obj, False)]
    while stack:
        item, is_key = stack.pop()
        kind = type(item)
        if kind is dict and not is_key:
            for key, value in item.items():
                if not ziproto and type(key) is not str:
                    return f"a JSON object key of type {type(key).__name__}"
                stack.append((key, True))
                stack.append((value, False))
        elif kind is list and not is_key:
            stack.extend((value, False) for value in item)
        elif kind in scalars:
            if ziproto and kind is int and not INT64_MIN <= item <= UINT64_MAX:
                return f"the integer {item}, beyond 64 bits"
        else:
            return f"a {kind.__module__}.{kind.__qualname__}"
    return None


# -- the codecs, payload by payload ------------------------------------------------------
def _error_class(exc: BaseException) -> str:
    """A short, digit-free summary of a decoder's message: a behaviour, for feedback."""
    text = "".join("#" if c.isdigit() else c for c in str(exc))
    return text[:48]


def _decode_deeper(codec: Codec, payload: bytes, frames: int = 40) -> Any:
    """``codec.decode(payload)`` from ``frames`` Python frames further down the stack."""
    if frames:
        return _decode_deeper(codec, payload, frames - 1)
    return codec.decode(payload)


def _units(codec: Codec, payload: bytes, limit: int) -> tuple:
    try:
        obj, elements = codec.decode_units(payload, limit)
    except TooManyElements:
        return ("too many",)
    except CodecError:
        return ("error",)
    return ("ok", elements, obj)


def check_engines(codec: Codec, payload: bytes) -> None:
    """The accelerated codec and its pure twin give one verdict, one value and one
    element count, under the packet limit and one element short of what it holds."""
    pure = _PURE[codec.name]
    fast = _units(codec, payload, MAX_ELEMENTS)
    slow = _units(pure, payload, MAX_ELEMENTS)
    if fast[:2] != slow[:2] or (fast[0] == "ok" and not same(fast[2], slow[2])):
        raise Finding("engines", f"{codec.name}: the accelerated engine gives {fast[:2]}, msgspec alone {slow[:2]}")
    if fast[0] == "ok" and fast[1] > 1:
        short = fast[1] - 1
        if _units(codec, payload, short)[0] != "too many" or _units(pure, payload, short)[0] != "too many":
            raise Finding("engines", f"{codec.name}: {fast[1]} elements decode under a limit of {short}")


def check_codec(codec: Codec, payload: bytes, verdicts: list) -> None:
    """Check one payload against one codec (see the module's docstring)."""
    check_engines(codec, payload)
    try:
        obj = codec.decode(payload)
    except CodecError as exc:
        verdicts.append((codec.name, _error_class(exc)))
        if codec is JSON:
            _compare_with_stdlib(payload, None, str(exc))
        return
    except Exception as exc:
        raise Finding("codec-escape", f"{codec.name}.decode raised {type(exc).__name__}: {exc}") from exc
    verdicts.append((codec.name, "ok"))
    if type(obj) is not dict:
        raise Finding("codec-escape", f"{codec.name}.decode returned a {type(obj).__name__}")
    foreign = foreign_value(obj, codec)
    if foreign is not None:
        raise Finding("codec-type", f"{codec.name}.decode produced {foreign}")
    try:
        encoded = codec.encode(obj)
    except CodecError as exc:
        raise Finding("codec-round-trip", f"{codec.name}: a decoded payload does not re-encode: {exc}") from None
    try:
        back = codec.decode(encoded)
    except CodecError as exc:
        raise Finding("codec-round-trip", f"{codec.name}: its own encoding does not decode: {exc}") from None
    if not same(obj, back):
        raise Finding("codec-round-trip", f"{codec.name}: decode(encode(x)) != x")
    try:
        _decode_deeper(codec, payload)
    except CodecError as exc:
        raise Finding(
            "codec-depth",
            f"{codec.name}: a payload that decodes at one stack depth is refused 40 frames "
            f"deeper ({exc})",
        ) from None
    if codec is JSON:
        _compare_with_stdlib(payload, obj)


def _depth(obj: Any) -> int:
    """Nesting depth of maps and arrays (iterative; the top-level map is 1)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            deepest = max(deepest, depth)
            values = item.values() if isinstance(item, dict) else item
            stack.extend((value, depth + 1) for value in values)
    return deepest


def _compare_with_stdlib(payload: bytes, obj: Optional[dict], refusal: str = "") -> None:
    """The JSON codec against ``json.loads``: what AsyncAPY 0.5 peers parsed with."""
    try:
        reference = json.loads(payload.decode("utf-8"))
    except RecursionError:
        return
    except ValueError:  # UnicodeDecodeError, JSONDecodeError, too many digits
        reference = None
    if type(reference) is not dict:
        reference = None
    if obj is None and reference is not None:
        if _depth(reference) > MAX_DEPTH:
            return  # refused on purpose: the codec's fixed depth limit
        raise Finding("json-vs-stdlib", "json.loads accepts an object the JSON codec refuses")
    if obj is not None and reference is None:
        raise Finding("json-vs-stdlib", "the JSON codec accepts a payload json.loads refuses")
    if obj is not None and not same(obj, reference):
        raise Finding("json-vs-stdlib", "the JSON codec and json.loads decode different values")


# -- the model: protocol.md, read independently ------------------------------------------
class ModelResult(NamedTuple):
    events: list
    """Normalised events: ``("request", codec, fields)`` or ``("error", code, codec, close)``."""
    declared: list
    """The encoding each request declared (its session's may differ)."""
    leftover: int
    """Bytes of an unfinished packet at the end (when no closing error)."""
    payloads: list
    """Every complete packet's payload, for the codec checks."""


def model_events(stream: bytes, config: Config, decode: Callable[[str, bytes], Any]) -> ModelResult:
    """The events ``protocol.md`` prescribes for ``stream``.

    ``decode(codec_name, payload)`` gives the fields or raises ``CodecError``; whether a
    payload decodes is the codecs' business, checked on its own in :func:`check_codec`.
    """
    header_size, byteorder = config.layout
    events: list = []
    declared_codecs: list = []
    payloads: list = []
    session: Optional[str] = None
    position = 0
    while True:
        available = len(stream) - position
        if available < header_size:
            return ModelResult(events, declared_codecs, available, payloads)
        length = int.from_bytes(stream[position : position + header_size], byteorder)
        fallback = session or config.default_codec
        if length < 2:
            events.append(("error", "ERR_REQUEST_MALFORMED", fallback, True))
            return ModelResult(events, declared_codecs, 0, payloads)
        if length > config.max_packet_size:
            events.append(("error", "ERR_PACKET_TOO_LARGE", fallback, True))
            return ModelResult(events, declared_codecs, 0, payloads)
        if available < header_size + length:
            return ModelResult(events, declared_codecs, available, payloads)
        version = stream[position + header_size]
        encoding = stream[position + header_size + 1]
        payload = stream[position + header_size + 2 : position + header_size + length]
        payloads.append(payload)
        position += header_size + length
        declared = ENCODINGS.get(encoding)
        if version != PROTOCOL_VERSION or declared is None:
            events.append(("error", "ERR_HEADER_INVALID", declared or fallback, False))
            continue
        if not payload:
            events.append(("error", "ERR_REQUEST_MALFORMED", declared, False))
            continue
        try:
            fields = decode(declared, payload)
        except CodecError:
            events.append(("error", "ERR_REQUEST_MALFORMED", declared, False))
            continue
        if session is None:
            session = declared
        events.append(("request", session, fields))
        declared_codecs.append(declared)


def _normalise(event: Any) -> tuple:
    if type(event) is Request:
        return ("request", event.codec.name, event.fields)
    if type(event) is ProtocolError:
        return ("error", event.code, event.codec.name, event.close)
    raise Finding("connection-escape", f"next_event returned {event!r}")


def _same_events(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[0] != y[0]:
            return False
        if x[0] == "request":
            if x[1] != y[1] or not same(x[2], y[2]):
                return False
        elif x != y:
            return False
    return True


def _describe(events: list) -> str:
    return ", ".join(e[1] if e[0] == "error" else f"request({e[1]})" for e in events) or "nothing"


# -- driving the Connection ----------------------------------------------------------------
def _cuts(length: int, config: Config, rng: random.Random) -> list[int]:
    split = config.split
    if split == "whole" or length == 0:
        return []
    if split == "bytewise" and length <= BYTEWISE_LIMIT:
        return list(range(1, length))
    count = rng.randint(1, min(12, length))
    return sorted(rng.sample(range(1, length + 1), count)) if length > 1 else []


def drive(stream: bytes, config: Config, cuts: list[int]) -> tuple[list, Connection]:
    """Feed ``stream`` cut at ``cuts`` to a fresh Connection; return its events."""
    memory = PacketMemory(1 << 40)  # ample: no packet is refused for it
    connection = Connection(
        config.header_size,
        config.byteorder,
        config.max_packet_size,
        CODECS_BY_NAME[config.default_codec],
        memory,
    )
    try:
        return _drive(connection, stream, cuts)
    finally:
        connection.close()
        if memory.used:
            raise Finding("budget", f"{memory.used} bytes of packet memory held after the session closed")


def _drive(connection: Connection, stream: bytes, cuts: list[int]) -> tuple[list, Connection]:
    framer = connection.framer
    events: list = []
    start = 0
    try:
        for cut in [*cuts, len(stream)]:
            if cut > start:
                connection.receive_data(stream[start:cut])
                start = cut
            while True:
                predicted = framer.complete_buffered()
                event = connection.next_event()
                if (event is not NEED_DATA) != predicted:
                    raise Finding(
                        "complete-buffered",
                        f"complete_buffered() said {predicted} but next_event() gave {event!r}",
                    )
                if event is NEED_DATA:
                    break
                events.append(_normalise(event))
                if type(event) is ProtocolError and event.close:
                    connection.receive_data(b"more bytes after the error")
                    again = connection.next_event()
                    if _normalise(again) != events[-1]:
                        raise Finding("sticky-close", f"after {event!r} came {again!r}")
                    return events, connection
        connection.receive_data(b"")  # end of stream: nothing new may appear
        event = connection.next_event()
        if event is not NEED_DATA:
            raise Finding("model", f"an event after the end of the stream: {event!r}")
    except Finding:
        raise
    except Exception as exc:
        raise Finding("connection-escape", f"{type(exc).__name__}: {exc}") from exc
    return events, connection


def _check_error_reply(code: str, codec_name: str, config: Config, connection: Connection, seen: set) -> None:
    key = (config.layout, code, codec_name)
    if key in seen:
        return
    seen.add(key)
    codec = CODECS_BY_NAME[codec_name]
    data = connection.error_bytes(code, codec)
    header_size, byteorder = config.layout
    length = int.from_bytes(data[:header_size], byteorder)
    if length != len(data) - header_size or data[header_size] != PROTOCOL_VERSION or data[header_size + 1] != codec.code:
        raise Finding("error-reply", f"{code} in {codec_name} is not one well-formed packet: {data!r}")
    if codec.decode(data[header_size + 2 :]) != error_payload(code):
        raise Finding("error-reply", f"{code} in {codec_name} carries the wrong payload: {data!r}")


def _check_round_trip(fields: dict, codec_name: str, config: Config) -> None:
    """A request re-encodes in the encoding its packet declared and reads back equal.

    Not in the session's encoding when that differs: protocol.md hands handlers such a
    packet in the session's encoding, which may not carry its values (bytes in JSON, an
    integer beyond 64 bits or a lone surrogate in ZiProto, an array key in JSON), and
    ``Client.send`` documents the ``CodecError`` then. Those are counted, not findings.
    """
    # A fresh connection with room for any re-encoding: the encoder's ", " and ": "
    # separators can make a compact payload longer than the one received.
    connection = Connection(8, config.byteorder, DEFAULT_MAX_PACKET_SIZE)
    codec = CODECS_BY_NAME[codec_name]
    try:
        data = connection.encode(fields, codec)
    except CodecError as exc:
        raise Finding("round-trip", f"a request decoded in {codec_name} does not re-encode: {exc}") from None
    connection.receive_data(data)
    event = connection.next_event()
    if type(event) is not Request or event.codec is not codec or not same(event.fields, fields):
        raise Finding("round-trip", f"a re-encoded {codec_name} request reads back as {event!r:.200}")
    if connection.next_event() is not NEED_DATA:
        raise Finding("round-trip", "a re-encoded request reads back as more than one packet")


# -- one input ----------------------------------------------------------------------------
def check(data: bytes, seen_replies: Optional[set] = None) -> Outcome:
    """Run every property on one input; raise :class:`Finding` on the first broken one."""
    if not data:
        return Outcome(("empty",), 0, {})
    config = config_of(data[0])
    stream = data[1:]
    rng = random.Random(zlib.crc32(data))  # reproducible: hash() of bytes is salted
    seen = seen_replies if seen_replies is not None else set()

    def decode(name: str, payload: bytes) -> Any:
        try:
            return CODECS_BY_NAME[name].decode(payload)
        except CodecError:
            raise
        except Exception as exc:
            raise Finding("codec-escape", f"{name}.decode raised {type(exc).__name__}: {exc}") from exc

    model = model_events(stream, config, decode)
    # Payloads first: a codec's own fault is then reported as such, not as a
    # disagreement between the connection and the model.
    verdicts: list = []
    for payload in [*model.payloads, stream]:
        if payload:
            check_codec(JSON, payload, verdicts)
            check_codec(ZIPROTO, payload, verdicts)

    whole, connection = drive(stream, config, [])
    if not _same_events(whole, model.events):
        raise Finding(
            "model", f"fed whole: got {_describe(whole)}; protocol.md says {_describe(model.events)}"
        )
    if config.split != "whole":
        pieces, _ = drive(stream, config, _cuts(len(stream), config, rng))
        if not _same_events(pieces, whole):
            raise Finding("split", f"cut into pieces: {_describe(pieces)}; whole: {_describe(whole)}")
    closed = bool(whole) and whole[-1][0] == "error" and whole[-1][3]
    if not closed and connection.framer.buffered != model.leftover:
        raise Finding(
            "complete-buffered",
            f"Framer.buffered is {connection.framer.buffered}, the unfinished packet has {model.leftover} bytes",
        )

    errors: dict = {}
    requests = unrepresentable = 0
    declared = iter(model.declared)
    for event in whole:
        if event[0] == "request":
            requests += 1
            codec_name = next(declared)
            _check_round_trip(event[2], codec_name, config)
            if codec_name != event[1]:
                try:
                    CODECS_BY_NAME[event[1]].encode(event[2])
                except CodecError:
                    unrepresentable += 1
        else:
            errors[event[1]] = errors.get(event[1], 0) + 1
            _check_error_reply(event[1], event[2], config, connection, seen)

    signature = (
        tuple((e[0], e[1]) if e[0] == "error" else ("request",) for e in whole[:8]),
        tuple(sorted(set(verdicts))),
    )
    return Outcome(signature, requests, errors, unrepresentable)
