"""The bundled AsyncAProto 22 clients: ``Client`` (blocking) and ``AsyncClient`` (trio).

Both keep one connection (one session) open and can send many packets on it::

    from asyncapy.client import Client

    with Client(tls=False) as client:
        client.connect("127.0.0.1", 8081)
        print(client.request({"hello": "world"}))   # send + receive

TLS is on by default and verifies the server's certificate and host name against the
system's CAs; pass ``cafile=`` (or a ready ``ssl_context=``) for a private CA.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from contextlib import AbstractContextManager
from typing import Any, Dict, Optional, Tuple, Union

import trio

from asyncapy.domain.codecs import CODECS_BY_CODE, codec_named
from asyncapy.domain.errors import CodecError
from asyncapy.domain.framing import DEFAULT_MAX_PACKET_SIZE, NEED_DATA, Framer, FramingError

__all__ = ["Client", "AsyncClient", "ProtocolViolation"]

Payload = Union[str, Dict[Any, Any]]


class ProtocolViolation(ConnectionError):
    """The server sent bytes that are not AsyncAProto 22 packets."""


def _tls_failure(exc: ssl.SSLError, hostname: str, port: int) -> ssl.SSLError:
    """``exc``, a failed TLS handshake, with a hint when the server may speak plain TCP.

    A plain-TCP server answers a ClientHello with bytes that are not TLS (or closes):
    ``WRONG_VERSION_NUMBER``, or an EOF, which alone tell a newcomer nothing. A failed
    certificate check is about the certificate, and is returned as it is. The result
    is still an :class:`ssl.SSLError` (same errno, reason and library), so code that
    catches that keeps working.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc
    detail = exc.reason or exc.strerror or str(exc) or type(exc).__name__
    hinted = type(exc)(
        exc.errno,
        f"TLS handshake with {hostname}:{port} failed ({detail}); if the server speaks "
        "plain TCP (a server without a certificate does), pass tls=False",
    )
    hinted.reason, hinted.library = exc.reason, exc.library
    return hinted


class _ClientBase:
    """Settings, encoding and parsing shared by both clients.

    Its ``__init__`` is both clients' (neither overrides it), so
    ``inspect.signature``, ``help()`` and editors show every parameter of
    :class:`Client` and :class:`AsyncClient`; what each adds is declared at class
    level, not set in an ``__init__`` of its own."""

    def __init__(
        self,
        byteorder: str = "big",
        header_size: int = 4,
        tls: bool = True,
        encoding: str = "json",
        timeout: Optional[float] = 60,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        cafile: Optional[str] = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        if byteorder not in ("big", "little"):
            raise ValueError(f"byteorder must be 'big' or 'little', not {byteorder!r}")
        if header_size not in (2, 4, 8) or type(header_size) is not int:
            raise ValueError(f"header_size must be 2, 4 or 8, not {header_size!r}")
        self._codec = codec_named(encoding)
        if timeout is not None and (type(timeout) not in (int, float) or timeout <= 0):
            raise ValueError(f"timeout must be a number of seconds above 0 or None, not {timeout!r}")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise ValueError(f"ssl_context must be an ssl.SSLContext, not {ssl_context!r}")
        self.byteorder = byteorder
        self.header_size = header_size
        self.tls: bool = bool(tls)
        self.encoding = encoding
        self.timeout = timeout
        self.max_packet_size = max_packet_size
        self._ssl_context = ssl_context
        self._cafile = cafile
        self._framer = Framer(header_size, byteorder, max_packet_size)

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        return ssl.create_default_context(cafile=self._cafile)

    def _reset_framer(self) -> None:
        self._framer = Framer(self.header_size, self.byteorder, self.max_packet_size)

    def _packet(self, payload: Payload) -> bytes:
        if isinstance(payload, (str, bytes, bytearray)):
            try:
                payload = json.loads(payload)
            except ValueError as exc:
                raise ValueError(f"payload is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ValueError(f"payload must be a dict or a JSON object, not {type(payload).__name__}")
        return self._framer.frame(self._codec.encode(payload), self._codec.code)

    def _next_raw(self) -> Optional[bytes]:
        event = self._framer.next_event()
        if event is NEED_DATA:
            return None
        if type(event) is FramingError:
            raise ProtocolViolation(
                f"the server sent an unframeable Content-Length ({event.content_length})"
            )
        return self._framer.frame(event.payload, event.encoding, event.version)

    async def _read_packet(self, stream: trio.abc.Stream) -> bytes:
        """Read ``stream`` until a whole packet is buffered; ``b""`` at its end."""
        while True:
            raw = self._next_raw()
            if raw is not None:
                return raw
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return b""
            if not data:
                return b""
            self._framer.receive_data(data)

    def _split_packet(self, raw: bytes) -> Tuple[int, int, int, bytes]:
        """``(content_length, version, encoding, payload)`` of one raw packet."""
        return self._framer.split(raw)

    def _decode(self, raw: bytes) -> Dict[Any, Any]:
        if not raw:
            raise ConnectionError("the server closed the connection")
        _, _, encoding, payload = self._split_packet(raw)
        codec = CODECS_BY_CODE.get(encoding)
        if codec is None:
            raise ProtocolViolation(f"the server sent Content-Encoding {encoding}")
        try:
            return codec.decode(payload)
        except CodecError as exc:
            raise ProtocolViolation(f"the server sent a malformed payload: {exc}") from None


class Client(_ClientBase):
    """A blocking AsyncAProto 22 client over one TCP or TLS connection.

    Its parameters, ``Client(byteorder='big', header_size=4, tls=True,
    encoding='json', timeout=60, *, ssl_context=None, cafile=None,
    max_packet_size=16777216)``:

    - ``byteorder``: ``'big'`` (standard) or ``'little'``; must match the server.
    - ``header_size``: 2, 4 (standard) or 8; must match the server.
    - ``tls``: wrap the connection in TLS (default True), verifying the server's
      certificate and host name.
    - ``encoding``: ``'json'`` or ``'ziproto'``: how :meth:`send` encodes payloads.
    - ``timeout``: seconds connecting may take, and then each reply: a deadline
      for the whole packet, however slowly it trickles in (None = forever).
    - ``ssl_context``: client-side :class:`ssl.SSLContext` to use instead of the
      default (for client certificates, pinned CAs...).
    - ``cafile``: PEM bundle of the CA(s) that signed the server's certificate.
    - ``max_packet_size``: largest reply Content-Length accepted (16 MiB).
    """

    sock: Optional[socket.socket] = None
    """The connected (possibly TLS-wrapped) socket, once :meth:`connect` returned."""

    def connect(self, hostname: str, port: int) -> None:
        """Open the connection (and the TLS session) to ``hostname:port``."""
        if not isinstance(hostname, str):
            raise ValueError(f"hostname must be a string, not {hostname!r}")
        if type(port) is not int or not 0 < port < 65536:
            raise ValueError(f"port must be an integer from 1 to 65535, not {port!r}")
        self.disconnect()
        sock = socket.create_connection((hostname, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            try:
                sock = self._tls_context().wrap_socket(sock, server_hostname=hostname)
            except ssl.SSLError as exc:
                sock.close()
                raise _tls_failure(exc, hostname, port) from None
            except BaseException:
                sock.close()
                raise
        self._reset_framer()
        self.sock = sock

    def disconnect(self) -> None:
        """Close the connection (idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _require(self) -> socket.socket:
        if self.sock is None:
            raise ConnectionError("not connected: call connect(hostname, port) first")
        return self.sock

    def send(self, payload: Payload) -> None:
        """Send one packet carrying ``payload`` (a dict, or a JSON object as a string)."""
        self._require().sendall(self._packet(payload))

    def receive_raw(self) -> bytes:
        """The next whole packet, headers included; ``b""`` once the server closed.

        ``timeout`` is a deadline for the whole packet, not for each read: a server
        trickling its reply a byte at a time cannot hold the caller longer.

        :raises TimeoutError: if the whole packet did not arrive within ``timeout``.
        """
        sock = self._require()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while True:
                raw = self._next_raw()
                if raw is not None:
                    return raw
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no whole reply within {self.timeout:g}s")
                    sock.settimeout(left)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    raise TimeoutError(f"no whole reply within {self.timeout:g}s") from None
                if not data:
                    return b""
                self._framer.receive_data(data)
        finally:
            if deadline is not None and self.sock is sock:
                sock.settimeout(self.timeout)

    def receive(self) -> Dict[Any, Any]:
        """The next packet's payload, decoded by the encoding the packet declares.

        :raises ConnectionError: if the server closed the connection.
        """
        return self._decode(self.receive_raw())

    def request(self, payload: Payload) -> Dict[Any, Any]:
        """:meth:`send` then :meth:`receive`."""
        self.send(payload)
        return self.receive()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.disconnect()


class AsyncClient(_ClientBase):
    """The trio twin of :class:`Client`: the same parameters, methods as coroutines."""

    stream: Optional[trio.abc.Stream] = None
    """The connected trio stream, once :meth:`connect` returned."""

    def _deadline(self) -> AbstractContextManager[object]:
        return trio.fail_after(self.timeout) if self.timeout is not None else trio.CancelScope()

    async def connect(self, hostname: str, port: int) -> None:
        """Open the connection (and the TLS session) to ``hostname:port``."""
        stream: Optional[trio.abc.Stream] = None
        try:
            with self._deadline():
                stream = await trio.open_tcp_stream(hostname, port)
                if self.tls:
                    stream = trio.SSLStream(stream, self._tls_context(), server_hostname=hostname)
                    await stream.do_handshake()
        except BaseException as exc:
            # A failed connect must not leak the TCP connection under a broken TLS one.
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise TimeoutError(f"connecting to {hostname}:{port} timed out") from None
            if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
                # Like the blocking Client: the ssl error itself (certificate verification
                # failed, host name mismatch...), not trio's cause-less wrapper.
                raise _tls_failure(exc.__cause__, hostname, port) from None
            raise
        self._reset_framer()
        self.stream = stream

    async def disconnect(self) -> None:
        """Close the connection (idempotent)."""
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await trio.aclose_forcefully(stream)

    def _require(self) -> trio.abc.Stream:
        if self.stream is None:
            raise ConnectionError("not connected: call connect(hostname, port) first")
        return self.stream

    async def send(self, payload: Payload) -> None:
        """Send one packet carrying ``payload``."""
        await self._require().send_all(self._packet(payload))

    async def receive_raw(self) -> bytes:
        """The next whole packet, headers included; ``b""`` once the server closed."""
        stream = self._require()
        try:
            with self._deadline():
                raw = await self._read_packet(stream)
        except trio.TooSlowError:
            raise TimeoutError(f"no whole reply within {self.timeout:g}s") from None
        return raw

    async def receive(self) -> Dict[Any, Any]:
        """The next packet's payload (see :meth:`Client.receive`)."""
        return self._decode(await self.receive_raw())

    async def request(self, payload: Payload) -> Dict[Any, Any]:
        """:meth:`send` then :meth:`receive`."""
        await self.send(payload)
        return await self.receive()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.disconnect()
