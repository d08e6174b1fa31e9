"""The seed corpus, the tokens mutations insert, and random valid packets.

Seeds are valid packets of both encodings in every header layout, alone and pipelined,
and the edge cases the protocol and the codecs must survive: boundary integers
(uint64 max, int64 min, JSON's 10**400), nesting at and beyond the decoders' limit,
duplicate keys, invalid UTF-8, every MessagePack extension form, absurd container
lengths, wrong versions and encodings, Content-Length 0, 1 and huge. Each seed is a
config byte (see :func:`fuzz.oracle.config_of`) followed by the stream.
"""

from __future__ import annotations

import math
import random
from typing import Any

from asyncapy.domain.codecs import JSON, ZIPROTO
from asyncapy.domain.errors import CodecError

from . import attacks
from .oracle import LAYOUTS, config_byte

__all__ = ["frame", "corpus", "random_packet", "random_value", "TOKENS", "INTERESTING_INTS"]

JSON_CODE, ZIPROTO_CODE = 0, 1

INTERESTING_INTS = (
    0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
    2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
)  # fmt: skip
"""Values written over length fields and integers."""


def frame(payload: bytes, encoding: int, version: int = 22, layout: tuple = (4, "big"), length: Any = None) -> bytes:
    """One packet built by hand (``length`` overrides the true Content-Length)."""
    header_size, byteorder = layout
    if length is None:
        length = len(payload) + 2
    length &= (1 << (8 * header_size)) - 1
    return length.to_bytes(header_size, byteorder) + bytes([version & 0xFF, encoding & 0xFF]) + payload


def _deep_json(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return b'{"a": ' + opener * depth + closer * depth + b"}"


def _deep_json_objects(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def _deep_ziproto(depth: int, opener: bytes = b"\x91", leaf: bytes = b"\x90") -> bytes:
    return b"\x81\xa1a" + opener * depth + leaf


def _every_extension_form() -> list[bytes]:
    """Every MessagePack extension opcode with the lengths a timestamp may have, of
    type 5 and of type -1 (the timestamp): none of them is ZiProto."""
    forms = []
    for kind in (b"\x05", b"\xff"):
        for opcode, size in ((b"\xd4", 1), (b"\xd5", 2), (b"\xd6", 4), (b"\xd7", 8), (b"\xd8", 16)):
            forms.append(b"\x81\xa1a" + opcode + kind + bytes(size))
        for size in (0, 4, 8, 12):
            forms.append(b"\x81\xa1a\xc7" + bytes([size]) + kind + bytes(size))
            forms.append(b"\x81\xa1a\xc8" + size.to_bytes(2, "big") + kind + bytes(size))
            forms.append(b"\x81\xa1a\xc9" + size.to_bytes(4, "big") + kind + bytes(size))
    return forms


JSON_PAYLOADS = [
    b'{"foo": "bar"}',
    b"{}",
    b'{"a": null, "b": true, "c": false, "d": 1.5, "e": -0.0, "f": "\\u00e9\\ud83d\\ude00"}',
    b'{"a": 1, "b": 2, "a": 3}',
    b'{"a": NaN, "b": Infinity, "c": -Infinity}',
    b'{"n": 1e400, "m": -1e400, "t": 5e-324}',
    b'{"n": %d}' % 10**400,
    b'{"n": %d}' % -(10**400),
    b'{"n": %d, "x": NaN}' % 10**400,
    b'{"n": 1' + b"0" * 4299 + b"}",
    b'{"n": 1' + b"0" * 4300 + b"}",
    b'{"n": 18446744073709551615, "m": 18446744073709551616, "k": -9223372036854775809}',
    b'  \n{"ws" : [ 1 , 2 ]}\t ',
    b'{"s": "\\ud800", "t": "\\udfff\\ud800"}',
    b'{"a": "\xff"}',
    b'{"\xc3\x28": 1}',
    b'{"a": "\xed\xa0\x80"}',
    b"\xef\xbb\xbf{}",
    b'{"a": 1}\xff',
    b'{"a": 1} {"b": 2}',
    b'[{"a": 1}]',
    b'"text"',
    b"null",
    b'{"a": ',
    b'{"a": [1, 2, {"b": [3, {"c": null}]}]}',
    b'{"a": 01}',
    b'{"a": .5}',
    b'{"a": "\\x41"}',
    b'{"a": "\x01"}',
    _deep_json(50),
    _deep_json(500),
    _deep_json(960),
    _deep_json(980),
    _deep_json(993),
    _deep_json(1000),
    _deep_json(1001),
    _deep_json(5000),
    _deep_json_objects(990),
    _deep_json_objects(1001),
    b'{"a": ' + b"[" * 100_000,
    attacks.json_arrays(30_000),
    attacks.json_objects(30_000),
    b'{"a": "[{,:[{,:", "b": [[], {}], ":": ","}',  # structural bytes inside strings
]

ZIPROTO_PAYLOADS = [
    b"\x81\xa3foo\xa3bar",
    b"\x80",
    b"\x81\xa1n\xcf" + b"\xff" * 8,  # uint64 max
    b"\x81\xa1n\xd3\x80" + b"\x00" * 7,  # int64 min
    b"\x81\xa1n\xcf\xff\xff",  # uint64, truncated
    b"\x81\xa1n\xd3\x80",  # int64, truncated
    b"\x82\xa1a\x01\xa1a\x02",  # duplicate keys
    b"\x81\x91\x01\x01",  # an array as a key
    b"\x81\x91\x90\x01",  # an array holding an array, as a key
    b"\x81\x80\x01",  # a map as a key
    b"\x81\xc4\x01a\x01",  # bin as a key
    b"\x81\xc0\x01",  # nil as a key
    b"\x81\xcb\x7f\xf8" + bytes(6) + b"\x01",  # NaN as a key
    b"\x81\xa1f\xca\x3f\xc0\x00\x00",  # float32
    b"\x81\xa1s\xa2\xff\xfe",  # str with invalid UTF-8
    b"\x81\xa1s\xa3\xed\xa0\x80",  # str holding an encoded surrogate
    b"\x81\xa1b\xc4\x00",  # empty bin
    b"\x81\xa1b\xc4",  # bin8 with no length
    b"\xc1",  # never used
    b"\x81\xa1a\xc1",
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 billion entries
    b"\x81\xa1a\xdd\xff\xff\xff\xff",  # array32 of 4 billion
    b"\x81\xa1a\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\x81\xa1a\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xde\x00\x10" + b"".join(bytes([0xA1, 0x61 + i, i]) for i in range(16)),  # map16 of 16
    b"\x92\x01\x02",
    b"\x2a",
    b"\x81\xa1a\x81\xa1b\x81\xa1c\x90",
    b"\x81\xa1a\xd4\x01\x00",  # fixext1
    b"\x81\xa1a\xd5\x02\x00\x00",  # fixext2
    b"\x81\xa1a\xd6\xff" + bytes(4),  # timestamp 32
    b"\x81\xa1a\xd7\xff" + bytes(8),  # timestamp 64
    b"\x81\xa1a\xc7\x0c\xff" + bytes(12),  # timestamp 96
    b"\x81\xa1a\xd8\x05" + bytes(16),  # fixext16
    b"\x81\xa1a\xc7\x04\x05" + bytes(4),  # ext8, type 5
    b"\x81\xa1a\xc8\x00\x08\x05" + bytes(8),  # ext16, type 5
    b"\x81\xa1a\xc9\x00\x00\x00\x04\x05" + bytes(4),  # ext32, type 5
    b"\x81\xa1a\xc7\x00\x05",  # ext8 of length 0
    *_every_extension_form(),
    _deep_ziproto(50),
    _deep_ziproto(500),
    _deep_ziproto(960),
    _deep_ziproto(980),
    _deep_ziproto(990),
    _deep_ziproto(1001),
    _deep_ziproto(5000),
    _deep_ziproto(1001, b"\x81\xa1a", b"\x80"),
    b"\x81\xa1a" + b"\x91" * 100_000,
    # Issue 17: container keys of every form (tuples whose hash collides), amplification.
    attacks.colliding_keys(64),
    b"\x81\xdc\x00\x01\x01\x01",  # array16 as a key
    b"\x81\xdd\x00\x00\x00\x00\x01",  # array32 as a key
    b"\x81\xde\x00\x00\x01",  # map16 as a key
    b"\x81\xa1a\x92\x01\x81\x91\x01\x02",  # a container key, nested
    b"\x82\x01\x02\x90\x03",  # the second key a container
    attacks.ziproto_arrays(20_000),
    attacks.ziproto_maps(20_000),
    b"\x81\xa1a\xdd\x00\x00\x4e\x20" + b"\xe0" * 20_000,  # negative fixints
]


# -- random valid values ------------------------------------------------------------------
def _random_text(rng: random.Random) -> str:
    size = rng.choice((0, 1, 5, 31, 32, 33, 255, 256))
    alphabet = rng.choice(("ab", "azAZ09 \"\\/", "é日\U0001f600\u2028\x00\x1f", "\ud800x"))
    return "".join(rng.choice(alphabet) for _ in range(size))


def _random_scalar(rng: random.Random, ziproto: bool) -> Any:
    kind = rng.randrange(7 if ziproto else 6)
    if kind == 0:
        return rng.choice((None, True, False))
    if kind == 1:
        value = rng.choice(INTERESTING_INTS) + rng.choice((-1, 0, 0, 1))
        value = -value if rng.random() < 0.4 else value
        if ziproto:
            value = max(-(2**63), min(2**64 - 1, value))
        elif rng.random() < 0.1:
            value = rng.choice((10**400, -(10**400), 2**200))
        return value
    if kind == 2:
        return rng.choice((0.0, -0.0, 1.5, -2.25, 1e308, 5e-324, math.inf, -math.inf, math.nan, rng.random()))
    if kind in (3, 4):
        return _random_text(rng)
    if kind == 5:
        return rng.randrange(-100, 100)
    return bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 16, 300))))


def random_value(rng: random.Random, ziproto: bool, budget: int = 20) -> Any:
    """A random value either encoding can carry (bytes and 64-bit ints for ZiProto only)."""
    roll = rng.random()
    if budget <= 0 or roll < 0.5:
        return _random_scalar(rng, ziproto)
    if roll < 0.7:
        return [random_value(rng, ziproto, budget // 3) for _ in range(rng.randrange(4))]
    if roll < 0.98:
        return random_map(rng, ziproto, budget // 3)
    chain: Any = _random_scalar(rng, ziproto)
    for _ in range(rng.choice((100, 900, 985, 990, 995))):
        chain = [chain]
    return chain


def random_map(rng: random.Random, ziproto: bool, budget: int = 20) -> dict:
    """A random map: string keys, and for ZiProto sometimes ints, nil or bin keys."""
    result: dict = {}
    for _ in range(rng.choice((0, 1, 2, 3, 15, 16))):
        key: Any = _random_text(rng)
        if ziproto and rng.random() < 0.2:
            key = rng.choice((rng.randrange(-5, 300), None, b"k", 2**64 - 1))
        result[key] = random_value(rng, ziproto, budget)
    return result


def random_packet(rng: random.Random, layout: tuple) -> bytes:
    """A valid packet (most of the time: an encoder may refuse, then b"") of either encoding."""
    ziproto = rng.random() < 0.5
    codec = ZIPROTO if ziproto else JSON
    try:
        payload = codec.encode(random_map(rng, ziproto))
    except CodecError:
        return b""
    if len(payload) + 2 >= 1 << (8 * layout[0]):
        return b""
    return frame(payload, codec.code, layout=layout)


# -- tokens for mutations --------------------------------------------------------------------
TOKENS = [
    b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b'{"a": ', b"[" * 64, b"[" * 1000,
    b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-0", b"0" * 400, b"9" * 4301,
    b"\\ud800", b"\\u0000", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"true", b"null",
    b"\x16\x00", b"\x16\x01", b"\x15\x00", b"\x16\x02", b"\x00\x00", b"\x00\x00\x00\x02", b"\x00\x00\x00\x01",
    b"\xc0", b"\xc1", b"\xc2", b"\xc3", b"\xcf" + b"\xff" * 8, b"\xd3\x80" + bytes(7), b"\xcb" + b"\x7f\xf8" + bytes(6),
    b"\xca", b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xde\xff\xff", b"\xdf\xff\xff\xff\xff",
    b"\xd9\xff", b"\xda\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc4\xff", b"\xc5\xff\xff", b"\xc6\xff\xff\xff\xff",
    b"\xd4\xff", b"\xd5\xff", b"\xd6\xff", b"\xd7\xff", b"\xd8\xff", b"\xc7\x04\xff", b"\xc7\x08\xff",
    b"\xc7\x0c\xff", b"\xc8\x00\x04\xff", b"\xc9\x00\x00\x00\x08\xff", b"\x91" * 64, b"\x91" * 1000,
    b"\x81\xa1a", b"\x90", b"\x80", b"\xa0",
]  # fmt: skip
"""Byte strings a mutation may insert or write over the input."""


# -- the corpus --------------------------------------------------------------------------------
def corpus() -> list[bytes]:
    """Every seed: a config byte, then the stream."""
    seeds: list[bytes] = []
    rng = random.Random(22)

    def add(stream: bytes, layout_index: int = 0, **choices: Any) -> None:
        seeds.append(bytes([config_byte(layout_index, **choices)]) + stream)

    for index, layout in enumerate(LAYOUTS):
        fits = [p for p in JSON_PAYLOADS if len(p) + 2 < 1 << (8 * layout[0])]
        zfits = [p for p in ZIPROTO_PAYLOADS if len(p) + 2 < 1 << (8 * layout[0])]
        for payload in fits:
            add(frame(payload, JSON_CODE, layout=layout), index)
        for payload in zfits:
            add(frame(payload, ZIPROTO_CODE, layout=layout), index, default_ziproto=True)
        good_json = frame(b'{"foo": "bar"}', JSON_CODE, layout=layout)
        good_zi = frame(b"\x81\xa3foo\xa3bar", ZIPROTO_CODE, layout=layout)
        # Pipelined, sessions of either encoding, errors in between; every split mode.
        for split in range(4):
            add(good_json + good_zi + good_json, index, split_index=split)
            add(good_zi + frame(b"{}", 7, layout=layout) + good_json, index, split_index=split)
            add(frame(b'{"a": 1}', JSON_CODE, 21, layout) + good_json + frame(b"", ZIPROTO_CODE, layout=layout), index, split_index=split)
        # Header edge cases: wrong version or encoding, Content-Length 0, 1, 2, huge, short.
        add(frame(b'{"a": 1}', JSON_CODE, 0, layout), index)
        add(frame(b"\x80", ZIPROTO_CODE, 23, layout), index)
        add(frame(b"\x80", 2, 0, layout), index, default_ziproto=True)
        add(frame(b"{}", 255, 255, layout), index)
        add(frame(b"", JSON_CODE, layout=layout), index)
        for length in (0, 1, 2, 3, 65, 1025, 65536, 2**32 - 1, 2**64 - 1):
            add(good_json + frame(b"", JSON_CODE, layout=layout, length=length), index, size_index=index % 4)
            add(good_zi + frame(b"\x80", ZIPROTO_CODE, layout=layout, length=length) + good_json, index, size_index=2)
        add(good_json[: layout[0] - 1], index)
        add(good_json + good_json[: layout[0] + 3], index)
        add(frame(b'{"x": "' + b"y" * 60 + b'"}', JSON_CODE, layout=layout), index, size_index=1)
        for _ in range(8):
            add(b"".join(random_packet(rng, layout) for _ in range(rng.randrange(1, 4))), index, split_index=rng.randrange(4))
    add(b"")
    add(bytes(range(256)))
    add(b"\xff" * 64)
    return seeds
