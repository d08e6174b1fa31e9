"""The ZiProto codec's two engines, the C accelerator and msgspec alone, must be one
codec: the same bytes for every value, the same value for every payload, the same
verdict (a dict, or CodecError) for every byte string.

``ZIPROTO`` runs on the accelerator (``domain/_speedups.c``, built by ``pip install``);
``PURE`` never does. The rest of the codec tests (test_codecs.py) run against
``ZIPROTO``; these compare the two, on hypothesis' values and bytes, on corruptions of
valid payloads, and on the edges where the accelerator hands over to msgspec.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain import codecs
from asyncapy.domain.codecs import MAX_DEPTH, ZIPROTO, ZiProtoCodec
from asyncapy.domain.errors import CodecError, TooManyElements
from asyncapy.domain.limits import MAX_ELEMENTS

from .test_codecs import INT_MIN, UINT_MAX, ziproto_maps, ziproto_values

PURE = ZiProtoCodec(pure=True)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=3000, deadline=None)


def test_the_accelerator_is_built():
    assert codecs.ACCELERATED and ZIPROTO.accelerated, (
        "asyncapy.domain._speedups (the codecs' C accelerator) was not compiled: "
        "install a C compiler and the Python headers (Debian: apt-get install gcc "
        "python3-dev), then reinstall (pip install -e .)"
    )
    assert not PURE.accelerated


def verdict(codec: ZiProtoCodec, data: bytes, max_elements: int = MAX_ELEMENTS):
    """("ok", (value, elements)), ("too many", None) or ("error", None): what ``codec``
    makes of ``data`` when it may decode ``max_elements`` elements."""
    try:
        return "ok", codec.decode_units(data, max_elements)
    except TooManyElements:
        return "too many", None
    except CodecError:
        return "error", None


def same_value(a, b) -> bool:
    """Equal, with the same types all the way down (a tuple key is not a list, 1 is not
    1.0 or True), and NaN equal to NaN. Iterative: payloads nest 500 deep."""
    stack = [(a, b)]
    while stack:
        a, b = stack.pop()
        if type(a) is not type(b):
            return False
        if type(a) is dict:
            if len(a) != len(b) or list(map(type, a)) != list(map(type, b)):
                return False
            for key, value in a.items():
                if key not in b:
                    return False
                stack.append((value, b[key]))
            stack.extend(zip(a, b))  # the keys themselves, in order
        elif type(a) in (list, tuple):
            if len(a) != len(b):
                return False
            stack.extend(zip(a, b))
        elif type(a) is float and math.isnan(a):
            if not math.isnan(b):
                return False
        elif a != b:
            return False
    return True


def assert_agree(data: bytes, max_elements: int = MAX_ELEMENTS) -> None:
    fast, pure = verdict(ZIPROTO, data, max_elements), verdict(PURE, data, max_elements)
    assert fast[0] == pure[0], (data.hex(), fast, pure)
    assert same_value(fast[1], pure[1]), (data.hex(), fast, pure)


# -- encoding -------------------------------------------------------------------------
@PROPERTY
@given(ziproto_maps)
def test_both_engines_encode_every_value_alike(obj):
    assert ZIPROTO.encode(obj) == PURE.encode(obj)


@PROPERTY
@given(st.dictionaries(st.text() | st.integers(INT_MIN, UINT_MAX), ziproto_values(floats=st.floats()), max_size=20))
def test_both_engines_round_trip_each_others_bytes(obj):
    data = PURE.encode(obj)
    assert same_value(ZIPROTO.decode(data), PURE.decode(data))
    assert ZIPROTO.encode(ZIPROTO.decode(data)) == data


@pytest.mark.parametrize(
    "value",
    [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
     -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
     0.0, -0.0, 1.5, float("inf"), float("-inf"), 1e308, 5e-324,
     "", "a", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65535, "x" * 65536, "é", "\U0001f600" * 9,
     b"", b"x", b"x" * 255, b"x" * 256, b"x" * 65536,
     [], [1] * 15, [1] * 16, [1] * 65535, [1] * 65536, (1, 2), {}, {i: i for i in range(16)},
     {i: i for i in range(65536)}, None, True, False],
)
def test_both_engines_encode_the_boundaries_alike(value):
    assert ZIPROTO.encode({"k": value}) == PURE.encode({"k": value})


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(Color.RED, id="int-subclass"),
        pytest.param(Name("x"), id="str-subclass"),
        pytest.param(OrderedDict(a=1), id="dict-subclass"),
        pytest.param(bytearray(b"ab"), id="bytearray"),
        pytest.param(memoryview(b"ab"), id="memoryview"),
        pytest.param(2**64, id="int-past-64-bits"),
        pytest.param(-(2**63) - 1, id="int-below-64-bits"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param({1, 2}, id="set"),
        pytest.param(object(), id="object"),
    ],
)
def test_what_the_accelerator_does_not_handle_is_encoded_or_refused_as_before(value):
    obj = {"k": [1, {"v": value}]}
    try:
        expected = PURE.encode(obj)
    except CodecError:
        with pytest.raises(CodecError):
            ZIPROTO.encode(obj)
    else:
        assert ZIPROTO.encode(obj) == expected


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 900])
def test_both_engines_encode_deep_values_alike(depth):
    obj: dict = {}
    for _ in range(depth - 1):
        obj = {"a": obj}
    assert ZIPROTO.encode(obj) == PURE.encode(obj)


# -- decoding -------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=300))
def test_both_engines_judge_arbitrary_bytes_alike(data):
    assert_agree(data)


@FUZZ
@given(st.lists(st.sampled_from(
    [b"\x80", b"\x81", b"\x82", b"\x90", b"\x91", b"\x92", b"\xa1a", b"\xa0", b"\x01", b"\xc0",
     b"\xc2", b"\xc3", b"\xcc\xff", b"\xd0\x80", b"\xca\x3f\xc0\x00\x00", b"\xc4\x01z", b"\xde\x00\x01",
     b"\xdc\x00\x02", b"\xd9\x02hi", b"\xa2\xc3\xa9", b"\xa2\xed\xa0", b"\xd4\x01\x00", b"\xc1", b"\xff"]
), max_size=40))
def test_both_engines_judge_plausible_token_soups_alike(tokens):
    assert_agree(b"".join(tokens))


@PROPERTY
@given(ziproto_maps, st.data())
def test_both_engines_judge_corrupted_payloads_alike(obj, data):
    encoded = bytearray(PURE.encode(obj))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(encoded)))
        action = data.draw(st.sampled_from(["replace", "truncate", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if action == "replace" and position < len(encoded):
            encoded[position] = byte
        elif action == "truncate":
            del encoded[position:]
        elif action == "insert":
            encoded.insert(position, byte)
        elif position < len(encoded):
            del encoded[position]
    assert_agree(bytes(encoded))


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1a", b"\xdc\x00\x01", b"\xde\x00\x01\x01"])
@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
def test_both_engines_draw_the_nesting_limit_at_the_same_depth(opener, depth):
    # The top-level map is depth 1; ``depth`` containers in all.
    data = b"\x81\xa1k" + opener * (depth - 2) + b"\x90"
    assert_agree(data)
    assert verdict(ZIPROTO, data)[0] == ("ok" if depth <= MAX_DEPTH else "error")


@pytest.mark.parametrize(
    "key",
    [b"\x90", b"\x91\x01", b"\x80", b"\x81\xa1a\x01", b"\xdc\x00\x01\x01", b"\xdd\x00\x00\x00\x00",
     b"\xde\x00\x00", b"\xdf\x00\x00\x00\x01\x01\x02", b"\x91" * MAX_DEPTH + b"\x01"],
    ids=["fixarray-empty", "fixarray", "fixmap-empty", "fixmap", "array16", "array32", "map16", "map32", "deep"],
)
@pytest.mark.parametrize("where", ["top", "nested-map", "in-array", "second-key"])
def test_both_engines_refuse_a_container_as_a_map_key(key, where):
    # A container key would decode to a tuple, whose hash has no secret: refused as
    # soon as its type byte is seen, wherever the map is.
    data = {
        "top": b"\x81" + key + b"\x02",
        "nested-map": b"\x81\xa1a\x81" + key + b"\x02",
        "in-array": b"\x81\xa1a\x92\x01\x81" + key + b"\x02",
        "second-key": b"\x82\x01\x02" + key + b"\x03",
    }[where]
    assert verdict(ZIPROTO, data)[0] == "error"
    assert_agree(data)


def test_a_container_key_is_refused_before_anything_after_it_is_read():
    # A thousand colliding keys would cost a million comparisons: the first is refused.
    data = b"\xde\x03\xe8" + b"\x92\x01\x02\x01" * 1000
    with pytest.raises(CodecError, match=r"keys must be scalars \(byte 3\)"):
        ZIPROTO.decode(data)
    with pytest.raises(CodecError, match=r"keys must be scalars \(byte 3\)"):
        PURE.decode(data)


@pytest.mark.parametrize(
    "key", [b"\xa1k", b"\x01", b"\xff", b"\xcb" + bytes(8), b"\xc2", b"\xc3", b"\xc0", b"\xc4\x01z", b"\xd3" + bytes(8)],
    ids=["str", "int", "negative", "float", "false", "true", "nil", "bin", "int64"],
)
def test_scalar_keys_of_every_type_are_kept(key):
    data = b"\x81" + key + b"\x02"
    assert verdict(ZIPROTO, data)[0] == "ok"
    assert_agree(data)


# -- the element limit ----------------------------------------------------------------
@PROPERTY
@given(ziproto_maps)
def test_both_engines_count_the_same_elements_and_stop_at_the_same_one(obj):
    data = PURE.encode(obj)
    status, (value, elements) = verdict(ZIPROTO, data)
    assert status == "ok" and verdict(PURE, data)[1][1] == elements
    assert elements == count_elements(obj)
    assert_agree(data, elements)  # exactly enough
    assert verdict(ZIPROTO, data, elements - 1)[0] == "too many"
    assert_agree(data, elements - 1)


def count_elements(obj) -> int:
    """What the limit counts, from the value: every value, key and item, once."""
    count, stack = 0, [obj]
    while stack:
        item = stack.pop()
        count += 1
        if type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return count


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 40))
def test_both_engines_judge_arbitrary_bytes_alike_under_any_element_limit(data, limit):
    assert_agree(b"\x81\xa1a" + data, limit)
    assert_agree(data, limit)


@pytest.mark.parametrize(
    "filler", [b"\x90", b"\x80", b"\x01", b"\xe0", b"\xc0"], ids=["arrays", "maps", "ints", "negative", "nil"]
)
def test_max_elements_is_the_most_one_packet_decodes_to(filler):
    # {"a": [filler, ...]}: the map, its key, the array and its items.
    items = MAX_ELEMENTS - 3
    data = b"\x81\xa1a\xdd" + items.to_bytes(4, "big") + filler * items
    assert verdict(ZIPROTO, data)[0] == "ok"
    over = b"\x81\xa1a\xdd" + (items + 1).to_bytes(4, "big") + filler * (items + 1)
    assert verdict(ZIPROTO, over)[0] == "too many"
    with pytest.raises(CodecError, match=f"more than {MAX_ELEMENTS} elements"):
        ZIPROTO.decode(over)
    if filler == b"\x90":  # the msgspec engine is slow at this size: one filler is enough
        assert verdict(PURE, data)[0] == "ok" and verdict(PURE, over)[0] == "too many"


def test_an_element_limit_stops_the_decoder_where_it_is_crossed():
    data = b"\x81\xa1a\xdd\x00\x10\x00\x00" + b"\x90" * 0x100000
    with pytest.raises(TooManyElements, match=r"more than 100 elements \(byte 105\)"):
        ZIPROTO.decode_units(data, 100)
    with pytest.raises(TooManyElements, match=r"more than 100 elements \(byte 105\)"):
        PURE.decode_units(data, 100)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-claims-4G-items"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-claims-4G-entries"),
        pytest.param(b"\x81\xa1a\xc6\xff\xff\xff\xff", id="bin32-claims-4GiB"),
        pytest.param(b"\x81\xa1a\xdb\xff\xff\xff\xff", id="str32-claims-4GiB"),
        pytest.param(b"\x81\xa1a\xdd\x00\x01\x00\x00" + b"\x01" * 100, id="array32-short"),
    ],
)
def test_lying_lengths_are_refused_without_allocating_them(data):
    assert verdict(ZIPROTO, data) == ("error", None)
    assert_agree(data)


def test_short_strings_come_back_right_through_the_cache():
    # Many distinct short ASCII strings (cache slots are shared and overwritten), the
    # same ones again, and strings that differ only past the first word.
    keys = [f"k{i}" for i in range(5000)] + ["abcdefgh" + c for c in "xyz"] + ["x" * 24, "x" * 25]
    obj = {key: key[::-1] for key in keys}
    data = PURE.encode(obj)
    for _ in range(2):
        decoded = ZIPROTO.decode(data)
        assert decoded == obj and list(decoded) == keys


def test_decoding_reads_any_bytes_like_payload():
    data = PURE.encode({"a": [1, "b"]})
    assert ZIPROTO.decode(bytearray(data)) == ZIPROTO.decode(memoryview(data)) == {"a": [1, "b"]}
