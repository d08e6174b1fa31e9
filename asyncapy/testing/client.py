"""``open_test_client``: talk to a server's whole session pipeline in-process, with no port.

A test client is one session of a :class:`~asyncapy.server.Server`, exactly as a TCP
client's would be: the server admits it (``session_limit``, the session store), frames
its bytes, decodes them, runs filters and groups, sends error replies and times it
out, through the same code as for a socket (:meth:`asyncapy.sessions.Sessions.serve`). Only the
transport differs: an in-memory stream pair (:func:`trio.testing.memory_stream_pair`)
that behaves like a TCP connection: writes never block, either side can shut its
write side (half-close) and still read, writing to a closed peer raises
:class:`trio.BrokenResourceError`. No socket, no port, no TLS::

    from asyncapy.testing import open_test_client

    async def test_echo():
        async with open_test_client(server) as client:
            assert await client.request({"ping": 1}) == {"ping": 1}

It needs trio (and a trio run: ``trio.run``, pytest-trio...), never pytest.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, Optional

import trio
import trio.testing

from asyncapy.domain.addresses import parse_address
from asyncapy.domain.codecs import codec_named

from ..client import Payload, _ClientBase

if TYPE_CHECKING:  # pragma: no cover
    from ..server import Server

__all__ = ["open_test_client", "TestClient"]


@asynccontextmanager
async def open_test_client(
    server: "Server",
    *,
    address: str = "127.0.0.1",
    encoding: str = "json",
    timeout: Optional[float] = 10,
    lifespan: bool = False,
) -> AsyncIterator["TestClient"]:
    """Open an in-process :class:`TestClient` to ``server``; close it on exit.

    The session opens when the client first sends or receives, or on
    :meth:`TestClient.connect`: that is when admission (``session_limit``) is decided.
    Each test client is one session; open several (nested ``async with``) for
    several sessions. The server's idle-timeout reaper and its store's upkeep run
    beside the client for as long as it is open.

    On a normal exit the client hangs up, as a TCP client closing its socket, and the
    session is let finish (in-flight handlers included, for at most the server's
    ``shutdown_grace``); if the block raises, the session is cancelled at once. An
    exception raised in the block propagates as itself, not inside an
    :class:`ExceptionGroup`.

    :param server: the server to test. It need not be serving (it usually is not:
        no port is opened), and it may be: the test client then adds one more
        session beside the network ones.
    :param address: the client's IP address as the server sees it (its
        :attr:`Client.address <asyncapy.core.Client.address>`, its ``Ip`` filters,
        its session store and ``session_limit``). Settable later through
        :attr:`TestClient.address`, until the client connects.
    :param encoding: ``'json'`` or ``'ziproto'``: how :meth:`TestClient.send` encodes.
    :param timeout: seconds :meth:`TestClient.receive` waits for a packet before it
        raises :class:`TimeoutError` (None: forever).
    :param lifespan: also run the server's :meth:`~asyncapy.server.Server.setup`
        before the client opens and its :meth:`~asyncapy.server.Server.shutdown`
        after it closed, as :meth:`~asyncapy.server.Server.serve` does. Off by
        default: a test gets exactly the handlers, and hooks run only when asked.
    """
    client = TestClient(server, address=address, encoding=encoding, timeout=timeout)
    if lifespan:
        await server.setup()
    failure: Optional[BaseException] = None
    try:
        async with trio.open_nursery() as nursery:
            server._sessions.ready()
            nursery.start_soon(server._sessions.run_services)
            client._nursery = nursery
            try:
                yield client
            except trio.Cancelled:
                raise  # belongs to an enclosing cancel scope: let trio route it
            except BaseException as exc:
                # Re-raised below, outside the nursery, so it is not wrapped in an
                # ExceptionGroup: ``pytest.raises`` around the block keeps working,
                # and a KeyboardInterrupt or pytest.fail() stays itself.
                failure = exc
            else:
                await client.aclose()
            finally:
                nursery.cancel_scope.cancel()
                client._nursery = None
                # Shielded: the scope above is cancelled, and an unshielded await here
                # would raise Cancelled over a BaseException leaving the block (a
                # pytest.fail, KeyboardInterrupt), swallowing it.
                with trio.CancelScope(shield=True):
                    await client._abort()
    finally:
        if lifespan:
            with trio.CancelScope(shield=True):
                await server.shutdown()
    if failure is not None:
        raise failure


class TestClient(_ClientBase):
    """One in-process session of a server, made by :func:`open_test_client`.

    It speaks the server's framing (``header_size``, ``byteorder``) and has the
    methods of :class:`asyncapy.client.AsyncClient` (:meth:`send`, :meth:`receive`,
    :meth:`receive_raw`, :meth:`request`), plus :meth:`send_raw` for bytes that are
    not a well-formed packet and :meth:`send_eof` to half-close. Do not create it
    directly.
    """

    __test__ = False  # a class named Test* that is not a test class (for pytest)

    def __init__(
        self,
        server: "Server",
        *,
        address: str,
        encoding: str,
        timeout: Optional[float],
    ) -> None:
        super().__init__(
            byteorder=server.byteorder,
            header_size=server.header_size,
            tls=False,
            encoding=encoding,
            timeout=timeout,
        )
        self._server = server
        self._nursery: Optional[trio.Nursery] = None  # set by open_test_client
        self._stream: Optional[trio.abc.Stream] = None
        self._admitted: Optional[bool] = None
        self._session_over = trio.Event()
        self.address = address

    # -- the session ------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The client's address as the server sees it (an IP address, normalised as
        the server normalises a socket's peer: ``::ffff:10.0.0.1`` is ``10.0.0.1``).

        Assign it before the client connects; afterwards the session has its address
        and assigning raises :class:`RuntimeError`.
        """
        return self._address

    @address.setter
    def address(self, address: str) -> None:
        if self._stream is not None:
            raise RuntimeError(
                "the test client is connected: its session already has its address. "
                "Set client.address before the first send or receive, or open "
                "another test client"
            )
        if not isinstance(address, str) or not address:
            raise ValueError(f"address must be an IP address as a string, not {address!r}")
        parsed = parse_address(address)
        self._address = str(parsed) if parsed is not None else address

    @property
    def connected(self) -> bool:
        """True once the session was opened (it may have ended since)."""
        return self._stream is not None

    @property
    def admitted(self) -> Optional[bool]:
        """Whether the server admitted the session: None before the client connects,
        False if it was refused (``session_limit`` reached, store unavailable: the
        error reply is then waiting for :meth:`receive`)."""
        return self._admitted

    async def connect(self) -> None:
        """Open the session now; the first send or receive does it otherwise.

        Returns once the server has decided admission (see :attr:`admitted`), so a
        session opened here counts towards ``session_limit`` and
        :meth:`~asyncapy.core.Client.get_sessions` when it returns.

        :raises RuntimeError: if this client already connected (a test client is one
            session: open another test client for another session), or if its
            ``open_test_client`` block has ended.
        """
        if self._nursery is None:
            raise RuntimeError("the test client is closed: its open_test_client() block has ended")
        if self._stream is not None:
            raise RuntimeError("the test client is already connected: open another for a second session")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self._stream = client_stream
        self._admitted = await self._nursery.start(self._serve, server_stream)

    async def _serve(self, stream: trio.abc.Stream, *, task_status: Any) -> None:
        try:
            await self._server._sessions.serve(stream, self._address, task_status=task_status)
        finally:
            self._session_over.set()

    async def _connected(self) -> trio.abc.Stream:
        if self._stream is None:
            await self.connect()
        assert self._stream is not None
        return self._stream

    # -- sending ----------------------------------------------------------------------
    async def send(self, payload: Payload, *, encoding: Optional[str] = None) -> None:
        """Send one packet carrying ``payload``: a dict (or any mapping, a
        :class:`~asyncapy.core.Packet` included), or a JSON object as a string.

        :param encoding: this packet's encoding, if not the client's (to test the
            session's sticky encoding, say).
        :raises ValueError: if ``payload`` is not a JSON object or a mapping.
        """
        if isinstance(payload, Mapping) and not isinstance(payload, dict):
            payload = dict(payload)
        if encoding is None:
            data = self._packet(payload)
        else:
            default, self._codec = self._codec, codec_named(encoding)
            try:
                data = self._packet(payload)
            finally:
                self._codec = default
        await (await self._connected()).send_all(data)

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as it is: a malformed, partial or pipelined packet."""
        await (await self._connected()).send_all(bytes(data))

    async def send_eof(self) -> None:
        """Shut the client's write side (half-close), as ``socket.shutdown(SHUT_WR)``:
        the server sees the connection end, and the client can still read its replies."""
        stream = await self._connected()
        assert isinstance(stream, trio.abc.HalfCloseableStream)
        await stream.send_eof()

    # -- receiving --------------------------------------------------------------------
    async def receive_raw(self) -> bytes:
        """The next whole packet, headers included; ``b""`` once the server closed.

        :raises TimeoutError: if no packet came within the client's ``timeout``.
        """
        stream = await self._connected()
        try:
            with trio.fail_after(self.timeout) if self.timeout is not None else trio.CancelScope():
                return await self._read_packet(stream)
        except trio.TooSlowError:
            raise TimeoutError(f"no packet from the server within {self.timeout}s") from None

    async def receive(self) -> Dict[Any, Any]:
        """The next packet's payload, decoded by the encoding the packet declares.

        :raises ConnectionError: if the server closed the session.
        :raises TimeoutError: if no packet came within the client's ``timeout``.
        """
        return self._decode(await self.receive_raw())

    async def request(self, payload: Payload, *, encoding: Optional[str] = None) -> Dict[Any, Any]:
        """:meth:`send` then :meth:`receive`."""
        await self.send(payload, encoding=encoding)
        return await self.receive()

    # -- closing ----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Hang up, as a TCP client closing its socket, and wait for the server to end
        the session (in-flight handlers included, for at most the server's
        ``shutdown_grace``): afterwards the session is gone from the session store.
        Idempotent; a client that never connected has nothing to close.
        """
        if self._stream is None:
            return
        await trio.aclose_forcefully(self._stream)
        with trio.move_on_after(self._server.shutdown_grace):
            await self._session_over.wait()

    async def _abort(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"TestClient({self._address}, {state})"
