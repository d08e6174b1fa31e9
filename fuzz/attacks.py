"""The worst payloads a client can send a decoder (issue 17), built to a size.

Shared by the fuzz seeds (small ones), the hostile-load tests and the decoding
benchmark (``python -m benchmarks.hostile_decode``), so that all three attack with the
same bytes:

* :func:`colliding_keys`: a ZiProto map whose keys are two-integer arrays with one
  tuple hash (a tuple's hash has no secret: its items' hashes are combined with fixed
  constants, and an integer's hash is itself modulo 2**61 - 1). Built as tuples, N such
  keys cost O(N**2) comparisons; the decoder must refuse the first.
* :func:`ziproto_arrays`, :func:`ziproto_maps`: ``{"a": [[], [], ...]}`` and
  ``{"a": [{}, {}, ...]}``: one payload byte per container, 60 to 70 bytes of Python
  objects each.
* :func:`json_arrays`, :func:`json_objects`: the JSON forms, ``[[],[],...]`` and
  ``[{},{},...]`` under a key.
"""

from __future__ import annotations

import sys

__all__ = ["colliding_pairs", "colliding_keys", "ziproto_arrays", "ziproto_maps", "json_arrays", "json_objects"]

_MASK = (1 << 64) - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
_MODULUS = (1 << 61) - 1


def _rotate(x: int) -> int:
    return ((x << 31) | (x >> 33)) & _MASK


def _int_hash(value: int) -> int:
    """``hash(value)`` as an unsigned 64-bit lane, for |value| below 2**61 - 1."""
    return (-2 if value == -1 else value) & _MASK if value < 0 else value


def colliding_pairs(count: int) -> list[tuple[int, int]]:
    """``count`` pairs of 64-bit integers whose tuples share one hash (CPython 3.8+'s
    xxHash-based tuple hash; checked against ``hash()`` on this interpreter)."""
    inverse = pow(_P2, -1, 1 << 64)
    target = 0x5EED_5EED_5EED_5EED
    pairs: list[tuple[int, int]] = []
    first = 1
    while len(pairs) < count:
        first += 1
        acc = (_rotate((_P5 + first * _P2) & _MASK) * _P1) & _MASK
        lane = ((target - acc) * inverse) & _MASK  # the hash the second item needs
        if lane < _MODULUS:
            second = lane
        elif (1 << 64) - lane < _MODULUS and lane != _MASK - 1:
            second = -((1 << 64) - lane)
        else:
            continue
        if second == -1:
            continue
        pairs.append((first, second))
    if sys.implementation.name == "cpython" and sys.version_info >= (3, 8):
        wanted = hash(pairs[0])
        assert all(hash(pair) == wanted for pair in pairs[:50]), "the tuple hash changed"
    return pairs


def _uint(value: int) -> bytes:
    if value >= 0:
        return b"\xcf" + value.to_bytes(8, "big")
    return b"\xd3" + value.to_bytes(8, "big", signed=True)


def colliding_keys(count: int) -> bytes:
    """A ZiProto map of ``count`` entries ``[a, b]: 1`` whose keys, as tuples, collide."""
    body = b"".join(b"\x92" + _uint(a) + _uint(b) + b"\x01" for a, b in colliding_pairs(count))
    return b"\xdf" + count.to_bytes(4, "big") + body


def _under_a(count: int, item: bytes) -> bytes:
    return b"\x81\xa1a\xdd" + count.to_bytes(4, "big") + item * count


def ziproto_arrays(size: int) -> bytes:
    """``{"a": [[], [], ...]}`` in ZiProto, ``size`` bytes long."""
    return _under_a(size - 8, b"\x90")


def ziproto_maps(size: int) -> bytes:
    """``{"a": [{}, {}, ...]}`` in ZiProto, ``size`` bytes long."""
    return _under_a(size - 8, b"\x80")


def _json_under_a(size: int, item: bytes) -> bytes:
    count = (size - 9) // (len(item) + 1)
    return b'{"a": [' + b",".join([item] * count) + b"]}"


def json_arrays(size: int) -> bytes:
    """``{"a": [[],[],...]}`` in JSON, at most ``size`` bytes long."""
    return _json_under_a(size, b"[]")


def json_objects(size: int) -> bytes:
    """``{"a": [{},{},...]}`` in JSON, at most ``size`` bytes long."""
    return _json_under_a(size, b"{}")
