"""Context only: the same length-prefixed echo on asyncio with uvloop (if installed).

Usage: ``python -m benchmarks.uvloop_echo PORT``.
"""

import asyncio
import sys

HEADER = 4


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        out = bytearray()
        while len(buffer) >= HEADER:
            end = HEADER + int.from_bytes(buffer[:HEADER], "big")
            if len(buffer) < end:
                break
            out += buffer[:end]
            del buffer[:end]
        if out:
            self.transport.write(bytes(out))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop

    uvloop.install()
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
