"""The floor AsyncAPY is measured against: a bare trio length-prefixed echo server.

It receives, splits frames by their 4-byte big-endian Content-Length, and sends each
frame back unchanged: no decoding, no dispatch, no encoding. Usage:
``python -m benchmarks.bare_trio_echo PORT``.
"""

import sys

import trio

HEADER = 4


async def handle(stream: trio.SocketStream) -> None:
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
                out += buffer[:end]
                del buffer[:end]
            if out:
                await stream.send_all(out)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def main() -> None:
    port = int(sys.argv[1])
    trio.run(lambda: trio.serve_tcp(handle, port, host="127.0.0.1"))


if __name__ == "__main__":
    main()
