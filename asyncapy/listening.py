"""Listening: the listeners, their accept loops, and each accepted connection's way in.

One connection's whole path, in :meth:`Listening.handle_connection`, reads top down::

    accept -> a max_connections slot (or a refusal) -> the peer's address
           -> with proxy_protocol: the peer trusted (or refused), the PROXY header's
              client address in its place (asyncapy.proxying)
           -> TLS handshake (when serving TLS)
           -> the session: admission, the session loop, release (asyncapy.sessions)
           -> close

Listeners are plain TCP: TLS is layered on each connection here, once the connection
has a slot, so that whatever must be read before TLS (a proxy's header) has its place
in that path, and a refusal past ``max_connections`` never costs a TLS object. Also
here: binding (shared with ``asyncapy run --workers``' supervisor) and the process's
open-file limit, which caps connections as surely as ``max_connections`` does.

Log lines go to the ``asyncapy.server`` logger, as the rest of the serving machinery's.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import trio

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no open-file rlimit
    resource = None  # type: ignore[assignment]

from asyncapy.domain.addresses import session_group

from .logs import LimitedLog
from .metrics import NULL_RECORDER, Recorder
from .proxying import ProxyGate
from .transport import STREAM_ERRORS, close_at_once, peer_address

if TYPE_CHECKING:  # pragma: no cover
    from .sessions import Sessions

__all__ = ["Listening", "bind_listeners", "raise_open_file_limit", "sockname", "format_address"]

logger: logging.Logger = logging.getLogger("asyncapy.server")

FD_MARGIN = 100
"""File descriptors a server process needs beside its connections (listeners, the
event loop, store connections, logs, what handlers open): the open-file limit must
exceed ``max_connections`` by this much, or it, not ``max_connections``, caps them."""

REFUSAL_LOG_INTERVAL = 1.0
"""Seconds between two warnings about connections refused past ``max_connections``:
a flood of them logs one line per interval, with the count of those not logged."""

HANDSHAKE_LOG_BURST = 10
"""Failed TLS handshakes logged (at INFO) per second, across connections; the rest
are counted in the next line let through (a scanner or a flood of broken clients
would otherwise write a line each)."""

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() failures that mean "out of descriptors or memory for now": retried."""

ACCEPT_RETRY_SECONDS = 0.1
"""How long the accept loop waits after one of :data:`ACCEPT_CAPACITY_ERRNOS`."""


class Listening:
    """The listeners of one server and the connections they accept, up to the moment
    each becomes a session of ``sessions``.

    :param settings: the server's :class:`~asyncapy.config.Settings` (the server
        hands new ones when they change before serving).
    :param sessions: where admitted connections go.
    :param recorder: where metrics go.
    """

    def __init__(self, settings: Any, sessions: "Sessions", *, recorder: Recorder = NULL_RECORDER) -> None:
        self.settings = settings
        self.sessions = sessions
        self.recorder = recorder
        self.connections = 0
        """Connections accepted and being served (refused ones not counted)."""
        self.accepting = False
        """True while the accept loops run (what ``/readyz`` calls listening)."""
        self.ssl_context: Optional[ssl.SSLContext] = None
        """The TLS context connections are served with (None: plain TCP), from
        :meth:`open`."""
        self.proxy_gate: Optional[ProxyGate] = None
        """With ``proxy_protocol`` on, what reads each connection's PROXY header (see
        :mod:`asyncapy.proxying`), from :meth:`open`; None otherwise."""
        self.handshaking: dict[str, int] = {}
        """TLS handshakes in progress, by client address group (as ``session_limit``
        counts them)."""
        self.refusal_log: LimitedLog = LimitedLog(logger, "refused", 1, REFUSAL_LOG_INTERVAL)
        self.handshake_log: LimitedLog = LimitedLog(logger, "failed alike", HANDSHAKE_LOG_BURST, 1.0)
        self.crowd_log: LimitedLog = LimitedLog(logger, "refused alike", 1, REFUSAL_LOG_INTERVAL)

    # -- listeners and the accept loop -------------------------------------------------
    def check_open_file_limit(self) -> None:
        """Raise the open-file limit (once per process) and warn if it caps connections
        below ``max_connections``: every connection is a file descriptor, and past
        the limit ``accept()`` fails, which no client would understand."""
        max_connections = self.settings.max_connections
        limit = raise_open_file_limit()
        if limit is None or limit >= max_connections + FD_MARGIN:
            return
        logger.warning(
            "The open-file limit (%d, the hard limit allows no more) caps this process at "
            "about %d connections, below max_connections=%d: raise the hard limit "
            "(ulimit -Hn; LimitNOFILE= in a systemd unit; docker run --ulimit nofile=N:N) "
            "or lower max_connections",
            limit,
            max(limit - FD_MARGIN, 0),
            max_connections,
        )

    async def open(
        self, sockets: Optional[Sequence[socket.socket]] = None, ssl_context: Optional[ssl.SSLContext] = None
    ) -> list:
        """The listeners to accept on: ``sockets`` (already listening), or new ones
        bound to the settings' ``addr`` and ``port``. Their connections are served with
        ``ssl_context`` (None: plain TCP) and the PROXY protocol settings."""
        settings = self.settings
        if sockets is None:
            listeners = await bind_listeners(settings.addr, settings.port)
        else:
            listeners = [listener_of(sock) for sock in sockets]
            if not listeners:
                raise ValueError("serve(sockets=...) needs at least one listening socket")
        self.ssl_context = ssl_context
        self.proxy_gate = ProxyGate(settings.trusted_proxies, settings.timeout) if settings.proxy_protocol else None
        if self.proxy_gate is not None:
            logger.info(
                "PROXY protocol on: every connection starts with a PROXY header from a trusted proxy (%s)",
                ", ".join(self.proxy_gate.trusted),
            )
        return listeners

    async def accept(self, listeners: list, sessions: trio.Nursery, accepting: trio.CancelScope) -> None:
        """Accept on every listener until ``accepting`` is cancelled, serving each
        connection in a task of ``sessions``; the listeners are closed on the way out."""
        with accepting:
            try:
                self.accepting = True
                async with trio.open_nursery() as loops:
                    for listener in listeners:
                        loops.start_soon(self.accept_from, listener, sessions)
            finally:
                self.accepting = False
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)

    async def accept_from(self, listener: trio.abc.Listener, sessions: trio.Nursery) -> None:
        """Accept connections on ``listener`` and serve each in a task of ``sessions``.

        What ``trio.serve_listeners`` does, less the forced close it wraps every
        connection in (a cancelled checkpoint, a scheduling round per connection):
        :meth:`handle_connection` closes its own. Running out of descriptors (or
        memory) is logged and retried after :data:`ACCEPT_RETRY_SECONDS`, as there.
        """
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error(
                    "accept returned %s (%s); retrying in %ss",
                    errno.errorcode[exc.errno],
                    os.strerror(exc.errno),
                    ACCEPT_RETRY_SECONDS,
                )
                await trio.sleep(ACCEPT_RETRY_SECONDS)
            else:
                sessions.start_soon(self.handle_connection, stream)

    # -- one connection's way in ---------------------------------------------------------
    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection, and close it however that ends."""
        try:
            if self.connections >= self.settings.max_connections:
                await self.refuse(stream)
                return
            try:
                address = peer_address(stream)
            except OSError:
                return  # the client is gone already
            gate = self.proxy_gate
            if gate is not None and not gate.trusts(address):
                self.recorder.connection("refused_proxy")
                await self.sessions.refusals.close(stream, b"")  # no slot held, no reply
                return
            self.connections += 1
            held = True

            def release_slot() -> None:
                # Refused after all (session_limit, store): its lingering close must
                # not hold a max_connections slot, or refusals of one address would
                # lock out every other.
                nonlocal held
                if held:
                    held = False
                    self.connections -= 1

            try:
                if gate is not None:
                    client = await gate.client_address(stream, address)  # before TLS
                    if client is None:
                        self.recorder.connection("refused_proxy")
                        return
                    address = client
                served: trio.abc.Stream = stream
                if self.ssl_context is not None:
                    secured = await self.secure(stream, address, release_slot)
                    if secured is None:
                        return
                    served = secured
                await self.sessions.serve(served, address, release_slot=release_slot)
            finally:
                release_slot()
        finally:
            await close_at_once(stream)

    async def secure(
        self, stream: trio.abc.Stream, address: str, release_slot: Callable[[], None]
    ) -> Optional[trio.SSLStream]:
        """``stream`` wrapped in TLS, its handshake complete; None if it was refused or
        failed (then the connection is to be closed).

        One client address (grouped as ``session_limit`` groups them) may have at most
        ``session_limit`` handshakes in progress, or ``handshake_limit`` when
        ``session_limit`` is 0: a client that opens connections and never sends a
        ClientHello would otherwise hold every ``max_connections`` slot until its
        handshakes time out, as nginx's ``limit_conn`` prevents by running before TLS.
        Past it, the connection is closed at once, its slot given back first."""
        settings = self.settings
        group = session_group(address, settings.session_limit_ipv6_prefix)
        in_progress = self.handshaking.get(group, 0)
        if in_progress >= (settings.session_limit or settings.handshake_limit):
            self.recorder.connection("refused_handshakes")
            self.crowd_log.warning(
                "%s already has %d TLS handshake(s) in progress: refused a connection", address, in_progress
            )
            release_slot()
            await self.sessions.refusals.close(stream, b"")
            return None
        self.handshaking[group] = in_progress + 1
        assert self.ssl_context is not None  # secure() is called only with TLS on
        tls = trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=False)
        try:
            return tls if await self.handshake(tls, address) else None
        finally:
            left = self.handshaking[group] - 1
            if left:
                self.handshaking[group] = left
            else:
                del self.handshaking[group]

    async def handshake(self, stream: trio.SSLStream, address: str) -> bool:
        """Complete the TLS handshake of a new connection within ``handshake_timeout``
        (at most ``timeout``); False (logged, rate-limited) if it failed or did not
        finish in time.

        Before admission, so a client that never finishes its handshake, or fails
        mutual TLS, takes no ``session_limit`` slot and causes no store write."""
        settings = self.settings
        seconds = min(settings.handshake_timeout, settings.timeout)
        which = "handshake_timeout" if settings.handshake_timeout <= settings.timeout else "timeout"
        reason = f"not finished within {which} ({seconds}s)"
        with trio.move_on_after(seconds):
            try:
                await stream.do_handshake()
                return True
            except STREAM_ERRORS as exc:
                cause = exc.__cause__ or exc
                reason = str(cause) or type(cause).__name__
        self.handshake_log.log(logging.INFO, "TLS handshake with %s failed: %s", address, reason)
        self.recorder.connection("tls_handshake_failed")
        return False

    async def refuse(self, stream: trio.abc.Stream) -> None:
        """Close a connection past ``max_connections`` at once: no session, no store,
        no TLS handshake, no reply (no error code fits), just a lingering close of the
        TCP connection, so a client that already wrote a request sees the connection
        end rather than a reset. The warning is rate-limited: a flood is one line a
        second, with the count of those left out."""
        self.recorder.connection("refused_max_connections")
        try:
            address = peer_address(stream)
        except OSError:
            address = "a client gone already"
        self.refusal_log.warning(
            "max_connections (%d) reached: refused a connection from %s", self.settings.max_connections, address
        )
        await self.sessions.refusals.close(stream, b"")

    def log_refusals(self) -> None:
        """Log the refusals the log limits kept out of the log (when the server stops),
        with those of the PROXY protocol."""
        if self.proxy_gate is not None:
            self.proxy_gate.report()
        self.refusal_log.report(
            "max_connections (%d) reached; %d more refused since the last such warning", self.settings.max_connections
        )
        self.crowd_log.report("%d more connection(s) refused for TLS handshakes in progress, not logged")
        self.handshake_log.report("%d more TLS handshake failure(s), not logged")


async def bind_listeners(addr: str, port: int) -> list[trio.SocketListener]:
    """Listen on ``addr``:``port`` (one listener per address it resolves to).

    A failure is an :class:`OSError` whose message names the address, which the
    command line prints as its one error line. :class:`~asyncapy.server.Server` and
    the supervisor of ``asyncapy run --workers`` bind through here, so both fail the
    same way.
    """
    try:
        return await trio.open_tcp_listeners(port, host=addr)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from exc


def listener_of(sock: socket.socket) -> trio.SocketListener:
    """A trio listener accepting on ``sock``, an already listening stdlib socket."""
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"serve(sockets=...) needs listening TCP sockets, not {sock!r}")
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def sockname(listener: Any) -> tuple:
    """The socket address ``listener`` accepts on (through any wrapping listener)."""
    while not hasattr(listener, "socket"):
        listener = listener.transport_listener
    return listener.socket.getsockname()


def format_address(address: tuple) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 host."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def raise_open_file_limit() -> Optional[int]:
    """Raise this process's soft limit on open files to its hard limit (once per
    process; later calls only read it) and return the soft limit, or None where there
    is no such limit (Windows).

    Every connection is a file descriptor, and soft limits are often 1024, where hard
    ones allow far more: a server that did not raise its own would refuse clients at
    ``accept()`` long before :attr:`Server.max_connections
    <asyncapy.server.Server.max_connections>`. The event loop uses epoll/kqueue, never
    ``select()``, so descriptors past 1024 are no problem.
    """
    global _open_file_limit_raised
    if resource is None:  # pragma: no cover
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _open_file_limit_raised or soft == resource.RLIM_INFINITY:
        return soft if soft != resource.RLIM_INFINITY else None
    _open_file_limit_raised = True
    # An unlimited hard limit is still capped by the kernel (fs.nr_open on Linux,
    # kern.maxfilesperproc on macOS), which refuses a larger soft limit: try less.
    targets = (hard,) if hard != resource.RLIM_INFINITY else (1 << 20, 1 << 16, 10240)
    for target in targets:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        logger.debug("Raised the open-file limit from %d to %d", soft, target)
        return target
    return soft


_open_file_limit_raised = False
