"""Hostile decoding under load: attackers send the worst payloads, a canary measures.

``python -m benchmarks.hostile_decode`` starts the hostile-test echo server
(``tests/e2e/hostile_app.py``, a subprocess with the default settings unless
``--settings`` says otherwise), then for ``--seconds``:

* ``--attackers`` connections (4) each send, back to back, the worst packet of one
  kind that ``max_packet_size`` allows: colliding map keys, ``{"a": [[], ...]}`` and
  ``{"a": [{}, ...]}`` in ZiProto, and the JSON ``[[],...]`` and ``[{},...]``, round
  robin over the attackers, reading what comes back (a refused one reconnects);
* a canary connection sends a small JSON request every 20 ms and times each round trip;
* the server's resident memory (``VmRSS``) is sampled every 10 ms.

It prints the canary's round trips (median, 99th percentile, maximum), the attackers'
replies by kind, and the server's memory before and at its peak. docs/security.md
records the figures. The attack payloads are those of ``fuzz/attacks.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from typing import Any

import trio

from fuzz import attacks
from tests.e2e.hostile_app import launch, rss_bytes

MiB = 1 << 20


def frame(payload: bytes, encoding: int) -> bytes:
    return (len(payload) + 2).to_bytes(4, "big") + bytes([22, encoding]) + payload


def payloads(max_packet_size: int, elements: int) -> dict[str, bytes]:
    """The worst packet of each kind that ``max_packet_size`` allows, with at most
    ``elements`` elements (``MAX_ELEMENTS``: more would be refused as soon as the
    decoder reaches it)."""
    MAX_ELEMENTS = elements
    size = min(max_packet_size, 64 * MiB) - 2
    ziproto = min(size, MAX_ELEMENTS + 5)  # the map, "a", the array and its items
    json_size = min(size, 3 * (MAX_ELEMENTS // 2))  # "[]," counts twice
    keys = max(1, (size - 5) // 20)
    return {
        "colliding keys": frame(attacks.colliding_keys(min(keys, 200_000)), 1),
        "ziproto [[]...]": frame(attacks.ziproto_arrays(ziproto), 1),
        "ziproto [{}...]": frame(attacks.ziproto_maps(ziproto), 1),
        "json [[]...]": frame(attacks.json_arrays(json_size), 0),
        "json [{}...]": frame(attacks.json_objects(json_size), 0),
    }


async def read_packet(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """One whole packet (header included) from ``stream``; b"" at the end of it."""
    while True:
        if len(buffer) >= 4:
            end = 4 + int.from_bytes(buffer[:4], "big")
            if len(buffer) >= end:
                packet = bytes(buffer[:end])
                del buffer[:end]
                return packet
        data = await stream.receive_some(1 << 20)
        if not data:
            return b""
        buffer += data


def describe(reply: bytes) -> str:
    payload = reply[6:]
    if b"ERR_" in payload[:80]:
        return payload[payload.index(b"ERR_") :].split(b'"')[0].decode()
    return f"echo ({len(reply)} bytes)"


async def attacker(port: int, kind: str, packet: bytes, replies: Counter, until: float) -> None:
    while trio.current_time() < until:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        buffer = bytearray()
        try:
            async with stream:
                while trio.current_time() < until:
                    await stream.send_all(packet)
                    reply = await read_packet(stream, buffer)
                    if not reply:
                        replies[(kind, "closed")] += 1
                        break
                    replies[(kind, describe(reply))] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            replies[(kind, "connection reset")] += 1


async def canary(port: int, rtts: list, until: float) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    buffer = bytearray()
    async with stream:
        n = 0
        while trio.current_time() < until:
            request = frame(json.dumps({"canary": n}).encode(), 0)
            started = time.perf_counter()
            await stream.send_all(request)
            reply = await read_packet(stream, buffer)
            rtts.append(time.perf_counter() - started)
            assert reply == request, reply[:100]
            n += 1
            await trio.sleep(0.02)


async def sample_rss(pid: int, samples: list, until: float) -> None:
    while trio.current_time() < until:
        samples.append(rss_bytes(pid))
        await trio.sleep(0.01)


async def attack(port: int, pid: int, packets: dict[str, bytes], attackers: int, seconds: float) -> dict[str, Any]:
    rtts: list[float] = []
    rss: list[int] = []
    replies: Counter = Counter()
    baseline = rss_bytes(pid)
    kinds = list(packets)
    until = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss, pid, rss, until + 0.5)
        nursery.start_soon(canary, port, rtts, until)
        for n in range(attackers):
            kind = kinds[n % len(kinds)]
            nursery.start_soon(attacker, port, kind, packets[kind], replies, until)
    return {"rtts": rtts, "baseline": baseline, "peak": max(rss), "replies": replies}


def report(result: dict[str, Any]) -> str:
    rtts = sorted(result["rtts"])
    p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
    lines = [
        f"canary: {len(rtts)} round trips, median {statistics.median(rtts) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {rtts[-1] * 1000:.1f} ms",
        f"server RSS: {result['baseline'] / MiB:.0f} MiB before, {result['peak'] / MiB:.0f} MiB at peak "
        f"(+{(result['peak'] - result['baseline']) / MiB:.0f} MiB)",
    ]
    for (kind, outcome), count in sorted(result["replies"].items()):
        lines.append(f"  {kind:16} {outcome}: {count}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--settings", default="{}", help="the server's settings, as a JSON object")
    parser.add_argument("--kinds", default="", help="comma-separated attack kinds (default: all)")
    parser.add_argument(
        "--elements", type=int, default=0, help="elements per attack packet (default: MAX_ELEMENTS)"
    )
    args = parser.parse_args()
    settings = json.loads(args.settings)
    running, port = launch(**settings)
    with running:
        from asyncapy.config import SETTINGS

        if not args.elements:
            from asyncapy.domain.limits import MAX_ELEMENTS

            args.elements = MAX_ELEMENTS
        size = settings.get("max_packet_size", SETTINGS["max_packet_size"].default)
        packets = payloads(size, args.elements)
        if args.kinds:
            packets = {k: v for k, v in packets.items() if k in args.kinds.split(",")}
        result = trio.run(attack, port, running.process.pid, packets, args.attackers, args.seconds)
        print(report(result))
        running.stop()


if __name__ == "__main__":
    main()
