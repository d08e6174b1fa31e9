"""``Server``: configuration, handler registration, the trio accept loop, and sessions.

The server is a driving adapter around the pure core: for each connection it reads
bytes, feeds them to a :class:`asyncapy.domain.connection.Connection`, hands every decoded
request to the :class:`asyncapy.domain.dispatch.Dispatcher`, and writes what comes back. No
protocol rule lives here; what lives here is I/O policy: admission, idle timeouts,
lingering closes, TLS, logging, signals and graceful shutdown.
"""

from __future__ import annotations

import configparser
import errno
import logging
import math
import os
import signal
import socket
import ssl
import time
import uuid
from typing import Any, Callable, Optional, Sequence, Union

import trio

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no open-file rlimit
    resource = None  # type: ignore[assignment]

from asyncapy.domain import codecs
from asyncapy.domain.addresses import session_group
from asyncapy.domain.codecs import JSON, codec_named
from asyncapy.domain.connection import NEED_DATA, Connection, ProtocolError, Request, error_payload
from asyncapy.domain.dispatch import Dispatcher, Handler, HandlerFailed
from asyncapy.domain.errors import (
    StoreUnavailable,
    ERR_INTERNAL,
    ERR_SESSION_LIMIT_REACHED,
    ERR_TIMED_OUT,
    ERR_UNAVAILABLE,
)
from asyncapy.domain.framing import Framer
from asyncapy.domain.limits import PacketMemory
from asyncapy.domain.ports import SessionRecord, SessionStore

from .config import SETTINGS, ConfigError, check_proxy_settings, load_config, validate
from .core import Client, Packet, Session
from .stores import open_session_store
from .transport import (
    transport_of,
    STREAM_ERRORS,
    Channel,
    Pacer,
    Refusals,
    close_at_once,
    linger_close,
    peer_address,
    read_now,
    receive_waiting,
)
from .util import where_keys_live

__all__ = ["Server"]

logger = logging.getLogger("asyncapy.server")

LOG_BURST = 10
"""Protocol-error warnings (and, apart, handler tracebacks) one session logs per
:data:`LOG_INTERVAL`; the rest are counted, and the count is logged with the next
line let through, or when the session ends."""

LOG_INTERVAL = 10.0
"""Seconds of the window :data:`LOG_BURST` counts lines in."""

REFUSED_LOG_INTERVAL = 1.0
"""Seconds between two log lines about connections refused for ``session_limit`` or
for an unavailable store (each kind apart); the lines carry the count of those not
logged."""

_TLS_FILES = ("certfile", "keyfile", "cafile")

FD_MARGIN = 100
"""File descriptors a server process needs beside its connections (listeners, the
event loop, store connections, logs, what handlers open): the open-file limit must
exceed ``max_connections`` by this much, or it, not ``max_connections``, caps them."""

REFUSAL_LOG_INTERVAL = 1.0
"""Seconds between two warnings about connections refused past ``max_connections``:
a flood of them logs one line per interval, with the count of those not logged."""

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() failures that mean "out of descriptors or memory for now": retried."""

ACCEPT_RETRY_SECONDS = 0.1
"""How long the accept loop waits after one of :data:`ACCEPT_CAPACITY_ERRNOS`."""

class Server:
    """An AsyncAProto 22 server.

    Every argument is validated; a bad one raises
    :class:`~asyncapy.config.ConfigError` (a ``ValueError``) naming the parameter, the
    value and what is accepted. The positional parameters and their defaults are
    those of AsyncAPY 0.5 (``addr`` to ``session_limit``); the ones after them are
    keyword-only additions.

    :param addr: address to bind (``'127.0.0.1'``; ``'0.0.0.0'`` for every IPv4
        interface, ``'::'`` for every IPv6 one).
    :param port: TCP port (8081; 0 picks a free one, see :attr:`addresses`).
    :param buf: bytes asked of the socket per read (1024).
    :param logging_level: level of the ``asyncapy`` loggers (20 = INFO; a name works too).
    :param console_format: :mod:`logging` format of the console handler.
    :param datefmt: date format of the console handler.
    :param timeout: seconds a session may go without a *complete* packet before it is
        answered ``ERR_TIMED_OUT`` and closed (60). A packet trickling in byte by byte
        does not keep a session alive. A session whose reply made no progress for as
        long (its client stopped reading) is closed too, without a reply.
    :param header_size: bytes of the Content-Length header: 2, 4 (standard) or 8.
    :param byteorder: ``'big'`` (standard) or ``'little'``.
    :param config: path of an INI file whose ``[AsyncAPY]`` section overrides these
        parameters (same key names, plus ``encoding``). Unknown keys are an error.
    :param cfg_parser: a :class:`configparser.ConfigParser` to read the config with
        (already loaded, if ``config`` is None).
    :param session_limit: live sessions one client may hold (0 = unlimited): an IPv4
        address, or an IPv6 prefix of ``session_limit_ipv6_prefix`` bits.

    :param max_packet_size: largest Content-Length accepted (1 MiB; AsyncAPY 0.5
        accepted 16 MiB). A larger one is answered ``ERR_PACKET_TOO_LARGE`` from the
        header alone, and the session closed.
    :param max_packet_memory: bytes that packets above 16 KiB may hold at once, across
        all sessions, from their header to the end of their handlers (256 MiB): their
        buffer, and what they decode to, estimated from their element count. A packet
        that does not fit is answered ``ERR_PACKET_TOO_LARGE`` before it is buffered or
        decoded, and the session closed (see docs/security.md).
    :param encoding: encoding of error replies sent before a session's encoding is
        known: ``'json'`` (default) or ``'ziproto'``.
    :param certfile: PEM certificate chain: serve TLS with it.
    :param keyfile: PEM private key of ``certfile`` (if not inside it).
    :param cafile: PEM CA bundle: require client certificates signed by it (mutual TLS).
    :param ssl_context: a ready server-side :class:`ssl.SSLContext` instead of the files.
    :param shutdown_grace: seconds in-flight handlers get to finish on shutdown (10).
    :param store: where sessions live: ``None`` or ``'memory://'`` (this process only),
        a ``redis://`` URL shared by every server process using it, or a
        :class:`asyncapy.domain.ports.SessionStore` object.
    :param session_lease: seconds a session in a shared store outlives its process's
        last lease renewal (30): how long the sessions of a killed process linger.
    :param max_connections: connections this process serves at once (10,000). Past
        it, a new connection is accepted and closed at once (lingering, without a
        reply), and a warning is logged at most once per second. Serving raises the
        process's soft open-file limit to its hard limit, and warns if that limit is
        still too low for ``max_connections`` (it would then be the real cap).
    :param handler_timeout: seconds a packet's handlers (all its groups, their
        filters included) may run (``None``, the default: no deadline). Past it they
        are cancelled, a warning names the session and the handler, and the client
        gets ``ERR_INTERNAL``; the session goes on. A handler cancelled in the middle
        of writing a reply leaves the stream in an unknown state: that session is
        closed instead.
    :param max_protocol_errors: protocol errors in a row (packets answered with an
        error reply, with no valid packet between them) after which a session is
        closed (100; 0: never). The last one's reply is sent first.
    :param store_timeout: seconds the session store gets to admit (or release) a
        session (5). An admission it does not answer in time is answered
        ``ERR_UNAVAILABLE`` and the connection closed, as when the store is down.
    :param session_limit_ipv6_prefix: leading bits of an IPv6 address that
        ``session_limit`` counts as one client (64: a /64, what one host is
        typically given; 128: each address alone). IPv4 clients are counted by
        address. Handlers still see each client's own address.
    :param proxy_protocol: every connection starts with a PROXY protocol header (v1
        or v2, HAProxy's) from a proxy in ``trusted_proxies`` (False).
    :param trusted_proxies: the proxies whose PROXY headers are believed: IP addresses
        and CIDR networks, IPv4 or IPv6, as a list or one comma-separated string (none).
        Required when ``proxy_protocol`` is on.

    ``ssl_context`` and the certificate settings (``certfile``, ``keyfile``,
    ``cafile``, from the arguments, a config file or ``asyncapy run``'s flags) are
    exclusive: combining them is a :class:`~asyncapy.config.ConfigError` naming
    both, because the files would replace the context and everything it requires
    (client certificates above all) without a word.
    """

    def __init__(
        self,
        addr: str = "127.0.0.1",
        port: int = 8081,
        buf: int = 1024,
        logging_level: int = 20,
        console_format: str = "[%(levelname)s] %(asctime)s %(message)s",
        datefmt: str = "%d/%m/%Y %H:%M:%S %p",
        timeout: float = 60,
        header_size: int = 4,
        byteorder: str = "big",
        config: Optional[str] = None,
        cfg_parser: Optional[configparser.ConfigParser] = None,
        session_limit: int = 0,
        *,
        max_packet_size: int = SETTINGS["max_packet_size"].default,
        max_packet_memory: int = SETTINGS["max_packet_memory"].default,
        encoding: str = "json",
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
        cafile: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        shutdown_grace: float = 10.0,
        store: Union[None, str, SessionStore] = None,
        session_lease: float = 30.0,
        max_connections: int = SETTINGS["max_connections"].default,
        handler_timeout: Optional[float] = SETTINGS["handler_timeout"].default,
        max_protocol_errors: int = SETTINGS["max_protocol_errors"].default,
        store_timeout: float = SETTINGS["store_timeout"].default,
        session_limit_ipv6_prefix: int = SETTINGS["session_limit_ipv6_prefix"].default,
        proxy_protocol: bool = SETTINGS["proxy_protocol"].default,
        trusted_proxies: Any = SETTINGS["trusted_proxies"].default,
    ) -> None:
        given = dict(
            addr=addr,
            port=port,
            buf=buf,
            logging_level=logging_level,
            console_format=console_format,
            datefmt=datefmt,
            timeout=timeout,
            header_size=header_size,
            byteorder=byteorder,
            session_limit=session_limit,
            max_packet_size=max_packet_size,
            max_packet_memory=max_packet_memory,
            encoding=encoding,
            certfile=certfile,
            keyfile=keyfile,
            cafile=cafile,
            shutdown_grace=shutdown_grace,
            session_lease=session_lease,
            max_connections=max_connections,
            handler_timeout=handler_timeout,
            max_protocol_errors=max_protocol_errors,
            store_timeout=store_timeout,
            session_limit_ipv6_prefix=session_limit_ipv6_prefix,
            proxy_protocol=proxy_protocol,
            trusted_proxies=trusted_proxies,
        )
        if not isinstance(store, SessionStore):
            given["store"] = store
        settings = {name: validate(name, value) for name, value in given.items()}
        if cfg_parser is not None and not isinstance(cfg_parser, configparser.RawConfigParser):
            raise ConfigError("cfg_parser", cfg_parser, "a configparser.ConfigParser or None")
        tls_sources = {name: "Server()" for name in _TLS_FILES if settings[name] is not None}
        if config is not None or cfg_parser is not None:
            loaded = load_config(config, cfg_parser)
            settings.update(loaded)
            source = os.fspath(config) if config is not None else "the config parser"
            tls_sources.update((name, source) for name in _TLS_FILES if name in loaded)
        self.config = config
        self.addr: str = settings["addr"]
        self.port: int = settings["port"]
        self.buf: int = settings["buf"]
        self.logging_level: int = settings["logging_level"]
        self.console_format: str = settings["console_format"]
        self.datefmt: str = settings["datefmt"]
        self.timeout: float = settings["timeout"]
        self.header_size: int = settings["header_size"]
        self.byteorder: str = settings["byteorder"]
        self.session_limit: int = settings["session_limit"]
        self.max_packet_size: int = settings["max_packet_size"]
        self.max_packet_memory: int = settings["max_packet_memory"]
        self.encoding: str = settings["encoding"]
        self.certfile: Optional[str] = settings["certfile"]
        self.keyfile: Optional[str] = settings["keyfile"]
        self.cafile: Optional[str] = settings["cafile"]
        self.shutdown_grace: float = settings["shutdown_grace"]
        self.max_connections: int = settings["max_connections"]
        self.handler_timeout: Optional[float] = settings["handler_timeout"]
        self.max_protocol_errors: int = settings["max_protocol_errors"]
        self.store_timeout: float = settings["store_timeout"]
        self.session_limit_ipv6_prefix: int = settings["session_limit_ipv6_prefix"]
        self.proxy_protocol: bool = settings["proxy_protocol"]
        self.trusted_proxies = settings["trusted_proxies"]
        check_proxy_settings(self.proxy_protocol, self.trusted_proxies)
        self._store_spec: Union[None, str, SessionStore] = None
        self.session_lease = settings["session_lease"]

        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise ConfigError("ssl_context", ssl_context, "an ssl.SSLContext or None")
        self._files_context: Optional[ssl.SSLContext] = None
        """The context built from the certificate files, if that is where
        :attr:`ssl_context` came from (any other context is the application's own)."""
        self.ssl_context: Optional[ssl.SSLContext] = ssl_context
        if ssl_context is not None:
            for name in _TLS_FILES:
                if settings[name] is not None:
                    raise tls_conflict(name, settings[name], tls_sources[name])
        else:
            self._use_tls_files()
        self.store = settings.get("store", store)

        self.server_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Identifies this server process in a shared session store."""
        self.addresses: list[tuple] = []
        """The (host, port, ...) socket addresses being served, once started."""
        self._dispatcher = Dispatcher()
        self._pacer = Pacer()  # direct writes since a read, for all sessions (see Pacer)
        self._packet_memory = PacketMemory(self.max_packet_memory)
        """What large packets hold, across sessions (see asyncapy.domain.limits)."""
        self._sessions: dict[str, Session] = {}
        self._idle_states: dict[str, _Idle] = {}
        self._stopping: Optional[trio.Event] = None
        self._idle: Optional[trio.Event] = None
        self._connections = 0
        """Connections accepted and being served (refused ones not counted)."""
        self._refusals_unlogged = 0
        self._refusal_logged_at = -math.inf
        self._refusals = Refusals()
        """The lingering closes of refused connections (bounded)."""
        self._limit_log = _LogLimit(1, REFUSED_LOG_INTERVAL)
        self._unavailable_log = _LogLimit(1, REFUSED_LOG_INTERVAL)

    # -- the session store ------------------------------------------------------------
    # Properties, so that assigning a URL (as `asyncapy run --config` and load_config()
    # do with a config file's `store` and `session_lease` keys) opens the store it names,
    # instead of leaving a string where the server expects a SessionStore.
    @property
    def store(self) -> SessionStore:
        """Where sessions live. Assign a store URL or a store object before serving."""
        return self._store

    @store.setter
    def store(self, store: Union[None, str, SessionStore]) -> None:
        if not isinstance(store, SessionStore):
            store = validate("store", store)
        self._store_spec = store
        self._store = open_session_store(store, self.session_lease)

    @property
    def session_lease(self) -> float:
        """Seconds a session in a shared store outlives this process's last renewal."""
        return self._session_lease

    @session_lease.setter
    def session_lease(self, lease: float) -> None:
        self._session_lease = validate("session_lease", lease)
        spec = self._store_spec
        if isinstance(spec, str) and not spec.lower().startswith("memory://"):
            self._store = open_session_store(spec, self._session_lease)  # the new lease

    # -- configuration helpers -------------------------------------------------------
    def _has_own_tls_context(self) -> bool:
        """True when :attr:`ssl_context` is the application's, not built from the files."""
        return self.ssl_context is not None and self.ssl_context is not self._files_context

    def _use_tls_files(self, sources: Optional[dict] = None) -> None:
        """Serve TLS as the certificate settings say (or plain TCP without them).

        ``sources`` maps the file settings that just changed to where they came
        from (``'--certfile'``, a config file's path): if the application built its
        own :attr:`ssl_context`, changing them is refused with a
        :class:`~asyncapy.config.ConfigError` naming both (:func:`tls_conflict`),
        before anything is changed."""
        if sources and self._has_own_tls_context():
            name = next(name for name in _TLS_FILES if name in sources)
            raise tls_conflict(name, sources[name][0], sources[name][1])
        if sources:
            for name, (value, _) in sources.items():
                setattr(self, name, value)
        self.ssl_context = self._files_context = self._tls_from_files()

    def _tls_from_files(self) -> Optional[ssl.SSLContext]:
        if self.certfile is None:
            if self.keyfile is not None or self.cafile is not None:
                key = "keyfile" if self.keyfile is not None else "cafile"
                raise ConfigError(key, getattr(self, key), "only together with certfile")
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "certfile", self.certfile, f"a readable PEM certificate chain with its key ({exc})"
            ) from None
        if self.cafile is not None:
            try:
                context.load_verify_locations(self.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("cafile", self.cafile, f"a readable PEM CA bundle ({exc})") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def load_config(self) -> None:
        """Re-read :attr:`config` and apply it (0.5 API; the constructor already does)."""
        values = load_config(self.config)
        source = os.fspath(self.config) if self.config is not None else "the config parser"
        tls = {name: (values.pop(name), source) for name in _TLS_FILES if name in values}
        if tls and self._has_own_tls_context():
            self._use_tls_files(tls)  # raises, before any setting is changed
        check_proxy_settings(
            values.get("proxy_protocol", self.proxy_protocol), values.get("trusted_proxies", self.trusted_proxies), source
        )
        for name, value in values.items():
            setattr(self, name, value)
        if tls:
            self._use_tls_files(tls)

    # -- registration ----------------------------------------------------------------
    def register_handler(self, handler: Callable, *filters: Any, group: int = 0) -> Handler:
        """Register the async function ``handler`` in ``group``, guarded by ``filters``.

        Groups run in ascending order; inside a group, the first handler (in
        registration order) whose filters all pass is called. Returns the
        :class:`~asyncapy.core.Handler`.
        """
        return self._dispatcher.register(Handler(handler, filters), group)

    def add_handler(self, *filters: Any, group: int = 0) -> Callable[[Callable], Callable]:
        """Decorator form of :meth:`register_handler`; returns the function unchanged::

            @server.add_handler(Filters.Fields(ping=None), group=-1)
            async def ping(client, packet): ...
        """
        if filters and callable(filters[0]) and not hasattr(filters[0], "check"):
            raise TypeError(
                "add_handler is a decorator factory: write @server.add_handler(), "
                "with parentheses"
            )

        def decorate(function: Callable) -> Callable:
            self.register_handler(function, *filters, group=group)
            return function

        return decorate

    @property
    def handlers(self) -> tuple:
        """``((group, (Handler, ...)), ...)`` in dispatch order."""
        return self._dispatcher.groups

    # -- hooks -----------------------------------------------------------------------
    async def setup(self) -> None:
        """Override to run code before the server accepts connections."""

    async def shutdown(self) -> None:
        """Override to run code after the server stopped (Ctrl-C, SIGTERM, or
        :meth:`request_shutdown`), once in-flight handlers are done."""

    async def session_ended(self, client: Client, reason: str) -> None:
        """Override to run code when a session has ended: presence, cleanup of what
        handlers kept per client.

        By then the connection is closed (``client.closed`` is True, sending raises
        ``trio.ClosedResourceError``) and the session is released: it is no longer
        among :meth:`~asyncapy.core.Client.get_sessions`. ``reason`` is what the
        session's ``Session ended`` log line says (``"client closed the connection"``,
        ``"closed by a handler"``, ``"timed out"``, ``"server shutting down"``...).

        Called once for every session that was admitted, never for a refused
        connection. It runs in the session's own task, shielded from cancellation for
        at most :attr:`shutdown_grace` seconds (so it runs during a shutdown too, and a
        graceful shutdown waits for it); an exception it raises is logged and goes no
        further. A server that does not override it pays nothing for it.
        """

    async def _call_session_ended(self, client: Client, reason: str) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.shutdown_grace
            try:
                await self.session_ended(client, reason)
            except Exception:
                logger.exception("(%s) session_ended() raised", client.session.session_id)
        if scope.cancelled_caught:
            logger.warning(
                "(%s) session_ended() ran past shutdown_grace (%ss): cancelled",
                client.session.session_id,
                self.shutdown_grace,
            )

    async def run_sync_task(
        self,
        sync_fn: Callable,
        *args: Any,
        cancellable: bool = False,
        limiter: Optional[trio.CapacityLimiter] = None,
    ) -> Any:
        """Run blocking ``sync_fn(*args)`` in a worker thread and await its result.

        Use it from handlers for blocking libraries, so that the event loop (and
        every other client) keeps running. ``cancellable`` lets a cancelled caller
        abandon the thread; ``limiter`` bounds how many such threads run at once.
        """
        return await trio.to_thread.run_sync(
            sync_fn, *args, abandon_on_cancel=cancellable, limiter=limiter
        )

    # -- running ---------------------------------------------------------------------
    def start(self) -> None:
        """Configure logging, serve until Ctrl-C or SIGTERM, then shut down. Blocking."""
        self.configure_logging()
        trio.run(self._run_until_signalled)

    def configure_logging(self) -> None:
        """Send log records to the console with :attr:`console_format` and :attr:`datefmt`
        (unless the application configured logging itself) at :attr:`logging_level`."""
        logging.basicConfig(
            format=self.console_format, datefmt=self.datefmt, level=self.logging_level
        )
        logging.getLogger("asyncapy").setLevel(self.logging_level)

    async def _run_until_signalled(
        self,
        *,
        sockets: Optional[Sequence[socket.socket]] = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # ``sockets`` and ``task_status`` go to serve(): a worker process of
        # ``asyncapy run --workers`` serves its parent's sockets and reports readiness.
        # serve()'s own failure (a port already in use, a TLS file gone...) is re-raised
        # outside the nursery, as itself: a nursery would wrap it in an ExceptionGroup
        # that ``except OSError`` (the CLI's one-line error) does not catch.
        failure: Optional[Exception] = None
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                try:
                    await self.serve(sockets=sockets, task_status=task_status)
                except Exception as exc:
                    failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _watch_signals(self, signals: Any, everything: trio.CancelScope) -> None:
        async for signum in signals:
            if self._stopping is not None and self._stopping.is_set():
                logger.warning("Second %s: stopping now", signal.Signals(signum).name)
                everything.cancel()
                return
            logger.info(
                "%s received: shutting down (grace %ss)",
                signal.Signals(signum).name,
                self.shutdown_grace,
            )
            self.request_shutdown()

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, let in-flight handlers finish
        (within :attr:`shutdown_grace`), close sessions, run :meth:`shutdown`."""
        if self._stopping is not None:
            self._stopping.set()

    async def serve(
        self,
        *,
        sockets: Optional[Sequence[socket.socket]] = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve inside an existing trio program until :meth:`request_shutdown`.

        With ``await nursery.start(server.serve)`` the caller resumes once the server
        listens, and gets :attr:`addresses` back.

        ``sockets``: listening :mod:`socket` sockets to accept on instead of binding
        :attr:`addr` and :attr:`port` (TLS, if configured, is layered on them). This is
        how the workers of ``asyncapy run --workers N`` share one port: their parent
        binds it once and each worker serves the inherited socket, so the port is
        known (even port 0) before any worker starts and no worker can lose a race
        to bind it. The server owns them from then on and closes them when it stops.
        """
        self._stopping = trio.Event()
        self._check_open_file_limit()
        await self.setup()
        try:
            listeners = await self._open_listeners(sockets)
            self.addresses = [_sockname(listener) for listener in listeners]
            if not codecs.ACCELERATED:
                logger.warning(
                    "The codecs' C accelerator (domain/_speedups.c) is not built: "
                    "ZiProto payloads are decoded and encoded by msgspec alone, and JSON "
                    "encoded by the standard library alone, correctly but slower. "
                    "Install a C compiler and the Python headers (Debian: apt-get "
                    "install gcc python3-dev) and reinstall AsyncAPY to build it"
                )
            logger.info(
                "AsyncAPY serving on %s (%s), sessions in %r%s",
                ", ".join(_format_address(a) for a in self.addresses),
                "TLS" if self.ssl_context else "plain TCP",
                self.store,
                where_keys_live(", API keys in "),
            )
            async with trio.open_nursery() as sessions:
                sessions.start_soon(self._run_session_services)
                sessions.start_soon(self._check_store)
                accepting = trio.CancelScope()
                sessions.start_soon(self._accept, listeners, sessions, accepting)
                task_status.started(self.addresses)
                await self._stopping.wait()
                accepting.cancel()
                await self._drain()
                sessions.cancel_scope.cancel()
        finally:
            if self._refusals_unlogged:
                self._log_refusals("")
            for log, what in (
                (self._limit_log, "refused for session_limit"),
                (self._unavailable_log, "refused with the session store unavailable"),
            ):
                if log.suppressed:
                    logger.warning("%d more connection(s) %s, not logged", log.suppressed, what)
                    log.suppressed = 0
            with trio.CancelScope(shield=True):
                try:
                    await self.shutdown()
                finally:
                    logger.info("AsyncAPY stopped")

    async def _check_store(self) -> None:
        """Say at start, in one warning line, that the session store cannot be reached
        (a read of no consequence is the probe): until it can, every new connection
        is refused with ``ERR_UNAVAILABLE``, and the start line alone would hide why."""
        try:
            await self.store.sessions("127.0.0.1")
        except StoreUnavailable as exc:
            logger.warning(
                "The session store %r cannot be reached: %s; new connections are refused "
                "with ERR_UNAVAILABLE until it can",
                self.store,
                exc,
            )
        except Exception as exc:  # the store's own bug: the sessions will show it too
            logger.warning("The session store %r failed a first read: %r", self.store, exc)

    def _check_open_file_limit(self) -> None:
        """Raise the open-file limit (once per process) and warn if it caps connections
        below :attr:`max_connections`: every connection is a file descriptor, and past
        the limit ``accept()`` fails, which no client would understand."""
        limit = raise_open_file_limit()
        if limit is None or limit >= self.max_connections + FD_MARGIN:
            return
        logger.warning(
            "The open-file limit (%d, the hard limit allows no more) caps this process at "
            "about %d connections, below max_connections=%d: raise the hard limit "
            "(ulimit -Hn; LimitNOFILE= in a systemd unit; docker run --ulimit nofile=N:N) "
            "or lower max_connections",
            limit,
            max(limit - FD_MARGIN, 0),
            self.max_connections,
        )

    async def _open_listeners(self, sockets: Optional[Sequence[socket.socket]] = None) -> list:
        if sockets is None:
            listeners = await bind_listeners(self.addr, self.port)
        else:
            listeners = [_listener_of(sock) for sock in sockets]
            if not listeners:
                raise ValueError("serve(sockets=...) needs at least one listening socket")
        if self.ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, self.ssl_context, https_compatible=False)
                for listener in listeners
            ]
        return listeners

    async def _accept(
        self, listeners: list, sessions: trio.Nursery, accepting: trio.CancelScope
    ) -> None:
        with accepting:
            try:
                async with trio.open_nursery() as loops:
                    for listener in listeners:
                        loops.start_soon(self._accept_from, listener, sessions)
            finally:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)

    async def _accept_from(self, listener: trio.abc.Listener, sessions: trio.Nursery) -> None:
        """Accept connections on ``listener`` and serve each in a task of ``sessions``.

        What ``trio.serve_listeners`` does, less the forced close it wraps every
        connection in (a cancelled checkpoint, a scheduling round per connection):
        :meth:`_handle_connection` closes its own. Running out of descriptors (or
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
                sessions.start_soon(self._handle_connection, stream)

    async def _drain(self) -> None:
        """Stop reading on every session; give in-flight handlers the grace period."""
        for state in list(self._idle_states.values()):
            if state.waiting:
                state.cancel()
        if not self._sessions:
            return
        logger.info("Waiting up to %ss for %d session(s)", self.shutdown_grace, len(self._sessions))
        self._idle = trio.Event()
        with trio.move_on_after(self.shutdown_grace):
            await self._idle.wait()
        if self._sessions:
            logger.warning("Grace period over: closing %d busy session(s)", len(self._sessions))

    # -- one connection ---------------------------------------------------------------
    def _new_channel(self, stream: trio.abc.Stream) -> Channel:
        self._packet_memory.limit = self.max_packet_memory  # as set since (load_config, --config)
        return Channel(
            stream,
            Connection(
                self.header_size,
                self.byteorder,
                self.max_packet_size,
                codec_named(self.encoding),
                self._packet_memory,
            ),
            self._pacer,
        )

    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection, and close it however that ends."""
        try:
            if self._connections >= self.max_connections:
                await self._refuse_connection(stream)
                return
            try:
                address = peer_address(stream)
            except OSError:
                return  # the client is gone already
            self._connections += 1
            held = True

            def release_slot() -> None:
                # Refused after all (session_limit, store): its lingering close must
                # not hold a max_connections slot, or refusals of one address would
                # lock out every other.
                nonlocal held
                if held:
                    held = False
                    self._connections -= 1

            try:
                if type(stream) is trio.SSLStream and not await self._handshake(stream, address):
                    return
                await self._serve_stream(stream, address, release_slot=release_slot)
            finally:
                release_slot()
        finally:
            await close_at_once(stream)

    async def _handshake(self, stream: trio.SSLStream, address: str) -> bool:
        """Complete the TLS handshake of a new connection within :attr:`timeout`;
        False (logged) if it failed or did not finish in time.

        Before admission, so a client that never finishes its handshake, or fails
        mutual TLS, takes no ``session_limit`` slot and causes no store write."""
        reason = f"not finished within timeout ({self.timeout}s)"
        with trio.move_on_after(self.timeout):
            try:
                await stream.do_handshake()
                return True
            except STREAM_ERRORS as exc:
                cause = exc.__cause__ or exc
                reason = str(cause) or type(cause).__name__
        logger.info("TLS handshake with %s failed: %s", address, reason)
        return False

    async def _refuse_connection(self, stream: trio.abc.Stream) -> None:
        """Close a connection past :attr:`max_connections` at once: no session, no store,
        no TLS handshake, no reply (no error code fits), just a lingering close of the
        TCP connection, so a client that already wrote a request sees the connection
        end rather than a reset. The warning is rate-limited: a flood is one line a
        second."""
        self._refusals_unlogged += 1
        if time.monotonic() - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            try:
                address = peer_address(stream)
            except OSError:
                address = "a client gone already"
            self._log_refusals(f": refused a connection from {address}")
        await self._refusals.close(transport_of(stream), b"")

    def _log_refusals(self, latest: str) -> None:
        count = self._refusals_unlogged
        if latest:
            count -= 1  # the one being refused is told apart
        more = f"; {count} more refused since the last such warning" if count else ""
        logger.warning(
            "max_connections (%d) reached%s%s", self.max_connections, latest, more
        )
        self._refusals_unlogged = 0
        self._refusal_logged_at = time.monotonic()

    async def _serve_stream(
        self,
        stream: trio.abc.Stream,
        address: str,
        *,
        release_slot: Callable[[], None] = lambda: None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve one session on ``stream``, a connection from ``address``: admission,
        the session, its release. Every session takes this one path: the accept loop's
        with the socket's peer address, :func:`asyncapy.testing.open_test_client`'s with
        an in-memory stream and the address the test chose.

        ``task_status.started(admitted)`` is called once admission is decided (an
        admitted session is registered by then), so ``await nursery.start(...)``
        returns once the session counts towards ``session_limit`` and
        :meth:`~asyncapy.core.Client.get_sessions`.

        ``release_slot`` is called when the connection is refused, before its
        lingering close: the accept loop's frees the ``max_connections`` slot.

        The store gets :attr:`store_timeout` seconds to answer the admission; past
        them, or when it fails, the client is answered ``ERR_UNAVAILABLE``.
        """
        session_id = uuid.uuid4()
        group = session_group(address, self.session_limit_ipv6_prefix)
        record = SessionRecord(str(session_id), group, time.time(), self.server_id)
        admitted = False
        failure: Optional[str] = None
        traceback = False
        with trio.move_on_after(self.store_timeout) as deadline:
            try:
                admitted = await self.store.admit(record, self.session_limit)
            except StoreUnavailable as exc:
                failure = str(exc)
            except Exception:
                failure = "the store failed"
                traceback = True
        if deadline.cancelled_caught:
            failure = f"no answer within store_timeout ({self.store_timeout}s)"
        if failure is not None:
            log = self._unavailable_log
            if log.allow():
                logger.error(
                    "(%s) Session store unavailable, refusing %s: %s%s",
                    session_id,
                    address,
                    failure,
                    log.take_suppressed("refused alike"),
                    exc_info=traceback,
                )
            task_status.started(False)
            release_slot()
            await self._refuse(stream, ERR_UNAVAILABLE)
            return
        if not admitted:
            log = self._limit_log
            if log.allow():
                logger.warning(
                    "(%s) %s already holds %d session(s): limit reached%s",
                    session_id,
                    address if group == address else f"{address} (as {group})",
                    self.session_limit,
                    log.take_suppressed("refused for session_limit"),
                )
            task_status.started(False)
            release_slot()
            await self._refuse(stream, ERR_SESSION_LIMIT_REACHED)
            return
        channel = self._new_channel(stream)
        client = Client(address, self, stream, None, self.encoding)
        client._channel = channel
        session = client.session = Session(session_id, client, record.date, self.server_id)
        self._sessions[record.session_id] = session
        state = self._idle_states[record.session_id] = _Idle(trio.current_time(), channel)
        task_status.started(True)
        logger.info("(%s) Session started for %s", session_id, address)
        reason = "closed"
        try:
            reason = await self._serve_session(client, channel, state)
        except STREAM_ERRORS:
            reason = "connection lost"
        except Exception:
            reason = "internal error"
            logger.exception("(%s) Unexpected error serving the session", session_id)
        except trio.Cancelled:
            reason = "cancelled"  # busy past shutdown_grace, or a second signal
            raise
        finally:
            self._idle_states.pop(record.session_id, None)
            if state.logs is not None:
                state.logs.report(session_id)
            with trio.CancelScope(shield=True):
                await channel.aclose()
                with trio.move_on_after(self.store_timeout) as deadline:
                    try:
                        await self.store.release(record)
                    except Exception:
                        logger.warning("(%s) Could not release the session in the store", session_id, exc_info=True)
                if deadline.cancelled_caught:
                    logger.warning(
                        "(%s) The session store did not release the session within "
                        "store_timeout (%ss); its lease expires by itself",
                        session_id,
                        self.store_timeout,
                    )
            del self._sessions[record.session_id]
            logger.info("(%s) Session ended: %s", session_id, reason)
            if type(self).session_ended is not Server.session_ended:
                await self._call_session_ended(client, reason)
            if self._idle is not None and not self._sessions:
                self._idle.set()

    async def _serve_session(self, client: Client, channel: Channel, state: "_Idle") -> str:
        connection = channel.connection
        framer = connection.framer
        stream = channel.stream
        fd = channel.fd  # read directly (see asyncapy.transport), or None: the stream
        pacer = channel.pacer
        # Chosen once per session: without handler_timeout, a packet costs no scope.
        if self.handler_timeout is None:
            dispatch = self._dispatcher.dispatch
        else:
            dispatch = self._dispatch_within_deadline
        stopping = self._stopping
        buf = self.buf
        session_id = client.session.session_id
        debug = logger.isEnabledFor(logging.DEBUG)
        now = trio.lowlevel.current_clock().current_time  # trio.current_time, minus a hop
        # One cancel scope for the whole session, not one per read. A shutdown cancels
        # it only while the session waits for bytes; the reaper (see _reap_idle) then,
        # or when the session's writes have been blocked for ``timeout`` (state.stuck).
        # A handler that is neither waiting nor writing is never cancelled here.
        first_read = True
        errors = 0  # protocol errors in a row (reset by every request)
        max_errors = self.max_protocol_errors
        with state.scope:
            event = connection.next_event()
            while True:
                if event is NEED_DATA:
                    if channel.holding:
                        await channel.flush()
                    if channel.closed:
                        return "closed by a handler"
                    if stopping.is_set():
                        return "server shutting down"
                    state.waiting = True
                    if fd is not None:
                        # A read yields first (see asyncapy.transport). Once the round
                        # is over, this session's deferred reply is written with the
                        # round's others before the read, and if the next request
                        # is there already, the server is busy: defer the reply to
                        # it too (see Pacer). If not, wait, and write it at once.
                        await trio.lowlevel.checkpoint()
                        pacer.unyielded = 0
                        if channel.deferred:
                            pacer.flush()
                        data = read_now(fd, buf)
                        if data is None:
                            channel.deferring = False
                            data = await receive_waiting(fd, buf)
                        else:
                            # Not on a session's first read: a client that writes
                            # its request with the connect says nothing of the load.
                            channel.deferring = not first_read
                        first_read = False
                    else:
                        data = await stream.receive_some(buf)
                    state.waiting = False
                    if state.cancelled:
                        break  # cancelled just as bytes arrived: it still counts
                    if not data:
                        return "client closed the connection"
                    framer.receive_data(data)
                    event = connection.next_event()
                    continue
                # More pipelined packets already here? Then gather the replies and
                # write them together once the batch is handled.
                more = channel.holding = framer.complete_buffered()
                if type(event) is Request:
                    errors = 0
                    codec = event.codec
                    client.encoding = codec.name
                    if debug:
                        logger.debug("(%s) Packet of %d field(s) in %s", session_id, len(event.fields), codec.name)
                    try:
                        await dispatch(client, Packet._received(event.fields, codec, client))
                    except HandlerFailed as failure:
                        cause = failure.__cause__
                        if isinstance(cause, STREAM_ERRORS):
                            return "connection lost while replying"
                        logs = state.logs or state.start_logs()
                        if logs.failures.allow():
                            suppressed = logs.failures.take_suppressed("handler failures not logged")
                            if failure.unavailable:  # an outage, not a bug: one line
                                logger.warning(
                                    "(%s) %s: replied %s%s", session_id, failure, failure.code, suppressed
                                )
                            else:
                                logger.error("(%s) %s%s", session_id, failure, suppressed, exc_info=cause)
                        if not channel.closed:
                            await channel.send(connection.error_bytes(failure.code))
                    if channel.closed:
                        return "closed by a handler"
                else:
                    assert type(event) is ProtocolError
                    errors += 1
                    logs = state.logs or state.start_logs()
                    if logs.errors.allow():
                        logger.warning(
                            "(%s) %s: %s%s",
                            session_id,
                            event.code,
                            event.detail,
                            logs.errors.take_suppressed("protocol errors not logged"),
                        )
                    reply = connection.error_bytes(event.code, event.codec)
                    close = event.close
                    if errors == max_errors:
                        logger.warning(
                            "(%s) %d protocol errors in a row (max_protocol_errors): "
                            "closing the session",
                            session_id,
                            errors,
                        )
                        close = True
                    if close:
                        if channel.writing or channel.interrupted:
                            # A deferred reply is still being written (or was cut
                            # short): the error reply cannot follow it on the wire.
                            channel.closed = True
                            await trio.aclose_forcefully(stream)
                            return event.code if event.close else "too many protocol errors"
                        # Framing is lost: the client may still be sending the rest of
                        # the packet, so close lingering or the reply dies in a reset.
                        reply = channel.take_pending() + reply
                        channel.closed = True
                        await linger_close(stream, reply)
                        return event.code if event.close else "too many protocol errors"
                    await channel.send(reply)
                # The idle clock starts once the packet is handled, not when it
                # arrived: a handler slower than ``timeout`` must not time out the
                # next read at once.
                state.last_active = now()
                if connection.held:  # a large packet's share of max_packet_memory
                    connection.release()
                # Only the session feeds the framer: with no whole packet buffered
                # after this one, the next event is a read.
                event = connection.next_event() if more else NEED_DATA
        if stopping.is_set():
            return "server shutting down"
        if state.stuck or channel.writing or channel.interrupted:
            # Cancelled in the middle of a write, perhaps, or another task's (a
            # deferred reply's) is under way or was cut short: no reply can follow.
            channel.closed = True
            await trio.aclose_forcefully(stream)
            if channel.interrupted and not state.stuck:
                return "connection lost"  # a deferred reply's write failed
            return f"the client read no reply for {self.timeout}s"
        logger.debug("(%s) No complete packet for %ss: timing out", session_id, self.timeout)
        # A client still sending (a packet trickling in) would turn a plain close into
        # a TCP reset, which can destroy the reply before the client reads it: close
        # lingering, as on a framing error.
        channel.closed = True
        await linger_close(stream, channel.take_pending() + connection.error_bytes(ERR_TIMED_OUT))
        return "timed out"

    async def _dispatch_within_deadline(self, client: Client, packet: Packet) -> None:
        """Dispatch under :attr:`handler_timeout` (the session loop's ``dispatch`` when
        it is set). Past the deadline, the running handler is cancelled and logged,
        and the client gets ``ERR_INTERNAL``; if it was cancelled while writing, part
        of a reply may be on the wire already, so the session is closed instead."""
        with trio.move_on_after(self.handler_timeout) as deadline:
            await self._dispatcher.dispatch(client, packet)
        if not deadline.cancelled_caught:
            return
        name = client.handler.name if client.handler is not None else "?"
        channel = client._writer()
        session_id = client.session.session_id
        if channel.interrupted and not channel.closed:
            logger.warning(
                "(%s) Handler %s ran past handler_timeout (%ss) while writing: "
                "cancelled, and the session closed",
                session_id,
                name,
                self.handler_timeout,
            )
            channel.closed = True
            await trio.aclose_forcefully(channel.stream)
            return
        logger.warning(
            "(%s) Handler %s ran past handler_timeout (%ss): cancelled",
            session_id,
            name,
            self.handler_timeout,
        )
        if not channel.closed:
            await channel.send(channel.connection.error_bytes(ERR_INTERNAL))

    async def _run_session_services(self) -> None:
        """Run, until cancelled, what live sessions need beside them: the store's upkeep
        (lease renewals) and the idle reaper. :meth:`serve` runs it in its session
        nursery; the test client of :mod:`asyncapy.testing`, which serves sessions
        without serve(), in its own."""
        async with trio.open_nursery() as services:
            services.start_soon(self.store.maintain)
            services.start_soon(self._reap_idle)
            services.start_soon(self._pacer.run)

    def _ready_for_streams(self) -> None:
        """Make sessions servable without :meth:`serve` (the test client of
        :mod:`asyncapy.testing`): they check a shutdown event, which serve() creates
        on each start. Keep a live one (a serve() of this server is running); replace
        a set one, left by a serve() that ended, or every new session would end at once."""
        if self._stopping is None or self._stopping.is_set():
            self._stopping = trio.Event()

    async def _reap_idle(self) -> None:
        """Time out sessions that waited ``timeout`` seconds for a complete packet, and
        those whose replies made no progress for ``timeout`` seconds.

        One task for every session, waking every ``timeout / 8`` seconds (at most 1 s,
        at least 50 ms): a session costs nothing per packet for its timeout but the
        time stamp above, and times out at most one interval late.

        A client that pipelines requests and never reads its replies is never waiting
        for bytes: the server stops reading from it while a reply cannot be written
        (that is the backpressure that bounds its memory), so the session sits in a
        write. The reaper sees that write in progress (its channel is busy) and closes
        the session once every look for ``timeout`` seconds found one, with no byte of
        it taken by the client in between: such a client would otherwise hold its
        connection, and a ``max_connections`` slot, forever. A client that reads a long
        reply slowly is not cut, however long the reply takes, as long as it takes some
        of it every ``timeout`` seconds (as nginx's ``send_timeout``). That progress is
        seen on plain TCP connections (``Channel.written``); on TLS ones, a write that
        lasts ``timeout`` seconds counts as stuck. The cost is the reaper's, never a
        packet's.
        """
        while True:
            timeout = self.timeout
            await trio.sleep(max(0.05, min(1.0, timeout / 8)))
            now = trio.current_time()
            cutoff = now - timeout
            for state in self._idle_states.values():
                if state.waiting:
                    if state.last_active <= cutoff:
                        state.cancel()
                elif state.channel.writing:
                    written = state.channel.written
                    if state.writing_seen is None or written != state.written_seen:
                        # Writing, and (on a plain TCP connection, where it can be
                        # seen) the client took bytes since the last look: not stuck.
                        state.writing_seen = now
                        state.written_seen = written
                    elif state.writing_seen <= cutoff:
                        state.stuck = True
                        state.cancel()
                    continue
                state.writing_seen = None

    async def _refuse(self, stream: trio.abc.Stream, code: str) -> None:
        """Reply ``code`` in JSON (no encoding is known yet), then close lingering."""
        data = Framer(self.header_size, self.byteorder, self.max_packet_size).frame(
            JSON.encode(error_payload(code)), JSON.code
        )
        await self._refusals.close(stream, data)

    async def _sessions_of(self, address: str) -> list[Session]:
        records = await self.store.sessions(session_group(address, self.session_limit_ipv6_prefix))
        local = self._sessions
        return [
            local.get(r.session_id)
            or Session(uuid.UUID(r.session_id), None, r.date, r.server_id)
            for r in records
        ]

    def __repr__(self) -> str:
        return f"Server(addr={self.addr!r}, port={self.port!r})"


async def bind_listeners(addr: str, port: int) -> list[trio.SocketListener]:
    """Listen on ``addr``:``port`` (one listener per address it resolves to).

    A failure is an :class:`OSError` whose message names the address, which the
    command line prints as its one error line. :class:`Server` and the supervisor of
    ``asyncapy run --workers`` bind through here, so both fail the same way.
    """
    try:
        return await trio.open_tcp_listeners(port, host=addr)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from exc


def tls_conflict(name: str, value: Any, source: str) -> ConfigError:
    """The error for certificate setting ``name`` (from ``source``: ``'Server()'``,
    ``'--certfile'``, a config file's path) given to a server whose application built
    its own ``ssl_context``.

    An error rather than one of the two winning: the files would replace the
    context, and with it whatever else it required (client certificates, pinned
    versions or ciphers), which is how a certificate rotation on the command line
    once turned mutual TLS off without a word; and the context winning would ignore
    the new certificate just as silently."""
    return ConfigError(
        name,
        value,
        "nothing, since the application passes its own Server(ssl_context=...): the "
        "certificate settings (certfile, keyfile, cafile) would replace that context and "
        "what it requires (client certificates included). Load the new certificate into "
        "the application's context (ssl_context.load_cert_chain), or configure TLS with "
        "certfile, keyfile and cafile only, without ssl_context",
        source,
    )


def _listener_of(sock: socket.socket) -> trio.SocketListener:
    """A trio listener accepting on ``sock``, an already listening stdlib socket."""
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"serve(sockets=...) needs listening TCP sockets, not {sock!r}")
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class _Idle:
    """A session's idle-timeout state, read by :meth:`Server._reap_idle`."""

    __slots__ = (
        "scope", "cancelled", "waiting", "last_active", "channel", "writing_seen", "written_seen", "stuck",
        "logs",
    )

    def __init__(self, now: float, channel: Channel) -> None:
        self.scope = trio.CancelScope()
        self.cancelled = False
        """Set with the scope's cancellation by :meth:`cancel` (a plain attribute: the
        session loop reads it after every read, and ``scope.cancel_called`` is a
        property that reads the clock)."""
        self.waiting = False
        self.last_active = now
        self.channel = channel
        self.writing_seen: Optional[float] = None
        """When the reaper first found the session writing, in a run of looks that all
        did (and, on plain TCP, found no more bytes written); None when the last look
        found no write."""
        self.written_seen = 0
        """``channel.written`` at the last look that found a write going on."""
        self.stuck = False
        """Set by the reaper when it cancels the session for a write that never ends."""
        self.logs: Optional[_SessionLogs] = None
        """The session's log rate limits, made on its first error (see :meth:`start_logs`)."""

    def start_logs(self) -> "_SessionLogs":
        """The session's log rate limits, made now: a session that never errs pays
        nothing for them."""
        self.logs = _SessionLogs()
        return self.logs

    def cancel(self) -> None:
        """Cancel the session's scope (the reaper's and the shutdown's way)."""
        self.cancelled = True
        self.scope.cancel()


class _LogLimit:
    """At most ``burst`` log lines per ``interval`` seconds; the rest are counted.

    Used on error paths only. A fixed window: the first ``burst`` lines of each
    window are let through (:meth:`allow` is True), the others counted in
    :attr:`suppressed`, which the next line let through reports
    (:meth:`take_suppressed`), and which whoever owns the limit reports when it is
    done with it."""

    __slots__ = ("burst", "interval", "window_start", "used", "suppressed")

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self.window_start = -math.inf
        self.used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        """True if a line may be logged now; else the line is counted as suppressed."""
        now = time.monotonic()
        if now - self.window_start >= self.interval:
            self.window_start = now
            self.used = 0
        if self.used < self.burst:
            self.used += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self, what: str) -> str:
        """``' (N more WHAT since)'`` for the suppressed lines, then forget them; ``''``
        if there were none."""
        count = self.suppressed
        if not count:
            return ""
        self.suppressed = 0
        return f" ({count} more {what} since)"


class _SessionLogs:
    """One session's log rate limits: protocol-error warnings and handler tracebacks,
    :data:`LOG_BURST` of each per :data:`LOG_INTERVAL`. A client that sends garbage
    (or trips a handler) in a loop would otherwise write megabytes of log a second."""

    __slots__ = ("errors", "failures")

    def __init__(self) -> None:
        self.errors = _LogLimit(LOG_BURST, LOG_INTERVAL)
        self.failures = _LogLimit(LOG_BURST, LOG_INTERVAL)

    def report(self, session_id: Any) -> None:
        """Log what was suppressed and never reported, once the session ends."""
        if self.errors.suppressed or self.failures.suppressed:
            logger.warning(
                "(%s) Not logged (rate limit): %d protocol error(s), %d handler failure(s)",
                session_id,
                self.errors.suppressed,
                self.failures.suppressed,
            )


def raise_open_file_limit() -> Optional[int]:
    """Raise this process's soft limit on open files to its hard limit (once per
    process; later calls only read it) and return the soft limit, or None where there
    is no such limit (Windows).

    Every connection is a file descriptor, and soft limits are often 1024, where hard
    ones allow far more: a server that did not raise its own would refuse clients at
    ``accept()`` long before :attr:`Server.max_connections`. The event loop uses
    epoll/kqueue, never ``select()``, so descriptors past 1024 are no problem.
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


def _sockname(listener: Any) -> tuple:
    while not hasattr(listener, "socket"):
        listener = listener.transport_listener
    return listener.socket.getsockname()


def _format_address(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
