"""Raw-socket helpers for the end-to-end tests.

Packets are built here by hand, from the wire contract (``/work/shared/protocol.md``),
not with the project's own framer or codecs, so the tests check the server against the
contract rather than against itself. ZiProto payloads use the reference ``ziproto``
encoder; the expected error replies are spelled out byte by byte.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import trio
import trio.testing
import ziproto

VERSION = 22
JSON_CODE = 0
ZIPROTO_CODE = 1

READ_TIMEOUT = 3.0
"""Longest a test waits for bytes it expects (a hang fails instead of stalling)."""


# -- building packets ---------------------------------------------------------------------
def frame(
    payload: bytes,
    encoding: int = JSON_CODE,
    version: int = VERSION,
    *,
    header_size: int = 4,
    byteorder: str = "big",
    length: Optional[int] = None,
) -> bytes:
    """One packet: Content-Length (``length`` overrides the true one), version, encoding,
    payload."""
    if length is None:
        length = len(payload) + 2
    return length.to_bytes(header_size, byteorder) + bytes([version, encoding]) + payload


def json_bytes(obj: Any) -> bytes:
    """``obj`` as AsyncAPY 0.5 wrote JSON: ``json.dumps`` with its default separators."""
    return json.dumps(obj).encode()


def json_packet(obj: Any, **layout: Any) -> bytes:
    """A JSON packet carrying ``obj``."""
    return frame(json_bytes(obj), JSON_CODE, **layout)


def zi_packet(obj: Any, **layout: Any) -> bytes:
    """A ZiProto packet carrying ``obj`` (encoded by the reference ``ziproto``)."""
    return frame(bytes(ziproto.encode(obj)), ZIPROTO_CODE, **layout)


def _fixstr(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 32
    return bytes([0xA0 | len(data)]) + data


def json_error(code: str, **layout: Any) -> bytes:
    """The exact bytes of the error reply ``code`` in JSON."""
    payload = b'{"status": "failure", "error": "' + code.encode() + b'"}'
    return frame(payload, JSON_CODE, **layout)


def zi_error(code: str, **layout: Any) -> bytes:
    """The exact bytes of the error reply ``code`` in ZiProto (a fixmap of 2 fixstrs)."""
    payload = b"\x82" + _fixstr("status") + _fixstr("failure") + _fixstr("error") + _fixstr(code)
    return frame(payload, ZIPROTO_CODE, **layout)


# -- a raw connection ---------------------------------------------------------------------
class Wire:
    """A raw TCP connection to a server: write any bytes, read back whole packets.

    :meth:`read_packet` returns the exact bytes of the next packet, headers included;
    :meth:`read_eof` asserts that the server closed the connection; :meth:`assert_silent`
    asserts that nothing arrives for a while.
    """

    def __init__(self, stream: trio.abc.Stream, header_size: int = 4, byteorder: str = "big"):
        self.stream = stream
        self.header_size = header_size
        self.byteorder = byteorder
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, host: str, port: int, **layout: Any) -> "Wire":
        stream = await trio.open_tcp_stream(host, port)
        return cls(stream, **layout)

    @classmethod
    async def connect_from(cls, source: str, host: str, port: int, **layout: Any) -> "Wire":
        """A connection whose client end is bound to ``source`` (another loopback
        address: 127.0.0.2, 127.0.0.3...), so that the server sees another client."""
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        await sock.bind((source, 0))
        await sock.connect((host, port))
        return cls(trio.SocketStream(sock), **layout)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self, size: int, timeout: float) -> None:
        with trio.fail_after(timeout):
            while len(self._buffer) < size:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise AssertionError(
                        f"connection closed with {bytes(self._buffer)!r} buffered, "
                        f"{size} bytes expected"
                    )
                self._buffer += data

    async def read_packet(self, timeout: float = READ_TIMEOUT) -> bytes:
        """The next packet's bytes, headers included."""
        await self._fill(self.header_size, timeout)
        length = int.from_bytes(self._buffer[: self.header_size], self.byteorder)
        end = self.header_size + length
        await self._fill(end, timeout)
        raw = bytes(self._buffer[:end])
        del self._buffer[:end]
        return raw

    async def read_json(self, timeout: float = READ_TIMEOUT) -> Any:
        """The next packet, which must be JSON, decoded."""
        raw = await self.read_packet(timeout)
        assert raw[self.header_size : self.header_size + 2] == bytes([VERSION, JSON_CODE]), raw
        return json.loads(raw[self.header_size + 2 :])

    async def request(self, obj: Any) -> Any:
        """Send ``obj`` in JSON and return the decoded JSON reply."""
        await self.send(json_packet(obj, header_size=self.header_size, byteorder=self.byteorder))
        return await self.read_json()

    async def read_eof(self, timeout: float = READ_TIMEOUT) -> None:
        """Assert that nothing more is buffered and the server closed the connection."""
        assert not self._buffer, f"unread bytes before EOF: {bytes(self._buffer)!r}"
        with trio.fail_after(timeout):
            data = await self.stream.receive_some(65536)
        assert data == b"", f"expected EOF, got {data!r}"

    async def assert_silent(self, seconds: float = 0.25) -> None:
        """Assert that no byte arrives within ``seconds`` (and the connection is open)."""
        assert not self._buffer, f"unexpected bytes: {bytes(self._buffer)!r}"
        with trio.move_on_after(seconds):
            data = await self.stream.receive_some(65536)
            raise AssertionError(f"expected silence, got {data!r}")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> "Wire":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


async def settle() -> None:
    """Let the server catch up: return once every task of the run is blocked.

    Deterministic replacement for "sleep a bit" after a client closes or a shutdown is
    requested: by then the server has noticed and acted on it.
    """
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)


__all__ = [
    "VERSION",
    "JSON_CODE",
    "ZIPROTO_CODE",
    "frame",
    "json_bytes",
    "json_packet",
    "zi_packet",
    "json_error",
    "zi_error",
    "Wire",
    "settle",
]
