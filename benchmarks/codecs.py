"""Codec micro-benchmark: our JSON and ZiProto against ``ziproto`` and stdlib ``json``.

Usage: ``python -m benchmarks.codecs``. Prints microseconds per operation (median of
five timing runs) for a small, a medium (the ``make bench`` workload's) and a large
map. The ``ziproto`` package's decoder crashes on maps of 16+ entries, so for the
larger maps its decode column says so. A second table sets each codec's two engines
side by side: the C accelerator (``domain/_speedups.c``) against msgspec alone
(ZiProto) or the standard library's encoder (JSON encoding).
"""

from __future__ import annotations

import json
import statistics
import timeit

import ziproto

from asyncapy.domain.codecs import JSON, ZIPROTO, JsonCodec, ZiProtoCodec

from .run import MEDIUM

PURE = ZiProtoCodec(pure=True)
PURE_JSON = JsonCodec(pure=True)

SMALL = {"test": 1, "user": "someone", "ok": True}
LARGE = {
    f"record-{i:03d}": {"id": i, "name": f"user number {i}", "score": i * 1.5, "tags": ["a", "b", "c"],
                        "active": i % 2 == 0, "blob": "x" * 40}
    for i in range(200)
}


def per_call(function, number: int) -> float:
    """Median microseconds per call over five runs of ``number`` calls."""
    runs = timeit.repeat(function, number=number, repeat=5)
    return statistics.median(runs) / number * 1e6


def measure(name: str, obj: dict, number: int) -> list:
    json_bytes = JSON.encode(obj)
    zi_bytes = ZIPROTO.encode(obj)
    try:
        ziproto.decode(zi_bytes)
        zi_ref_decode = per_call(lambda: ziproto.decode(zi_bytes), max(1, number // 20))
    except Exception as exc:  # the reference decoder's known crash on 16+ entries
        zi_ref_decode = f"crashes ({type(exc).__name__})"
    return [
        (name, "JSON encode", per_call(lambda: JSON.encode(obj), number), per_call(lambda: json.dumps(obj).encode(), number)),
        (name, "JSON decode", per_call(lambda: JSON.decode(json_bytes), number), per_call(lambda: json.loads(json_bytes), number)),
        (name, "ZiProto encode", per_call(lambda: ZIPROTO.encode(obj), number), per_call(lambda: ziproto.encode(obj), max(1, number // 20))),
        (name, "ZiProto decode", per_call(lambda: ZIPROTO.decode(zi_bytes), number), zi_ref_decode),
    ]


def main() -> None:
    rows = measure(f"small ({len(JSON.encode(SMALL))} B JSON)", SMALL, 20000)
    rows += measure(f"medium ({len(ZIPROTO.encode(MEDIUM))} B ZiProto)", MEDIUM, 5000)
    rows += measure(f"large ({len(JSON.encode(LARGE)) // 1024} KiB JSON)", LARGE, 200)
    print(f"{'payload':<22} {'operation':<15} {'ours µs':>9} {'reference µs':>16} {'speed-up':>9}")
    print("reference: stdlib json for JSON, the ziproto package for ZiProto")
    for name, operation, ours, reference in rows:
        if isinstance(reference, float):
            print(f"{name:<22} {operation:<15} {ours:>9.2f} {reference:>16.2f} {reference / ours:>8.1f}x")
        else:
            print(f"{name:<22} {operation:<15} {ours:>9.2f} {reference:>16} {'':>9}")
    print(f"\nEach codec's two engines (accelerator built: {ZIPROTO.accelerated and JSON.accelerated})")
    print(f"{'payload':<22} {'operation':<15} {'C µs':>9} {'without µs':>16} {'speed-up':>9}")
    print("without: msgspec alone for ZiProto, the standard library's encoder for JSON")
    for name, obj, number in (("small", SMALL, 20000), ("medium", MEDIUM, 5000), ("large", LARGE, 200)):
        data = PURE.encode(obj)
        for operation, fast, pure in (
            ("ZiProto encode", lambda: ZIPROTO.encode(obj), lambda: PURE.encode(obj)),
            ("ZiProto decode", lambda: ZIPROTO.decode(data), lambda: PURE.decode(data)),
            ("JSON encode", lambda: JSON.encode(obj), lambda: PURE_JSON.encode(obj)),
        ):
            a, b = per_call(fast, number), per_call(pure, number)
            print(f"{name:<22} {operation:<15} {a:>9.2f} {b:>16.2f} {b / a:>8.1f}x")


if __name__ == "__main__":
    main()
