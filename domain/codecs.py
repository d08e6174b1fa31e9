"""Payload codecs: JSON (Content-Encoding 0) and ZiProto (Content-Encoding 1).

Both sit behind one small interface, :class:`Codec`: ``encode(map) -> bytes`` and
``decode(bytes) -> dict``. ``decode`` only ever returns a ``dict``; anything else
(a payload that does not parse, parses to a list, is nested too deeply, has trailing
bytes...) raises :class:`~domain.errors.CodecError`, which the protocol turns into
``ERR_REQUEST_MALFORMED``.

Why these engines:

* **JSON output** must equal what AsyncAPY 0.5 put on the wire, which is
  ``json.dumps(obj)`` with the standard library's defaults (``", "`` and ``": "``
  separators, ASCII escapes). The standard library's C encoder produces exactly that;
  the accelerator below writes the same bytes faster, and hands it whatever it does
  not handle itself. **JSON input** is parsed by msgspec's C decoder (several times
  faster than :func:`json.loads`); a payload msgspec refuses is given to the standard
  library once more, because 0.5 peers may send what only it accepts (``NaN``,
  ``Infinity``).
* **ZiProto** is a MessagePack subset with the same type codes, and msgspec's encoder
  chooses the same smallest representations as the reference ``ziproto.encode``
  (positive ints as positive fixint/uint8..64, float64 for every float, str8 from
  32 bytes, bin8 for bytes), so its output is byte-identical -- and unlike the
  reference decoder it handles containers of any size and rejects unknown type bytes.
  MessagePack extension types are not part of ZiProto and are refused.
* **The fast paths** are ``domain/_speedups.c``, compiled at install time where a C
  compiler is found (:data:`ACCELERATED`). For ZiProto it decodes with the subset's
  rules and the nesting limit applied while parsing (msgspec alone needs a pass over
  the bytes and a walk of the result after it), and encodes the exact built-in types,
  handing anything else to msgspec. For JSON it encodes the exact built-in types
  into bytes directly, byte for byte as ``json.dumps``, handing anything else to the
  standard library. Either way, both engines give the same bytes, values and verdicts.

Decoding is bounded, whatever the payload (see :mod:`domain.limits`): at most
:data:`~domain.limits.MAX_ELEMENTS` elements a packet (``decode_units`` takes a lower
limit and says how many were built), ZiProto map keys are scalars (an array or a map
as a key is refused before it is built: it would decode to a tuple, whose hash can be
made to collide), and a large payload is decoded with the cyclic garbage collector
paused, which otherwise walks every container built so far, again and again.
"""

from __future__ import annotations

import gc
import json
from functools import partial
from types import ModuleType
from typing import Any, Callable, Mapping, Optional

import msgspec

from .errors import CodecError, TooManyElements
from .limits import MAX_ELEMENTS

__all__ = ["Codec", "JSON", "ZIPROTO", "CODECS_BY_CODE", "CODECS_BY_NAME", "codec_named"]


class Codec:
    """One payload encoding: its wire code (0 or 1), its name, and how to (de)serialise.

    Subclasses implement :meth:`encode` and :meth:`decode`; the module-level
    singletons :data:`JSON` and :data:`ZIPROTO` are the two the protocol defines.
    """

    name: str = ""
    code: int = -1

    def encode(self, obj: Mapping[Any, Any]) -> bytes:  # pragma: no cover - abstract
        """Serialise ``obj``; raise :class:`CodecError` when it holds a value the
        encoding cannot represent."""
        raise NotImplementedError

    def decode(self, data: bytes) -> dict[str, Any]:  # pragma: no cover - abstract
        """Parse a whole payload into a ``dict``; raise :class:`CodecError` otherwise
        (:class:`TooManyElements` past :data:`~domain.limits.MAX_ELEMENTS`)."""
        raise NotImplementedError

    def decode_units(self, data: bytes, max_elements: int) -> tuple[dict[str, Any], int]:  # pragma: no cover - abstract
        """``(decode(data), elements)`` with at most ``max_elements`` elements built:
        :class:`TooManyElements` past them (see :mod:`domain.limits`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Codec {self.name} ({self.code})>"


class JsonCodec(Codec):
    """JSON (UTF-8), written exactly as ``json.dumps`` writes it.

    Two encoders, one output. The C accelerator (``domain._speedups``) writes the
    plain built-in types (``dict`` with ``str`` keys, ``list``, ``tuple``, ``str``,
    ``int`` up to 64 bits, ``float``, ``bool``, ``None``) straight into bytes; anything
    else it hands to the standard library's encoder, which writes (or refuses) it as it
    always did. ``pure=True`` makes a codec that never uses the accelerator (the tests
    compare the two). Decoding is msgspec's either way.
    """

    name = "json"
    code = 0

    def __init__(self, pure: bool = False) -> None:
        # The same configuration json.dumps() uses when given no options...
        encoder = json.JSONEncoder()
        self._encode = encoder.encode
        # ...with its C encoder built once: JSONEncoder.encode() builds a new one for
        # every call, which costs as much as encoding a small payload. Built without
        # the markers dict (check_circular=False): one dict shared by every call would
        # be left dirty by a failed call and is not safe across threads. A circular
        # payload still fails, with RecursionError, as a too deeply nested one does.
        make = getattr(json.encoder, "c_make_encoder", None)
        self._chunks = None if make is None else make(
            None,
            encoder.default,
            json.encoder.encode_basestring_ascii,
            encoder.indent,
            encoder.key_separator,
            encoder.item_separator,
            encoder.sort_keys,
            encoder.skipkeys,
            encoder.allow_nan,
        )
        self._fast_decode = msgspec.json.Decoder().decode
        accelerator = None if pure else _speedups
        self.accelerated: bool = accelerator is not None
        """True when this codec encodes on the C accelerator."""
        self._nests_beyond = None
        if accelerator is not None:
            # Straight to C, as ZiProtoCodec does; the class's encode() (the standard
            # library's encoder) takes what the accelerator does not.
            stdlib_path = partial(JsonCodec.encode, self)
            self.encode = partial(accelerator.encode_json, stdlib_path, MAX_DEPTH)  # type: ignore[method-assign]
            self._nests_beyond = partial(accelerator.json_nests_beyond, MAX_DEPTH)

    def encode(self, obj: Mapping[Any, Any]) -> bytes:
        try:
            if self._chunks is not None and type(obj) is dict:
                return "".join(self._chunks(obj, 0)).encode("ascii")
            return self._encode(obj).encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"cannot encode as JSON: {exc}") from None

    def decode(self, data: bytes) -> dict[str, Any]:
        if len(data) >= _GC_PAUSE_AT:
            return self.decode_units(data, MAX_ELEMENTS)[0]
        # _parse() inlined: a small payload's decode is one Python frame, as before.
        try:
            obj = self._fast_decode(data)
        except ValueError:
            obj = self._compatible_decode(data)
        except RecursionError:
            raise CodecError("JSON payload is nested too deeply") from None
        if type(obj) is not dict:
            raise CodecError(f"JSON payload is a {type(obj).__name__}, not an object")
        # _could_nest_beyond's length test first, inline: a small payload (most
        # requests) cannot nest that deep, and pays no call for it.
        if len(data) > MAX_DEPTH and _could_nest_beyond(data, _JSON_OPENERS) and (
            self._nests_beyond(data) if self._nests_beyond is not None else _depth_exceeds(obj, MAX_DEPTH)
        ):
            raise CodecError(f"JSON payload nests deeper than {MAX_DEPTH}")
        return obj

    def decode_units(self, data: bytes, max_elements: int) -> tuple[dict[str, Any], int]:
        """``(decode(data), elements)``, refusing (:class:`TooManyElements`) a payload
        of more than ``max_elements`` elements before it is parsed.

        JSON elements are counted from the bytes, without parsing (:func:`json_elements`):
        exact for a payload with no empty container and none of ``[{,:`` in its
        strings, an upper bound otherwise."""
        elements = json_elements(data)
        if elements > max_elements:
            raise TooManyElements(f"JSON payload holds more than {max_elements} elements")
        if len(data) < _GC_PAUSE_AT or not gc.isenabled():
            return self._parse(data), elements
        gc.disable()
        try:
            return self._parse(data), elements
        finally:
            gc.enable()

    def _parse(self, data: bytes) -> dict[str, Any]:
        try:
            obj = self._fast_decode(data)
        except ValueError:
            # msgspec.DecodeError, and also the UnicodeDecodeError msgspec lets out for
            # invalid UTF-8 inside a string: the standard library gives the verdict.
            obj = self._compatible_decode(data)
        except RecursionError:
            raise CodecError("JSON payload is nested too deeply") from None
        if type(obj) is not dict:
            raise CodecError(f"JSON payload is a {type(obj).__name__}, not an object")
        # _could_nest_beyond's length test first, inline: a small payload (most
        # requests) cannot nest that deep, and pays no call for it.
        if len(data) > MAX_DEPTH and _could_nest_beyond(data, _JSON_OPENERS) and (
            self._nests_beyond(data) if self._nests_beyond is not None else _depth_exceeds(obj, MAX_DEPTH)
        ):
            raise CodecError(f"JSON payload nests deeper than {MAX_DEPTH}")
        return obj

    @staticmethod
    def _compatible_decode(data: bytes) -> Any:
        try:
            return json.loads(bytes(data).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CodecError(f"JSON payload is not valid UTF-8: {exc.reason}") from None
        except ValueError as exc:
            raise CodecError(f"malformed JSON: {exc}") from None
        except RecursionError:
            raise CodecError("JSON payload is nested too deeply") from None


def _refuse_extension(code: int, data: memoryview) -> Any:
    raise CodecError(f"MessagePack extension type {code} is not part of ZiProto")


MAX_DEPTH = 500
"""Deepest nesting of maps and arrays a payload may have (the top-level map is 1).

A fixed limit, well below the interpreter's recursion limit, so that whether a
payload is accepted does not depend on how deep the caller's stack happens to be, and
everything accepted can also be encoded back (an echo never fails for depth)."""

# A payload cannot nest deeper than it has container openers; counting (an upper
# bound) those bytes is one C-speed pass, so only a payload that could exceed the
# limit pays for the iterative depth walk.
_JSON_OPENERS = bytes(b for b in range(256) if b not in b"[{")


def _could_nest_beyond(data: bytes, non_openers: bytes) -> bool:
    return len(data) > MAX_DEPTH and len(data.translate(None, non_openers)) > MAX_DEPTH


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests containers more than ``limit`` deep (iteratively)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        kind = type(item)
        if kind is dict:
            stack.extend((value, depth + 1) for value in item.values() if type(value) in _CONTAINERS)
            stack.extend((key, depth + 1) for key in item if type(key) is tuple)
        elif kind is list or kind is tuple:
            stack.extend((value, depth + 1) for value in item if type(value) in _CONTAINERS)
    return False


_CONTAINERS = (dict, list, tuple)

_GC_PAUSE_AT = 64 * 1024
"""Payloads at least this long are decoded with the cyclic garbage collector paused
(the accelerator's ``GC_PAUSE_AT`` too). A collection walks every container
allocated so far; a payload of a million empty arrays made it run often enough to
cost five times the decoding itself. The containers still count, so the first
collection after the decode walks them once."""

def json_elements(data: bytes) -> int:
    """The elements of a JSON payload as :mod:`domain.limits` counts them, from its
    bytes alone: one, plus each ``[``, ``{``, ``,`` and ``:`` (a C-speed pass).

    Every element but the first is announced by one of those bytes (an array's first
    item by its ``[``, the next ones by ``,``; an object's key likewise, its value by
    ``:``); an empty container and those bytes inside strings make it an upper bound."""
    return 1 + len(data) - len(data.translate(None, b"[{,:"))


# ZiProto type bytes, for the scanner below: how many bytes follow the type byte
# before the next value for a fixed-size scalar...
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# ...and the width of the length of a sized one: (width, is_str).
_SIZED = {0xC4: (1, False), 0xC5: (2, False), 0xC6: (4, False),
          0xD9: (1, True), 0xDA: (2, True), 0xDB: (4, True)}


def _is_container(op: int) -> bool:
    return 0x80 <= op <= 0x9F or 0xDC <= op <= 0xDF


def scan_ziproto(data: bytes, max_depth: int, max_elements: int) -> int:
    """Check a ZiProto payload as the accelerator decodes it, building nothing, and
    count its elements; raise :class:`CodecError` (:class:`TooManyElements` past
    ``max_elements``) at the first fault the accelerator would stop at.

    The msgspec engine runs it before msgspec, which would decode a container map key
    into a tuple (quadratic under colliding hashes) and has no element limit: one
    pass over the bytes that allocates nothing, so what msgspec then builds is
    bounded. It takes the accelerator's steps in the accelerator's order (so the two
    engines give one verdict, an element limit included): per value, the end of the
    payload, the element count, the type byte; per container, the depth, then the
    item count against the bytes left; per map key, that it is not a container.
    """
    end = len(data)
    p = 0
    elements = 0
    remaining: list[int] = []  # items (map: keys and values) left in each open container
    maps: list[bool] = []
    while True:
        if maps and maps[-1] and remaining[-1] % 2 == 0 and p < end and _is_container(data[p]):
            raise CodecError(f"malformed ZiProto: a map key is an array or a map; keys must be scalars (byte {p})")
        if p >= end:
            raise CodecError("malformed ZiProto: the payload is truncated")
        elements += 1
        if elements > max_elements:
            raise TooManyElements(f"malformed ZiProto: more than {max_elements} elements (byte {p})")
        op = data[p]
        p += 1
        count = -1  # items of a container opened here
        is_map = False
        if op <= 0x7F or op >= 0xE0:
            pass
        elif op <= 0x8F:
            count, is_map = op & 0x0F, True
        elif op <= 0x9F:
            count = op & 0x0F
        elif op <= 0xBF:
            p = _take_str(data, p, op & 0x1F)
        elif op in _FIXED:
            p += _FIXED[op]
            if p > end:
                raise CodecError("malformed ZiProto: the payload is truncated")
        elif op in _SIZED:
            width, is_str = _SIZED[op]
            if p + width > end:
                raise CodecError("malformed ZiProto: the payload is truncated")
            size = int.from_bytes(data[p : p + width], "big")
            p += width
            if is_str:
                p = _take_str(data, p, size)
            elif p + size > end:
                raise CodecError("malformed ZiProto: the payload is truncated")
            else:
                p += size
        elif 0xDC <= op <= 0xDF:
            width = 2 if op in (0xDC, 0xDE) else 4
            if p + width > end:
                raise CodecError("malformed ZiProto: the payload is truncated")
            count, is_map = int.from_bytes(data[p : p + width], "big"), op >= 0xDE
            p += width
        elif op == 0xC1:
            raise CodecError(f"malformed ZiProto: 0xc1 is not a type byte (byte {p - 1})")
        else:
            raise CodecError(f"malformed ZiProto: a MessagePack extension type, which is not part of ZiProto (byte {p - 1})")
        if count >= 0:
            if len(remaining) + 1 > max_depth:
                raise CodecError(f"malformed ZiProto: the payload nests too deeply (byte {p})")
            if count > ((end - p) // 2 if is_map else end - p):
                raise CodecError("malformed ZiProto: the payload is truncated")
            if count:
                remaining.append(count * 2 if is_map else count)
                maps.append(is_map)
                continue
        # A value is complete: it fills a slot of the container around it, which may
        # complete that container in turn.
        while remaining:
            remaining[-1] -= 1
            if remaining[-1]:
                break
            remaining.pop()
            maps.pop()
        else:
            break
    if p != end:
        raise CodecError(f"malformed ZiProto: trailing bytes after the value (byte {p})")
    if not 0x80 <= data[0] <= 0x8F and data[0] not in (0xDE, 0xDF):
        raise CodecError("ZiProto payload is not a map")
    return elements


def _take_str(data: bytes, p: int, size: int) -> int:
    end = p + size
    if end > len(data):
        raise CodecError("malformed ZiProto: the payload is truncated")
    try:
        data[p:end].decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"malformed ZiProto: a string is not valid UTF-8 (byte {end})") from None
    return end

_speedups: Optional[ModuleType]
try:
    from . import _speedups
except ImportError:  # not compiled (no C compiler where it was installed)
    _speedups = None

ACCELERATED = _speedups is not None
"""Whether the codecs run on their C accelerator (``domain/_speedups.c``, built at
install time) or on msgspec and the standard library alone; both give the same
bytes, values and verdicts."""


class ZiProtoCodec(Codec):
    """ZiProto: the MessagePack subset of nil, bool, int (64 bits), float, str, bin,
    array and map, big-endian, with MessagePack's type codes.

    Two engines, one behaviour. The C accelerator (``domain._speedups``) decodes every
    payload, enforcing the subset and :data:`MAX_DEPTH` while it parses, and encodes
    the plain built-in types (``dict``, ``list``, ``tuple``, ``str``, ``bytes``,
    ``int``, ``float``, ``bool``, ``None``); anything else it hands to msgspec, which
    encodes (or refuses) it as it always did. Where the accelerator is not built,
    msgspec does all of it, after :func:`scan_ziproto` has checked the payload with the
    accelerator's rules (msgspec alone would build container keys as tuples, and has
    no element limit). ``pure=True`` makes a codec that never uses the accelerator
    (the tests compare the two).
    """

    name = "ziproto"
    code = 1
    _decode_units: Callable[[int, bytes], tuple[dict[str, Any], int]]
    """The accelerator's decode_units with its constants bound (when accelerated)."""

    def __init__(self, pure: bool = False) -> None:
        self._msgspec_encode = msgspec.msgpack.Encoder().encode
        self._msgspec_decode = msgspec.msgpack.Decoder(ext_hook=_refuse_extension).decode
        accelerator = None if pure else _speedups
        self.accelerated: bool = accelerator is not None
        """True when this codec runs on the C accelerator."""
        if accelerator is not None:
            # Straight to C: no Python frame between a caller and the engine.
            # The class's encode() (msgspec) takes what the accelerator does not.
            msgspec_path = partial(ZiProtoCodec.encode, self)
            self.encode = partial(accelerator.encode, msgspec_path, MAX_DEPTH)  # type: ignore[method-assign]
            self.decode = partial(  # type: ignore[method-assign]
                accelerator.decode, CodecError, TooManyElements, MAX_DEPTH, MAX_ELEMENTS
            )
            self._decode_units = partial(accelerator.decode_units, CodecError, TooManyElements, MAX_DEPTH)

    def encode(self, obj: Mapping[Any, Any]) -> bytes:
        try:
            return self._msgspec_encode(obj)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise CodecError(f"cannot encode as ZiProto: {exc}") from None

    def decode(self, data: bytes) -> dict[str, Any]:
        return self.decode_units(data, MAX_ELEMENTS)[0]

    def decode_units(self, data: bytes, max_elements: int) -> tuple[dict[str, Any], int]:
        """``(decode(data), elements)``, refusing (:class:`TooManyElements`) a payload
        of more than ``max_elements`` elements: the accelerator stops building at the
        first element past the limit; msgspec is not called until
        :func:`scan_ziproto` has counted them (and checked the map keys)."""
        if self.accelerated:
            return self._decode_units(max_elements, data)
        elements = scan_ziproto(data, MAX_DEPTH, max_elements)
        if len(data) >= _GC_PAUSE_AT and gc.isenabled():
            gc.disable()
            try:
                return self._msgspec_map(data), elements
            finally:
                gc.enable()
        return self._msgspec_map(data), elements

    def _msgspec_map(self, data: bytes) -> dict[str, Any]:
        try:
            obj = self._msgspec_decode(data)
        except CodecError:
            raise
        except (msgspec.DecodeError, RecursionError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed ZiProto: {exc}") from None
        if type(obj) is not dict:  # pragma: no cover - scan_ziproto refused it already
            raise CodecError(f"ZiProto payload is a {type(obj).__name__}, not a map")
        return obj


JSON = JsonCodec()
"""The JSON codec (Content-Encoding 0)."""

ZIPROTO = ZiProtoCodec()
"""The ZiProto codec (Content-Encoding 1)."""

CODECS_BY_CODE: dict[int, Codec] = {JSON.code: JSON, ZIPROTO.code: ZIPROTO}
"""Content-Encoding byte -> codec."""

CODECS_BY_NAME: dict[str, Codec] = {JSON.name: JSON, ZIPROTO.name: ZIPROTO}
"""``'json'`` / ``'ziproto'`` -> codec."""


def codec_named(name: str) -> Codec:
    """The codec called ``name`` (``'json'`` or ``'ziproto'``); ``ValueError`` otherwise."""
    try:
        return CODECS_BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"encoding must be 'json' or 'ziproto', not {name!r}"
        ) from None
