"""``Server``: the public server: settings, handler registration, hooks, and running.

The server is a driving adapter around the pure core: for each connection it reads
bytes, feeds them to a :class:`asyncapy.domain.connection.Connection`, hands every decoded
request to the :class:`asyncapy.domain.dispatch.Dispatcher`, and writes what comes back. No
protocol rule lives here, and no serving machinery either: this module holds what an
application configures and calls (settings and their validation, registration,
``setup``/``shutdown``/``session_ended``, ``start``/``serve``/``request_shutdown``,
signals), and composes the machinery that does the I/O:

* :mod:`asyncapy.listening`: listeners, the accept loop, each connection's way in
  (``max_connections``, TLS handshake), the open-file limit;
* :mod:`asyncapy.sessions`: admission, the session loop, release, the shutdown's drain;
* :mod:`asyncapy.session_state`: what each session shares with the idle reaper;
* :mod:`asyncapy.transport`: reads, writes, the lingering close.
"""

from __future__ import annotations

import configparser
import logging
import os
import signal
import socket
import ssl
import uuid
from typing import Any, Callable, Optional, Sequence, Union

import trio

from asyncapy.domain import codecs
from asyncapy.domain.dispatch import Dispatcher, Handler
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import SessionStore

from . import logs, worker_metrics
from .config import SETTINGS, ConfigError, check_proxy_settings, load_config, validate
from .core import Client, Session
from .listening import Listening, format_address, sockname
from .metered import metered_session_store
from .metrics import NULL_RECORDER, Recorder
from .probes import ProbeServer, Readiness, RecorderExposition
from .sessions import Sessions
from .stores import open_session_store
from .transport import Channel
from .util import meter_key_stores, where_keys_live

__all__ = ["Server"]

logger = logging.getLogger("asyncapy.server")

_TLS_FILES = ("certfile", "keyfile", "cafile")


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
    :param log_format: how :meth:`configure_logging` writes records: ``'text'`` (the
        default: ``console_format`` and ``datefmt``) or ``'json'`` (one JSON object a
        line, with the session id, client address and error code where known; see
        :mod:`asyncapy.logs`).
    :param metrics_port: serve ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``
        over HTTP on this port while serving (``None``, the default: no such endpoint
        and nothing counted; 0 picks a free port, see :attr:`probes`). See
        docs/operations.md.
    :param metrics_host: the address the metrics port binds (``'127.0.0.1'``): expose
        it only where the scrapers and probes are.

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
        log_format: str = SETTINGS["log_format"].default,
        metrics_port: Optional[int] = SETTINGS["metrics_port"].default,
        metrics_host: str = SETTINGS["metrics_host"].default,
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
            log_format=log_format,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
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
        self.log_format: str = settings["log_format"]
        self.metrics_port: Optional[int] = settings["metrics_port"]
        self.metrics_host: str = settings["metrics_host"]
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
        self.metrics_recorder: Recorder = NULL_RECORDER
        """What this server counts (:mod:`asyncapy.metrics`): a
        :class:`~asyncapy.metrics.Recorder` when :attr:`metrics_port` is set (or this
        process is a worker whose supervisor serves metrics), else
        :data:`~asyncapy.metrics.NULL_RECORDER`, which counts nothing."""
        self._choose_recorder()
        self.probes: Optional[ProbeServer] = None
        """The metrics and probes endpoint while serving with a :attr:`metrics_port`
        (its ``addresses`` say where it listens), else None."""
        self._dispatcher = Dispatcher()
        self._sessions = Sessions(self)
        """The serving machinery's sessions (see :mod:`asyncapy.sessions`)."""
        self._listening = Listening(self, self._sessions)
        """The serving machinery's listeners (see :mod:`asyncapy.listening`)."""

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

    # -- metrics -------------------------------------------------------------------
    def _choose_recorder(self) -> None:
        """Count (a :class:`~asyncapy.metrics.Recorder`) when someone will read the
        counts: this server's own endpoint (:attr:`metrics_port`), or the supervisor of
        ``asyncapy run --workers`` this process works for. A recorder already counting
        is kept (its counts, and whoever publishes them, stay valid)."""
        wanted = self.metrics_port is not None or worker_metrics.worker_directory() is not None
        if wanted and not self.metrics_recorder.enabled:
            self.metrics_recorder = Recorder()

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
        """Send log records to stderr in :attr:`log_format` (text with
        :attr:`console_format` and :attr:`datefmt`, or JSON lines), unless the
        application configured logging itself, and set the ``asyncapy`` loggers'
        level to :attr:`logging_level`."""
        logs.configure_server_logging(self)

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
            stopping = self._sessions.stopping
            if stopping is not None and stopping.is_set():
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
        stopping = self._sessions.stopping
        if stopping is not None:
            stopping.set()

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
        sessions, listening = self._sessions, self._listening
        sessions.stopping = trio.Event()
        listening.check_open_file_limit()
        self._choose_recorder()  # metrics_port may have been set since (--metrics-port)
        recorder = self.metrics_recorder
        if recorder.enabled:
            self.store = metered_session_store(self.store, recorder)
            meter_key_stores(recorder)
        await self.setup()
        try:
            listeners = await listening.open(sockets)
            self.addresses = [sockname(listener) for listener in listeners]
            try:
                probes = self.probes = await self._bind_probes(listening)
            except BaseException:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
                raise
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
                ", ".join(format_address(a) for a in self.addresses),
                "TLS" if listening.ssl_context else "plain TCP",
                self.store,
                where_keys_live(", API keys in "),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sessions.run_services)
                nursery.start_soon(self._check_store)
                if probes is not None:
                    await nursery.start(probes.serve)
                accepting = trio.CancelScope()
                nursery.start_soon(listening.accept, listeners, nursery, accepting)
                task_status.started(self.addresses)
                await sessions.stopping.wait()
                accepting.cancel()
                await sessions.drain()
                nursery.cancel_scope.cancel()
        finally:
            self.probes = None
            listening.log_refusals()
            sessions.report_refusals()
            with trio.CancelScope(shield=True):
                try:
                    await self.shutdown()
                finally:
                    logger.info("AsyncAPY stopped")

    async def _bind_probes(self, listening: Listening) -> Optional[ProbeServer]:
        """The metrics and probes endpoint, bound (an ``OSError`` naming the address
        if it cannot be), or None: without a :attr:`metrics_port`, and in a worker
        of ``asyncapy run --workers``, whose supervisor serves the sum of them all."""
        if self.metrics_port is None or worker_metrics.worker_directory() is not None:
            return None
        sessions = self._sessions
        readiness = Readiness(
            listening=lambda: listening.accepting,
            stopping=lambda: sessions.stopping is not None and sessions.stopping.is_set(),
            store=self.store,
        )
        probes = ProbeServer(
            RecorderExposition(self.metrics_recorder),
            readiness,
            host=self.metrics_host,
            port=self.metrics_port,
        )
        await probes.bind()
        logger.info(
            "Metrics and probes on %s (/metrics, /healthz, /readyz)",
            ", ".join(f"http://{format_address(a)}" for a in probes.addresses),
        )
        return probes

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

    # -- what a Client asks of its server (see asyncapy.core) -------------------------------
    def _new_channel(self, stream: trio.abc.Stream) -> Channel:
        return self._sessions.new_channel(stream)

    async def _sessions_of(self, address: str) -> list[Session]:
        return await self._sessions.sessions_of(address)

    def _session_ended_overridden(self) -> bool:
        """True if this server's class overrides :meth:`session_ended` (else it is
        never called: a server that does not override it pays nothing for it)."""
        return type(self).session_ended is not Server.session_ended

    def __repr__(self) -> str:
        return f"Server(addr={self.addr!r}, port={self.port!r})"


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
