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
from asyncapy.domain.errors import CodecError

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


def verdict(codec: ZiProtoCodec, data: bytes):
    """("ok", value) or ("error", None): what ``codec`` makes of ``data``."""
    try:
        return "ok", codec.decode(data)
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


def assert_agree(data: bytes) -> None:
    fast, pure = verdict(ZIPROTO, data), verdict(PURE, data)
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


def test_nesting_inside_a_map_key_counts_too():
    data = b"\x81" + b"\x91" * (MAX_DEPTH) + b"\x01" + b"\x02"
    assert_agree(data)
    assert verdict(ZIPROTO, data)[0] == "error"
    shallow = b"\x81" + b"\x91" * 3 + b"\x01" + b"\x02"
    assert ZIPROTO.decode(shallow) == {(((1,),),): 2}


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
