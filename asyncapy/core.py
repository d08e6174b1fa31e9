"""What handlers see: ``Client``, ``Packet``, ``Handler`` and ``Session``.

A handler is ``async def handler(client: Client, packet: Packet)``. It answers with
``await client.send(Packet({...}, encoding=client.encoding))``, may close the session
with ``await client.close()``, and may stop the packet from reaching later groups with
``packet.stop_propagation()``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any, Awaitable, Callable, Iterator, Optional, Protocol, Union

import trio

from asyncapy.domain.addresses import IPAddress, parse_address
from asyncapy.domain.codecs import CODECS_BY_NAME, Codec, codec_named
from asyncapy.domain.connection import Connection
from asyncapy.domain.dispatch import Handler
from asyncapy.domain.errors import StopPropagation

from .transport import Channel

__all__ = ["Client", "Packet", "Handler", "HandlerFunction", "Session"]


class _Serving(Protocol):
    """What a :class:`Client` asks of what serves it (the server's
    :class:`~asyncapy.sessions.Sessions`): its channel and protocol state, and the
    sessions of an address. Named here, not imported, so that what handlers see does
    not depend on the server that serves them."""

    def attach(self, client: "Client") -> None: ...

    async def sessions_of(self, address: str) -> list["Session"]: ...


class Client:
    """The peer of a session, as a handler sees it.

    :param address: the client's IP address (the peer's, not the server's).
    :param server: what serves it (the server's sessions, :class:`asyncapy.sessions.Sessions`).
    :param stream: the trio stream of the connection.
    :param session: the :class:`Session` (or its id, replaced by the server).
    :param encoding: the session's encoding, ``'json'`` or ``'ziproto'``.
    """

    __slots__ = (
        "address", "ip", "session", "encoding", "handler", "_server", "_stream", "_channel", "_connection", "_limits",
    )

    def __init__(
        self,
        address: str,
        server: _Serving,
        stream: trio.abc.Stream,
        session: Any,
        encoding: str,
    ) -> None:
        codec_named(encoding)
        self.address: str = address
        self.ip: Optional[IPAddress] = parse_address(address)
        """The address parsed by :mod:`ipaddress` (None if it is not an IP)."""
        self.session: Any = session
        self.encoding: str = encoding
        self.handler: Optional[Handler] = None
        """The handler the dispatcher called last for this client (for logs)."""
        self._server = server
        self._stream = stream
        self._channel: Optional[Channel] = None
        self._connection: Optional[Connection] = None
        """The session's protocol state: what :meth:`send` encodes with."""
        self._limits: Any = None
        """The server's rate limits (:class:`asyncapy.limits.Limits`), which
        ``Filters.APIFactory`` applies to key checks; None for a client made by hand."""

    def _writer(self) -> Channel:
        if self._channel is None:
            self._server.attach(self)
        assert self._channel is not None
        return self._channel

    @property
    def closed(self) -> bool:
        """True once the session's connection is closed."""
        channel = self._channel
        return channel is not None and channel.closed

    async def send(self, packet: Union["Packet", Mapping[str, Any]], close: bool = False) -> None:
        """Send ``packet`` to the client, in the packet's encoding.

        A plain ``dict`` is sent too, in the session's encoding (``client.encoding``):
        ``await client.send({"ok": True})`` is the reply a handler most often means.
        Anything else (a list, a string, None) is refused with a :class:`TypeError`
        showing the ``Packet(...)`` to write, before anything is sent.

        On a busy server the packet may be written a moment after this returns, with
        the other replies of the same scheduling round (see :class:`asyncapy.transport.Pacer`): it is
        encoded and has its place on the connection, ahead of anything sent later.

        :param close: close the session right after the packet is written.
        :raises trio.ClosedResourceError: if the session is already closed.
        :raises trio.BrokenResourceError: if the client went away (or an earlier
            packet's deferred write found it gone).
        :raises asyncapy.domain.errors.CodecError: if the packet holds a value its encoding
            cannot represent (bytes in JSON, an integer beyond 64 bits in ZiProto).
        """
        if type(packet) is not Packet and not isinstance(packet, Packet):
            if not isinstance(packet, Mapping):
                raise TypeError(
                    f"client.send() takes a Packet or a dict, not {type(packet).__name__}: "
                    "write await client.send(Packet({...}, encoding=client.encoding))"
                )
            packet = Packet(packet, encoding=self.encoding)
        channel = self._channel or self._writer()
        await channel.send(self._connection.encode(packet._fields, packet._codec))  # type: ignore[union-attr]
        if close:
            await self.close()

    async def close(self) -> None:
        """Close the session: the connection ends and no later group sees the packet."""
        await self._writer().aclose()

    async def get_sessions(self) -> list["Session"]:
        """The live sessions of this client's address (this one included)."""
        return await self._server.sessions_of(self.address)

    def __repr__(self) -> str:
        return f"Client({self.address})"


class Packet(Mapping[str, Any]):
    """A payload and its encoding; a read-only mapping of the payload's fields.

    ``"key" in packet``, ``packet["key"]``, ``packet.get("key")``, ``len(packet)`` and
    iteration work as on a dict; the packet itself cannot be changed.

    :param fields: a ``dict``, or a JSON object as ``str`` or UTF-8 ``bytes``.
    :param encoding: ``'json'`` or ``'ziproto'``: how the packet is written when sent.
    :param sender: the :class:`Client` that sent it (set by the server).
    :raises ValueError: on another encoding, malformed JSON, or JSON that is not an
        object.
    """

    __slots__ = ("_fields", "_codec", "sender")

    def __init__(
        self,
        fields: Union[Mapping[str, Any], str, bytes],
        encoding: str,
        sender: Optional[Client] = None,
    ) -> None:
        if not isinstance(encoding, str) or encoding not in CODECS_BY_NAME:
            raise ValueError(f"encoding must be 'json' or 'ziproto', not {encoding!r}")
        if isinstance(fields, (str, bytes, bytearray)):
            try:
                fields = json.loads(fields)
            except ValueError as exc:
                raise ValueError(f"malformed JSON: {exc}") from None
            if not isinstance(fields, dict):
                raise ValueError(f"JSON must be an object, not {type(fields).__name__}")
        elif isinstance(fields, Mapping):
            fields = dict(fields)
        else:
            raise ValueError(f"fields must be a dict or a JSON object, not {type(fields).__name__}")
        self._fields = fields
        self._codec = CODECS_BY_NAME[encoding]
        self.sender: Optional[Client] = sender

    @classmethod
    def _received(cls, fields: dict[str, Any], codec: Codec, sender: Client) -> "Packet":
        packet = cls.__new__(cls)
        packet._fields = fields
        packet._codec = codec
        packet.sender = sender
        return packet

    @property
    def encoding(self) -> str:
        """``'json'`` or ``'ziproto'``."""
        return self._codec.name

    @property
    def dict_payload(self) -> dict[str, Any]:
        """A copy of the fields as a plain ``dict`` (0.5 name)."""
        return dict(self._fields)

    @property
    def payload(self) -> str:
        """The fields as a JSON string (0.5 name)."""
        return json.dumps(self._fields)

    @property
    def length(self) -> int:
        """The length of :attr:`payload` (0.5 name)."""
        return len(self.payload)

    def stop_propagation(self) -> None:
        """Keep this packet from reaching later groups: raises ``StopPropagation``.

        A plain method, so both ``packet.stop_propagation()`` and the 0.5 spelling
        ``await packet.stop_propagation()`` work (the exception is raised before
        anything is awaited).
        """
        raise StopPropagation

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of field ``key``, or ``default``."""
        return self._fields.get(key, default)

    def __repr__(self) -> str:
        return f"Packet({self._fields!r}, encoding={self.encoding!r})"


HandlerFunction = Callable[[Client, Packet], Awaitable[None]]
"""What ``@server.add_handler(...)`` decorates: ``async def handler(client: Client,
packet: Packet) -> None``. Its reply is what it sends; a returned value goes nowhere."""


class Session:
    """One connection's session.

    :param session_id: the session's UUID4.
    :param client: the :class:`Client` of this session (``None`` for a session held
        by another server process sharing the store).
    :param date: UNIX timestamp of the session's creation.
    """

    __slots__ = ("session_id", "client", "date", "server_id")

    def __init__(
        self,
        session_id: uuid.UUID,
        client: Optional[Client],
        date: float,
        server_id: str = "",
    ) -> None:
        self.session_id: uuid.UUID = session_id
        self.client: Optional[Client] = client
        self.date: float = date
        self.server_id: str = server_id
        """The server process that owns the session."""

    async def close(self) -> None:
        """Close the session's connection (only for sessions of this process)."""
        if self.client is None:
            raise RuntimeError(
                f"session {self.session_id} belongs to server {self.server_id!r}; "
                "only its own process can close it"
            )
        await self.client.close()

    def get_client(self) -> Optional[Client]:
        """The session's :class:`Client` (``None`` if another process owns it)."""
        return self.client

    def __repr__(self) -> str:
        return f"Session({self.session_id})"

    def __str__(self) -> str:
        return str(self.session_id)

    def __hash__(self) -> int:
        return hash(self.session_id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Session):
            return self.session_id == other.session_id
        return NotImplemented
