"""The JSON codec's two encoders, the C accelerator and the standard library's, must
be one encoder: ``json.dumps(obj).encode("ascii")``, byte for byte, for every value
the standard library writes, and ``CodecError`` for every value it refuses.

``JSON`` encodes on the accelerator (``domain/_speedups.c``, built by ``pip install``);
``PURE`` never does. test_codecs.py holds the rest of the JSON tests (against
``JSON``); these compare the two on the whole input space: every code point (lone
surrogates and astral ones included), every float (NaN, infinities, subnormals),
ints at and beyond 64 bits, non-str keys, subclasses, and nesting at the depth where
the accelerator hands over.
"""

from __future__ import annotations

import enum
import json
import math
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncapy.domain.codecs import JSON, MAX_DEPTH, JsonCodec
from asyncapy.domain.errors import CodecError, TooManyElements
from asyncapy.domain.limits import MAX_ELEMENTS

PURE = JsonCodec(pure=True)
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_accelerator_encodes_json():
    assert JSON.accelerated and not PURE.accelerated


def outcome(codec: JsonCodec, obj):
    try:
        return codec.encode(obj)
    except CodecError:
        return CodecError


def stdlib(obj):
    """What json.dumps writes, or CodecError where it refuses."""
    try:
        return json.dumps(obj).encode("ascii")
    except (TypeError, ValueError, RecursionError):
        return CodecError


def same_everywhere(obj) -> None:
    expected = stdlib(obj)
    assert outcome(JSON, obj) == expected
    assert outcome(PURE, obj) == expected


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


# Every code point, surrogates included (st.text() leaves those out).
any_text = st.text(st.characters(blacklist_categories=()), max_size=20)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**63) - 2, -(2**63) + 2)
    | st.integers(2**63 - 2, 2**64 + 2)
    | st.floats()  # NaN and the infinities too: json.dumps writes them
    | any_text
    | st.sampled_from([Colour.RED, Name("n"), 1.5e300, 5e-324, -0.0, "\x7f", "\x00\x1f", "\"\\/"])
)
keys = any_text | st.integers() | st.floats() | st.booleans() | st.none() | st.just(Name("k"))
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(any_text, inner, max_size=5)
        | st.dictionaries(keys, inner, max_size=3)
        | st.dictionaries(any_text, inner, max_size=3).map(OrderedDict)
    ),
    max_leaves=30,
)


@PROPERTY
@given(st.dictionaries(any_text, values, max_size=8))
def test_both_encoders_write_what_json_dumps_writes(obj):
    same_everywhere(obj)


@PROPERTY
@given(st.dictionaries(keys, values, max_size=6))
def test_non_str_keys_are_handed_over(obj):
    same_everywhere(obj)


@PROPERTY
@given(any_text)
def test_every_string_is_escaped_as_the_standard_library_escapes_it(text):
    same_everywhere({text: text})


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e16, 1e-5, 0.1, 2.5, 1.7976931348623157e308, 5e-324, 123456789.0],
)
def test_floats_as_repr_writes_them(value):
    same_everywhere({"f": value, "l": [value]})


@pytest.mark.parametrize(
    "value", [0, -1, 9, 10, -(2**63), -(2**63) - 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**40, -(10**40)]
)
def test_ints_at_and_beyond_64_bits(value):
    same_everywhere({"i": value})


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 900])
@pytest.mark.parametrize("form", ["list", "dict", "tuple"])
def test_nesting_around_the_hand_over_depth(depth, form):
    obj: object = 1
    for _ in range(depth - 1):  # the top-level map is depth 1
        obj = {"a": obj} if form == "dict" else [obj] if form == "list" else (obj,)
    same_everywhere({"a": obj})


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"a": {}, "b": [], "c": ()},
        {"": ""},
        {"a": [None, True, False]},
        {"é": "日本\U0001f600", "\ud800": "\udfff"},
        {"k": "x" * 5000 + "\n"},
        {"k": "\u00e9" * 3000},
        {1: "int key", 2.5: "float key", None: "none key"},
        {True: "bool key"},  # apart: True == 1, one key in a dict
        {"a": object()},
        {"a": {1, 2}},
        {"a": b"bytes"},
        {(1, 2): "tuple key"},
    ],
)
def test_edges(obj):
    same_everywhere(obj)


def test_a_circular_payload_is_refused_by_both():
    obj: dict = {}
    obj["self"] = obj
    assert outcome(JSON, obj) is CodecError
    assert outcome(PURE, obj) is CodecError


def test_a_big_payload_and_then_a_small_one():
    """The scratch buffer grows for a big payload and is given back: the next call is
    not affected by what the one before left in it."""
    big = {"k": ["x" * 1000] * 3000}
    assert JSON.encode(big) == json.dumps(big).encode("ascii")
    assert JSON.encode({"a": 1}) == b'{"a": 1}'


# -- decoding: depth on the bytes, the element count ------------------------------------
def json_verdict(codec: JsonCodec, data: bytes, max_elements: int):
    try:
        fields, elements = codec.decode_units(data, max_elements)
    except TooManyElements:
        return ("too many",)
    except CodecError:
        return ("error",)
    return ("ok", json.dumps(fields, sort_keys=True, default=repr), elements)


brackety_text = st.text(alphabet='[]{},:"\\ ab\u00e9', max_size=12)
nested = st.recursive(
    st.none() | st.integers() | brackety_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(brackety_text, inner, max_size=4),
    max_leaves=30,
)


@PROPERTY
@given(st.dictionaries(brackety_text, nested, max_size=5), st.integers(0, 60))
def test_both_engines_count_and_judge_alike_with_brackets_inside_strings(obj, limit):
    # The accelerator finds the depth on the bytes (skipping strings, escapes
    # included); msgspec alone walks the value: one verdict.
    data = json.dumps(obj).encode()
    assert json_verdict(JSON, data, limit) == json_verdict(PURE, data, limit)
    assert json_verdict(JSON, data, 10**9)[0] == "ok"


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
@pytest.mark.parametrize("decoy", [b"", b'"]]]]", ', b'"\\"]]]", ', b'"[[[[", '])
def test_the_depth_limit_is_the_same_whatever_the_strings_hold(depth, decoy):
    # depth - 1 nested arrays under the top-level object, and strings of brackets
    # (escaped quotes too) that must not count.
    data = b'{"a": [' + decoy + b"[" * (depth - 2) + b"]" * (depth - 2) + b"]}"
    expected = "ok" if depth <= MAX_DEPTH else "error"
    assert json_verdict(JSON, data, 10**9)[0] == json_verdict(PURE, data, 10**9)[0] == expected


def test_json_elements_are_counted_from_structural_bytes():
    assert JSON.decode_units(b'{"a": [1, 2], "b": {"c": null}}', 100)[1] == 9
    assert JSON.decode_units(b"{}", 100)[1] == 2  # an empty container: an upper bound
    with pytest.raises(TooManyElements, match="more than 8 elements"):
        JSON.decode_units(b'{"a": [1, 2], "b": {"c": null}}', 8)


def test_past_max_elements_a_json_payload_is_refused_before_it_is_parsed():
    items = MAX_ELEMENTS // 2
    data = b'{"a": [' + b"[]," * items + b"[]]}"  # 2 elements an empty array
    with pytest.raises(TooManyElements, match=f"more than {MAX_ELEMENTS} elements"):
        JSON.decode(data)
    with pytest.raises(TooManyElements):
        PURE.decode(data)
    fits = b'{"a": [' + b"[]," * (items - 3) + b"[]]}"
    assert len(JSON.decode(fits)["a"]) == len(PURE.decode(fits)["a"]) == items - 2
