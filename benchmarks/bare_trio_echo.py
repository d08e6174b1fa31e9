"""The floor AsyncAPY is measured against: a bare trio length-prefixed echo server.

It receives, splits frames by their 4-byte big-endian Content-Length, and sends each
frame back unchanged: no decoding, no dispatch, no encoding. Usage:
``python -m benchmarks.bare_trio_echo [--codec] PORT``.

With ``--codec`` (context, not the floor) it also decodes every payload and encodes it
back with AsyncAPY's own codecs (:mod:`asyncapy.domain.codecs`) before echoing it: what a trio
server must spend on the same payloads before it does anything a framework does. The
gap between this one and bare trio is the codecs' cost; the gap between it and
AsyncAPY is everything else AsyncAPY does (framing checks, dispatch, sessions).
"""

import functools
import sys

import trio

from asyncapy.domain.codecs import CODECS_BY_CODE

HEADER = 4


def recode(frame: bytearray) -> bytes:
    """Decode the frame's payload and encode it back, as a server must."""
    codec = CODECS_BY_CODE[frame[HEADER + 1]]
    payload = codec.encode(codec.decode(bytes(frame[HEADER + 2 :])))
    return (len(payload) + 2).to_bytes(HEADER, "big") + bytes(frame[HEADER : HEADER + 2]) + payload


async def handle(stream: trio.SocketStream, transform=None) -> None:
    buffer = bytearray()
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            out = bytearray()
            while len(buffer) >= HEADER:
                end = HEADER + int.from_bytes(buffer[:HEADER], "big")
                if len(buffer) < end:
                    break
                out += buffer[:end] if transform is None else transform(buffer[:end])
                del buffer[:end]
            if out:
                await stream.send_all(out)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def main() -> None:
    args = sys.argv[1:]
    transform = recode if "--codec" in args else None
    port = int([a for a in args if a != "--codec"][0])
    trio.run(functools.partial(trio.serve_tcp, lambda s: handle(s, transform), port, host="127.0.0.1"))


if __name__ == "__main__":
    main()
