"""JSON and ZiProto codecs: round trips, byte-exact output against references, and refusals."""

from __future__ import annotations

import json
import math

import pytest
import ziproto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain.codecs import CODECS_BY_CODE, CODECS_BY_NAME, JSON, ZIPROTO, codec_named
from asyncapy.domain.errors import CodecError

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Arbitrary bytes are cheap to draw and to refuse: many more of them.
FUZZ = settings(max_examples=1000, deadline=None)

# -- strategies -----------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: JSON carries big ints exactly
    | st.floats(allow_nan=False)  # +-Infinity included: 0.5 peers send them
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=25,
)
json_maps = st.dictionaries(st.text(), json_values, max_size=8)

INT_MIN, UINT_MAX = -(2**63), 2**64 - 1


def ziproto_values(binary=st.binary(), floats=st.floats(allow_nan=False)):  # noqa: B008 - strategies are values
    scalars = st.none() | st.booleans() | st.integers(INT_MIN, UINT_MAX) | floats | st.text() | binary
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5)
        | st.dictionaries(st.text() | st.integers(INT_MIN, UINT_MAX), inner, max_size=5),
        max_leaves=25,
    )


ziproto_maps = st.dictionaries(st.text(), ziproto_values(), max_size=8)
# ziproto 1.0 writes b"" as a bare 0xc4 with no length byte: keep it out of the oracle.
oracle_maps = st.dictionaries(
    st.text() | st.integers(INT_MIN, UINT_MAX),
    ziproto_values(binary=st.binary(min_size=1), floats=st.floats()),
    max_size=8,
)


def reference_ziproto(obj) -> bytes:
    """The reference encoder's bytes (its decoder is broken on 16+ entries: never used)."""
    return bytes(ziproto.encode(obj))


# -- the registry ---------------------------------------------------------------------
def test_codes_and_names():
    assert (JSON.code, JSON.name, ZIPROTO.code, ZIPROTO.name) == (0, "json", 1, "ziproto")
    assert CODECS_BY_CODE == {0: JSON, 1: ZIPROTO}
    assert CODECS_BY_NAME == {"json": JSON, "ziproto": ZIPROTO}
    assert codec_named("json") is JSON and codec_named("ziproto") is ZIPROTO
    for bad in ("JSON", "msgpack", None, ["json"]):
        with pytest.raises(ValueError):
            codec_named(bad)


# -- round trips ----------------------------------------------------------------------
@PROPERTY
@given(json_maps)
def test_json_round_trip(obj):
    assert JSON.decode(JSON.encode(obj)) == obj


@PROPERTY
@given(ziproto_maps)
def test_ziproto_round_trip(obj):
    assert ZIPROTO.decode(ZIPROTO.encode(obj)) == obj


@pytest.mark.parametrize("value", [INT_MIN, -1, 0, 2**63, UINT_MAX, 0.1, -0.0, b"", "", [], {}])
def test_ziproto_round_trip_of_boundaries(value):
    decoded = ZIPROTO.decode(ZIPROTO.encode({"v": value}))
    assert decoded == {"v": value} and type(decoded["v"]) is type(value)


# -- byte-exact output ----------------------------------------------------------------
@PROPERTY
@given(st.dictionaries(st.text() | st.integers(), json_values | st.floats(), max_size=8))
def test_json_encoding_equals_json_dumps(obj):
    assert JSON.encode(obj) == json.dumps(obj).encode("ascii")


def test_json_encoding_separators_and_ascii_escapes():
    assert JSON.encode({"foo": "bar", "n": [1, 2]}) == b'{"foo": "bar", "n": [1, 2]}'
    assert JSON.encode({"é": "日本\U0001f600"}) == b'{"\\u00e9": "\\u65e5\\u672c\\ud83d\\ude00"}'
    assert JSON.encode({"x": float("nan"), "y": float("-inf")}) == b'{"x": NaN, "y": -Infinity}'


@PROPERTY
@given(oracle_maps)
def test_ziproto_encoding_equals_the_reference_encoder(obj):
    assert ZIPROTO.encode(obj) == reference_ziproto(obj)


@pytest.mark.parametrize(
    "value",
    [
        0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, UINT_MAX,
        -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, INT_MIN,
        0.0, 1.5, float("inf"), float("nan"), True, False, None,
        "", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536, "é" * 20,
        b"a", b"a" * 255, b"a" * 256, b"a" * 65536,
        [], [1] * 15, [1] * 16, [1] * 65535, [1] * 65536,
        {}, {str(i): i for i in range(16)}, {i: None for i in range(65536)},
    ],
)
def test_ziproto_encoding_equals_the_reference_at_size_boundaries(value):
    assert ZIPROTO.encode({"k": value}) == reference_ziproto({"k": value})


def test_protocol_md_ziproto_example():
    assert ZIPROTO.encode({"foo": "bar"}) == bytes.fromhex("81a3666f6fa3626172")
    assert ZIPROTO.decode(bytes.fromhex("81a3666f6fa3626172")) == {"foo": "bar"}


# -- ZiProto decoding -----------------------------------------------------------------
@pytest.mark.parametrize("size", [15, 16, 255, 65535, 65536, 70_000])
def test_ziproto_decodes_large_containers(size):
    obj = {"list": list(range(size)), "map": {str(i): i for i in range(size)}}
    assert ZIPROTO.decode(reference_ziproto(obj)) == obj
    top = {str(i): i for i in range(size)}
    assert ZIPROTO.decode(reference_ziproto(top)) == top


def ziproto_refuses(data: bytes) -> CodecError:
    with pytest.raises(CodecError) as info:
        ZIPROTO.decode(data)
    return info.value


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x81\xa3foo", id="truncated-value"),
        pytest.param(b"\x81\xa3foo\xa3ba", id="truncated-str"),
        pytest.param(b"\xde\x00\x10", id="map16-missing-entries"),
        pytest.param(b"\x81\xa1a\xcd\x01", id="truncated-uint16"),
        pytest.param(b"\x80\x00", id="trailing-byte"),
        pytest.param(b"\x81\xa3foo\xa3bar\x81\xa3foo\xa3bar", id="two-maps"),
        pytest.param(b"\xc1", id="0xc1-top"),
        pytest.param(b"\x81\xa1a\xc1", id="0xc1-value"),
        pytest.param(b"\x81\xc1\x01", id="0xc1-key"),
        pytest.param(b"\x81\xa1a\xa2\xff\xfe", id="invalid-utf8-str"),
        pytest.param(b"\x81\x80\x01", id="unhashable-key"),
    ],
)
def test_ziproto_malformed_is_codec_error(data):
    ziproto_refuses(data)


@pytest.mark.parametrize(
    "ext",
    [
        pytest.param(b"\xd4\x05\x00", id="fixext1"),
        pytest.param(b"\xd5\x05\x00\x00", id="fixext2"),
        pytest.param(b"\xd6\x05" + bytes(4), id="fixext4"),
        pytest.param(b"\xd7\x05" + bytes(8), id="fixext8"),
        pytest.param(b"\xd8\x05" + bytes(16), id="fixext16"),
        pytest.param(b"\xc7\x03\x05abc", id="ext8"),
        pytest.param(b"\xc8\x00\x03\x05abc", id="ext16"),
        pytest.param(b"\xc9\x00\x00\x00\x03\x05abc", id="ext32"),
        # Type -1 is the timestamp msgspec would otherwise turn into a datetime.
        pytest.param(b"\xd6\xff" + bytes(4), id="timestamp32"),
        pytest.param(b"\xd7\xff" + bytes(8), id="timestamp64"),
        pytest.param(b"\xc7\x0c\xff" + bytes(12), id="timestamp96"),
        pytest.param(b"\xd4\xff\x00", id="timestamp-bad-length"),
    ],
)
@pytest.mark.parametrize("where", ["value", "in-list", "key-in-array-key"])
def test_ziproto_extension_types_are_refused(ext, where):
    if where == "value":
        data = b"\x81\xa1a" + ext
    elif where == "in-list":
        data = b"\x81\xa1a\x93\x01" + ext + b"\x02"
    else:
        data = b"\x81\x91" + ext + b"\x01"
    ziproto_refuses(data)


def test_ziproto_timestamp_opcode_bytes_inside_ordinary_values_are_fine():
    # 0xd6 / 0xd7 / 0xc7 as data, not opcodes: no false refusal.
    obj = {"u": 0xD6, "v": 0xD7, "w": 0xC7, "b": b"\xd6\xff\x00\x00\x00\x00", "s": "\u05c7"}
    assert ZIPROTO.decode(ZIPROTO.encode(obj)) == obj


@pytest.mark.parametrize(
    "data",
    [b"\x90", b"\x93\x01\x02\x03", b"\x01", b"\xc0", b"\xa3foo", b"\xc4\x01x", b"\xcb" + bytes(8), b"\xc3"],
)
def test_ziproto_top_level_must_be_a_map(data):
    assert "not a map" in str(ziproto_refuses(data))


@pytest.mark.parametrize("depth", [1001, 5000, 200_000])
def test_ziproto_deep_nesting_is_codec_error_not_recursion_error(depth):
    ziproto_refuses(b"\x81\xa1a" + b"\x91" * depth + b"\x90")
    ziproto_refuses(b"\x81\xa1a" + b"\x81\xa1a" * depth + b"\x80")


def test_ziproto_moderate_nesting_decodes():
    data = b"\x81\xa1a" + b"\x91" * 200 + b"\x90"
    value = ZIPROTO.decode(data)["a"]
    for _ in range(200):
        (value,) = value
    assert value == []


@FUZZ
@given(st.binary(max_size=200))
def test_ziproto_arbitrary_bytes_raise_only_codec_error(data):
    try:
        result = ZIPROTO.decode(data)
    except CodecError:
        return
    assert type(result) is dict


@PROPERTY
@given(ziproto_maps, st.data())
def test_ziproto_corrupted_encodings_raise_only_codec_error(obj, data):
    encoded = bytearray(ZIPROTO.encode(obj))
    position = data.draw(st.integers(0, len(encoded) - 1))
    action = data.draw(st.sampled_from(["replace", "truncate", "insert"]))
    byte = data.draw(st.integers(0, 255))
    if action == "replace":
        encoded[position] = byte
    elif action == "truncate":
        del encoded[position:]
    else:
        encoded.insert(position, byte)
    try:
        result = ZIPROTO.decode(bytes(encoded))
    except CodecError:
        return
    assert type(result) is dict


# -- JSON decoding --------------------------------------------------------------------
def json_refuses(data: bytes) -> CodecError:
    with pytest.raises(CodecError) as info:
        JSON.decode(data)
    return info.value


def test_json_nan_and_infinities_are_accepted_for_05_compatibility():
    decoded = JSON.decode(b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": [NaN]}')
    assert math.isnan(decoded["a"]) and math.isnan(decoded["d"][0])
    assert decoded["b"] == math.inf and decoded["c"] == -math.inf


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"a": "\xff"}', id="in-string"),
        pytest.param(b'{"\xc3\x28": 1}', id="in-key"),
        pytest.param(b'{"a": "\xed\xa0\x80"}', id="encoded-surrogate"),
        pytest.param(b'{"a": 1}\xff', id="after-object"),
        pytest.param(b'{"a": NaN, "b": "\xff"}', id="with-nan"),
    ],
)
def test_json_invalid_utf8_is_codec_error(data):
    json_refuses(data)


def test_json_valid_utf8_decodes():
    assert JSON.decode('{"é": "日本\U0001f600"}'.encode()) == {"é": "日本\U0001f600"}


@pytest.mark.parametrize("number", [2**64, 2**64 + 1, -(2**63) - 1, 10**100, -(10**300)])
def test_json_huge_integers_are_exact(number):
    decoded = JSON.decode(b'{"n": %d}' % number)
    assert decoded == {"n": number} and type(decoded["n"]) is int
    assert JSON.decode(b'{"n": %d, "x": NaN}' % number)["n"] == number  # fallback path too


def test_json_duplicate_keys_last_wins():
    assert JSON.decode(b'{"a": 1, "b": 2, "a": 3}') == {"a": 3, "b": 2}
    assert JSON.decode(b'{"a": 1, "a": NaN, "a": 3}') == {"a": 3}


@pytest.mark.parametrize(
    "data",
    [b"[]", b'[{"a": 1}]', b'"a"', b"1", b"null", b"true", b"NaN", b'  ["a"]  '],
)
def test_json_top_level_must_be_an_object(data):
    assert "not an object" in str(json_refuses(data))


@pytest.mark.parametrize(
    "data",
    [
        b"", b"   ", b"{", b'{"a": }', b'{"a": 1,}', b"{'a': 1}", b'{"a": 1} x',
        b'{"a": 1}{"b": 2}', b"\xef\xbb\xbf{}", b'{"a": nan}', b'{"a": 01}', b"\x00",
    ],
)
def test_json_malformed_is_codec_error(data):
    json_refuses(data)


def test_json_whitespace_around_is_fine():
    assert JSON.decode(b' \n\t{"a" : [ 1 , 2 ] }\r\n ') == {"a": [1, 2]}


@pytest.mark.parametrize("depth", [1001, 5000, 200_000])
@pytest.mark.parametrize("prefix", [b"", b'"nan": NaN, '], ids=["fast", "fallback"])
def test_json_deep_nesting_is_codec_error_not_recursion_error(depth, prefix):
    json_refuses(b"{" + prefix + b'"a": ' + b"[" * depth + b"]" * depth + b"}")
    json_refuses(b"{" + prefix + b'"a": ' + b'{"a": ' * depth + b"{}" + b"}" * depth + b"}")


def test_json_moderate_nesting_decodes():
    value = JSON.decode(b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}")["a"]
    for _ in range(199):
        (value,) = value
    assert value == []


@FUZZ
@given(st.binary(max_size=200))
def test_json_arbitrary_bytes_raise_only_codec_error(data):
    try:
        result = JSON.decode(data)
    except CodecError:
        return
    assert type(result) is dict


@PROPERTY
@given(json_maps, st.data())
def test_json_corrupted_encodings_raise_only_codec_error(obj, data):
    encoded = bytearray(JSON.encode(obj))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    try:
        result = JSON.decode(bytes(encoded))
    except CodecError:
        return
    assert type(result) is dict


@PROPERTY
@given(json_maps)
def test_json_decoding_agrees_with_json_loads(obj):
    encoded = json.dumps(obj).encode("ascii")
    assert JSON.decode(encoded) == json.loads(encoded)


# -- encoding refusals ----------------------------------------------------------------
def circular() -> dict:
    obj: dict = {}
    obj["self"] = obj
    return obj


def deep(depth: int) -> dict:
    obj: dict = {}
    for _ in range(depth):
        obj = {"a": obj}
    return obj


@pytest.mark.parametrize(
    "obj",
    [{"a": object()}, {"a": {1, 2}}, {"a": b"bytes"}, circular(), deep(100_000), {(1, 2): 1}],
    ids=["object", "set", "bytes", "circular", "deep", "tuple-key"],
)
def test_json_unencodable_is_codec_error(obj):
    with pytest.raises(CodecError):
        JSON.encode(obj)


@pytest.mark.parametrize(
    "obj",
    [{"a": object()}, {"a": 2**64}, {"a": INT_MIN - 1}, circular(), deep(100_000), {"a": "\ud800"}],
    ids=["object", "too-big", "too-small", "circular", "deep", "lone-surrogate"],
)
def test_ziproto_unencodable_is_codec_error(obj):
    with pytest.raises(CodecError):
        ZIPROTO.encode(obj)


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)
