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
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Any, Mapping

import msgspec

from .errors import CodecError

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

    def decode(self, data: bytes) -> dict:  # pragma: no cover - abstract
        """Parse a whole payload into a ``dict``; raise :class:`CodecError` otherwise."""
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
        self.accelerated = accelerator is not None
        """True when this codec encodes on the C accelerator."""
        if accelerator is not None:
            # Straight to C, as ZiProtoCodec does; the class's encode() (the standard
            # library's encoder) takes what the accelerator does not.
            stdlib_path = partial(JsonCodec.encode, self)
            self.encode = partial(accelerator.encode_json, stdlib_path, MAX_DEPTH)  # type: ignore[method-assign]

    def encode(self, obj: Mapping[Any, Any]) -> bytes:
        try:
            if self._chunks is not None and type(obj) is dict:
                return "".join(self._chunks(obj, 0)).encode("ascii")
            return self._encode(obj).encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            raise CodecError(f"cannot encode as JSON: {exc}") from None

    def decode(self, data: bytes) -> dict:
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
        if _could_nest_beyond(data, _JSON_OPENERS) and _depth_exceeds(obj, MAX_DEPTH):
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
_ZIPROTO_OPENERS = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))


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

# msgspec decodes the MessagePack timestamp extension (type -1) itself, into a
# datetime, without calling ext_hook, whatever ext opcode carries it (fixext 4/8,
# ext 8/16/32). Every such header is followed by the type byte 0xff, so one memchr for
# 0xff rules most payloads out; only those holding the byte get the iterative search.

def _holds_datetime(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
        elif isinstance(item, datetime):
            return True
    return False


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
    msgspec does all of it, with the checks done after decoding. ``pure=True`` makes a
    codec that never uses the accelerator (the tests compare the two).
    """

    name = "ziproto"
    code = 1

    def __init__(self, pure: bool = False) -> None:
        self._msgspec_encode = msgspec.msgpack.Encoder().encode
        self._msgspec_decode = msgspec.msgpack.Decoder(ext_hook=_refuse_extension).decode
        accelerator = None if pure else _speedups
        self.accelerated = accelerator is not None
        """True when this codec runs on the C accelerator."""
        if accelerator is not None:
            # Straight to C: no Python frame between a caller and the engine.
            # The class's encode() (msgspec) takes what the accelerator does not.
            msgspec_path = partial(ZiProtoCodec.encode, self)
            self.encode = partial(accelerator.encode, msgspec_path, MAX_DEPTH)  # type: ignore[method-assign]
            self.decode = partial(accelerator.decode, CodecError, MAX_DEPTH)  # type: ignore[method-assign]

    def encode(self, obj: Mapping[Any, Any]) -> bytes:
        try:
            return self._msgspec_encode(obj)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise CodecError(f"cannot encode as ZiProto: {exc}") from None

    def decode(self, data: bytes) -> dict:
        try:
            obj = self._msgspec_decode(data)
        except CodecError:
            raise
        except (msgspec.DecodeError, RecursionError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed ZiProto: {exc}") from None
        if type(obj) is not dict:
            raise CodecError(f"ZiProto payload is a {type(obj).__name__}, not a map")
        if b"\xff" in data and _holds_datetime(obj):
            raise CodecError("MessagePack extension type -1 is not part of ZiProto")
        if _could_nest_beyond(data, _ZIPROTO_OPENERS) and _depth_exceeds(obj, MAX_DEPTH):
            raise CodecError(f"ZiProto payload nests deeper than {MAX_DEPTH}")
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
