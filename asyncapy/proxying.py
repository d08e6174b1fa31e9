"""The PROXY protocol on the serving side: whose header is believed, and the header
read off the socket before anything else.

With ``proxy_protocol`` on, every connection comes from a load balancer (HAProxy, nginx
``stream``, a cloud network balancer) and starts with a PROXY header (v1 or v2) naming
the client. :meth:`ProxyGate.client_address` runs once per connection in
:meth:`asyncapy.listening.Listening.handle_connection`, between the peer's address and
the TLS handshake (the header precedes TLS), and gives the address the rest of the
server sees as the client's: ``session_limit`` (through ``session_group``),
``Filters.Ip``, ``get_sessions()`` and the logs.

The rules, in order (docs/security.md, "Behind a load balancer"):

- A peer that is not in ``trusted_proxies`` is never believed: its connection is
  closed without a reply (a lingering close, holding no ``max_connections`` slot) and
  logged, at most one line a second with the count of those not logged. Whether its
  first bytes look like a header does not matter: the specification forbids guessing.
- A trusted proxy's connection must start with a valid header, completely, within
  :func:`header_deadline` (``min(timeout, 5 s)``: a proxy writes it with the connect);
  one without a header (the balancer was not told to send one), a malformed,
  oversized (past :data:`~asyncapy.domain.proxy.DEFAULT_MAX_LENGTH`) or trickling
  header closes that connection at once, and only that one, logged the same way. A
  connection closed or reset before its first byte (a connect-only health check) is
  closed quietly: nothing was sent, nothing is wrong.
- A LOCAL header (v2; a balancer's health check, HAProxy's ``check-send-proxy``), v1
  ``UNKNOWN``, and an UNSPEC or Unix-socket client name no client: the session is
  served with the address :data:`~asyncapy.domain.proxy.UNKNOWN_CLIENT`, which no
  ``Filters.Ip`` matches and which is one ``session_limit`` group of its own. Never
  the proxy's own address: with a balancer on the server's machine that is
  127.0.0.1, which would pass an admin guard written for local tools.

The header is parsed by the pure :class:`~asyncapy.domain.proxy.ProxyParser`; this
module only moves bytes, **byte-exactly**: it looks at what has arrived with
``MSG_PEEK`` and consumes the header's bytes, never one more. The client's first bytes
(or its TLS ClientHello) stay in the kernel's receive buffer, so the TLS layer and the
plain-TCP direct reads of :mod:`asyncapy.transport` find the stream exactly as they
would without a proxy: no stream wrapper replaying leftovers, no change to the
session's read path. That costs one ``recv`` with ``MSG_PEEK`` and one without per
connection (a header that arrives in pieces: a pair per piece).
"""

from __future__ import annotations

import logging
import socket
from typing import Optional, Union

import trio

from asyncapy.domain.addresses import canonical_address
from asyncapy.domain.proxy import (
    DEFAULT_MAX_LENGTH,
    NEED_DATA,
    UNKNOWN_CLIENT,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    TrustedProxies,
)

from .logs import LimitedLog
from .transport import transport_of

__all__ = [
    "ProxyGate",
    "GONE",
    "read_proxy_header",
    "header_deadline",
    "PROXY_HEADER_SECONDS",
    "PROXY_LOG_INTERVAL",
]

logger: logging.Logger = logging.getLogger("asyncapy.server")

PROXY_HEADER_SECONDS = 5.0
"""The longest a trusted proxy's connection may take to deliver its whole PROXY header
(capped by the server's ``timeout``). A balancer writes the header with the connect,
in one segment: seconds is already generous, and a header still incomplete by then is
a broken or hostile peer holding a ``max_connections`` slot."""

PROXY_LOG_INTERVAL = 1.0
"""Seconds between two warnings of each kind (a peer that is not a trusted proxy; a
trusted proxy's connection without a valid header): a flood logs one line per
interval, with the count of those not logged."""


GONE = ProxyError("the peer closed the connection before sending anything")
""":func:`read_proxy_header`'s verdict on a connection closed (or reset) before its
first byte: a port scan, a balancer's connect-only health check. Not a bad header:
closed quietly (logged at debug level), as a client gone before its session began."""


def header_deadline(timeout: float) -> float:
    """Seconds a connection gets for its PROXY header: ``min(timeout, 5)``."""
    return min(timeout, PROXY_HEADER_SECONDS)


async def read_proxy_header(
    sock: trio.socket.SocketType, max_length: int = DEFAULT_MAX_LENGTH
) -> Union[ProxyHeader, ProxyError]:
    """Read one PROXY header from ``sock``, consuming its bytes and no others.

    Each round peeks at what has arrived (at most ``max_length`` bytes of header in
    all) and parses the header's bytes consumed so far plus those. Still incomplete:
    every byte seen belongs to the header (the parser's verdict on a prefix never
    changes), so they are consumed, and the next peek waits for more. Complete: only
    the header's own bytes are consumed; :attr:`ProxyHeader.leftover` is therefore
    always ``b""`` here, its bytes still unread in the socket. :data:`GONE` if the
    peer closed before its first byte; ``OSError`` if the connection fails; no
    deadline of its own (the caller's)."""
    consumed = b""
    while True:
        peeked = await sock.recv(max(max_length - len(consumed), 1), socket.MSG_PEEK)
        if not peeked and not consumed:
            return GONE
        parser = ProxyParser(max_length)
        if consumed:
            parser.receive_data(consumed)
        parser.receive_data(peeked)  # b"": the peer closed, which the parser reports
        event = parser.next_event()
        if event is NEED_DATA:
            consumed += await _consume(sock, len(peeked))
            continue
        if type(event) is ProxyError:
            return event
        assert isinstance(event, ProxyHeader)
        await _consume(sock, len(peeked) - len(event.leftover))
        return event._replace(leftover=b"")


async def _consume(sock: trio.socket.SocketType, count: int) -> bytes:
    """Read exactly ``count`` bytes already peeked at (they are in the receive buffer,
    so one ``recv`` returns them all; looped in case of an exotic stack)."""
    data = b""
    while len(data) < count:
        chunk = await sock.recv(count - len(data))
        if not chunk:  # pragma: no cover - peeked bytes cannot vanish
            raise OSError("the connection ended while its PROXY header was read")
        data += chunk
    return data


class ProxyGate:
    """The PROXY protocol for one server's connections: who is trusted, the header's
    read within its deadline, and the rate-limited warnings when a connection is
    turned away. Made by :class:`~asyncapy.listening.Listening` when the listeners
    open with ``proxy_protocol`` on (and only then: without it, a connection costs
    nothing here)."""

    def __init__(self, trusted: TrustedProxies, timeout: float) -> None:
        self.trusted = trusted
        """The proxies whose headers are believed (``trusted_proxies``)."""
        self.deadline: float = header_deadline(timeout)
        """Seconds a connection gets for its header (:func:`header_deadline`)."""
        self.untrusted_log: LimitedLog = LimitedLog(logger, "refused alike", 1, PROXY_LOG_INTERVAL)
        self.invalid_log: LimitedLog = LimitedLog(logger, "closed alike", 1, PROXY_LOG_INTERVAL)

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` (the TCP peer's address) may send a PROXY header; logs the
        refusal (rate-limited) when it may not. The caller closes the connection
        without a reply."""
        if peer in self.trusted:
            return True
        self.untrusted_log.warning(
            "PROXY protocol: refused a connection from %s, not a trusted proxy (trusted_proxies: %s)",
            peer,
            ", ".join(self.trusted),
        )
        return False

    async def client_address(self, stream: trio.abc.Stream, peer: str) -> Optional[str]:
        """The client's address as the PROXY header of ``stream`` (a connection from
        the trusted proxy ``peer``) names it, read within :attr:`deadline`;
        :data:`~asyncapy.domain.proxy.UNKNOWN_CLIENT` for a header that names none;
        None (logged, rate-limited) if the connection must be closed: no valid header
        in time, or the peer gone."""
        event: Union[ProxyHeader, ProxyError, None] = None
        with trio.move_on_after(self.deadline):
            try:
                event = await read_proxy_header(transport_of(stream).socket)
            except OSError as exc:
                logger.debug("PROXY protocol: the connection from proxy %s failed before its header: %s", peer, exc)
                return None
        if event is None:
            event = ProxyError(f"no complete PROXY header within {self.deadline:g}s")
        if event is GONE:
            logger.debug("PROXY protocol: %s closed the connection before sending anything", peer)
            return None
        if type(event) is ProxyError:
            self.invalid_log.warning("PROXY protocol: closed a connection from proxy %s: %s", peer, event.reason)
            return None
        if not event.has_client:  # LOCAL, UNKNOWN, UNSPEC, a Unix socket
            logger.debug(
                "PROXY v%d header from %s with no client address (%s): served as %r",
                event.version,
                peer,
                "LOCAL" if event.local else event.family,
                UNKNOWN_CLIENT,
            )
            return UNKNOWN_CLIENT
        return canonical_address(event.source)

    def report(self) -> None:
        """Log the refusals not logged yet (when the server stops)."""
        self.untrusted_log.report(
            "PROXY protocol: %d more connection(s) from untrusted peers refused since the last such warning"
        )
        self.invalid_log.report(
            "PROXY protocol: %d more connection(s) without a valid PROXY header closed since the last such warning"
        )
