"""``Server``: what an application configures and calls, and the composition root of the
serving machinery.

Here: the settings (validated once into a frozen :class:`~asyncapy.config.Settings`,
readable and assignable as attributes), handler registration, the hooks
(``setup``, ``shutdown``, ``session_ended``), ``start``/``serve``/``request_shutdown``
and signals. No protocol rule and no serving machinery: the server makes the
machinery and hands it what it uses (:meth:`Server._wire`), and nothing there reaches
back into the server:

* :mod:`asyncapy.listening`: listeners, the accept loop, each connection's way in
  (``max_connections``, the PROXY header, the TLS handshake), the open-file limit;
* :mod:`asyncapy.sessions`: admission, the live sessions, release, the drain;
* :mod:`asyncapy.session_protocol`: one session, from its bytes to its replies;
* :mod:`asyncapy.transport`: reads, writes, the lingering close.
"""

from __future__ import annotations

import configparser
import logging
import os
import signal
import socket
import ssl
import sys
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

import trio

from asyncapy.domain import codecs
from asyncapy.domain.dispatch import Dispatcher, Handler
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.filtering import SupportsCheck
from asyncapy.domain.ports import SessionStore
from asyncapy.domain.proxy import TrustedProxies
from asyncapy.domain.ratelimit import Rate

from . import logs, metrics, worker_metrics
from .config import SETTINGS, ConfigError, Settings, check_proxy_settings, load_config, make_settings, validate
from .core import Client, HandlerFunction, Session
from .limits import Limits
from .listening import Listening, format_address, sockname
from .metered import metered_dispatcher, metered_session_store
from .metrics import NULL_RECORDER, Recorder
from .probes import ProbeServer, Readiness, RecorderExposition
from .sessions import Sessions
from .stores import open_rate_limiter, open_session_store
from .util import where_keys_live

__all__ = ["Server"]

logger: logging.Logger = logging.getLogger("asyncapy.server")

_TLS_FILES = ("certfile", "keyfile", "cafile")

_UNSET: Any = object()

T = TypeVar("T")

HandlerT = TypeVar("HandlerT", bound=HandlerFunction)
"""A handler function, whose own type ``add_handler`` hands back unchanged."""

SUPPRESSED_REPORT_SECONDS = 60.0
"""How often a serving server logs the counts of the lines its log limits left out."""


class Server:
    """An AsyncAProto 22 server.

    The positional parameters and their defaults are those of AsyncAPY 0.5 (``addr``
    to ``session_limit``); the ones after them are keyword-only additions. Each is a
    setting, described once in ``docs/configuration.md`` (what it does, its default,
    what it accepts, its config-file key and command-line flag) and validated once by
    :func:`asyncapy.config.make_settings`: a bad value raises
    :class:`~asyncapy.config.ConfigError` (a ``ValueError``) naming the parameter, the
    value and what is accepted. ``config`` (an INI file) and ``cfg_parser`` (a
    :class:`configparser.ConfigParser`) override them from an ``[AsyncAPY]`` section.

    The settings are readable and assignable as attributes (``server.timeout = 5``,
    validated the same way) until the server serves, and all together as
    :attr:`settings`. Besides them: ``store`` (where sessions live: ``None`` or
    ``'memory://'``, a Redis URL, or a :class:`~asyncapy.domain.ports.SessionStore`
    object) and ``ssl_context`` (a ready server-side :class:`ssl.SSLContext`).

    ``ssl_context`` and the certificate settings (``certfile``, ``keyfile``,
    ``cafile``, from the arguments, a config file or ``asyncapy run``'s flags) are
    exclusive: combining them is a :class:`~asyncapy.config.ConfigError` naming
    both, because the files would replace the context and everything it requires
    (client certificates above all) without a word.
    """

    if TYPE_CHECKING:
        # The settings as attributes. At run time _setting_property (at the end of this
        # module) makes one property per entry of SETTINGS, which a type checker cannot
        # see: declared here so that ``server.port`` is an ``int`` to it too (the type
        # each setting's checker returns; tests/unit/test_typing_declarations.py holds
        # the names equal to SETTINGS'). An assignment is validated like the argument.
        addr: str
        port: int
        buf: int
        console_format: str
        datefmt: str
        timeout: float
        header_size: int
        byteorder: str
        session_limit: int
        max_packet_size: int
        max_packet_memory: int
        encoding: str
        certfile: Optional[str]
        keyfile: Optional[str]
        cafile: Optional[str]
        shutdown_grace: float
        max_connections: int
        handler_timeout: Optional[float]
        max_protocol_errors: int
        store_timeout: float
        session_limit_ipv6_prefix: int
        log_format: str
        metrics_port: Optional[int]
        metrics_host: str
        proxy_protocol: bool
        insecure_trust_any_proxy: bool
        handshake_timeout: float
        large_packet_timeout: float
        handshake_limit: int
        rate_burst: int
        key_failure_burst: int
        reactor: bool

        # Read back normalised: a level name as its number, a rate as a Rate, the
        # proxies as TrustedProxies.
        @property
        def logging_level(self) -> int: ...
        @logging_level.setter
        def logging_level(self, value: Union[int, str]) -> None: ...
        @property
        def trusted_proxies(self) -> TrustedProxies: ...
        @trusted_proxies.setter
        def trusted_proxies(self, value: Union[str, Iterable[str], TrustedProxies]) -> None: ...
        @property
        def rate_limit(self) -> Optional[Rate]: ...
        @rate_limit.setter
        def rate_limit(self, value: Union[None, str, Rate]) -> None: ...
        @property
        def key_failure_limit(self) -> Optional[Rate]: ...
        @key_failure_limit.setter
        def key_failure_limit(self, value: Union[None, str, Rate]) -> None: ...

    def __init__(
        self,
        addr: str = "127.0.0.1",
        port: int = 8081,
        buf: int = 1024,
        logging_level: Union[int, str] = 20,
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
        trusted_proxies: Union[str, Iterable[str], TrustedProxies] = SETTINGS["trusted_proxies"].default,
        log_format: str = SETTINGS["log_format"].default,
        metrics_port: Optional[int] = SETTINGS["metrics_port"].default,
        metrics_host: str = SETTINGS["metrics_host"].default,
        insecure_trust_any_proxy: bool = SETTINGS["insecure_trust_any_proxy"].default,
        handshake_timeout: float = SETTINGS["handshake_timeout"].default,
        large_packet_timeout: float = SETTINGS["large_packet_timeout"].default,
        handshake_limit: int = SETTINGS["handshake_limit"].default,
        rate_limit: Union[None, str, Rate] = SETTINGS["rate_limit"].default,
        rate_burst: int = SETTINGS["rate_burst"].default,
        key_failure_limit: Union[None, str, Rate] = SETTINGS["key_failure_limit"].default,
        key_failure_burst: int = SETTINGS["key_failure_burst"].default,
        reactor: bool = SETTINGS["reactor"].default,
    ) -> None:
        # Every parameter named in SETTINGS is a setting; the others are objects.
        given = {name: value for name, value in locals().items() if name in SETTINGS}
        own_store = store if isinstance(store, SessionStore) else None
        if own_store is not None:
            given["store"] = None
        if cfg_parser is not None and not isinstance(cfg_parser, configparser.RawConfigParser):
            raise ConfigError("cfg_parser", cfg_parser, "a configparser.ConfigParser or None")
        settings = make_settings(given)
        tls_sources = {name: "Server()" for name in _TLS_FILES if getattr(settings, name) is not None}
        self.config = config
        if config is not None or cfg_parser is not None:
            loaded = load_config(config, cfg_parser)
            settings = make_settings(loaded, base=settings)
            source = os.fspath(config) if config is not None else "the config parser"
            tls_sources.update((name, source) for name in _TLS_FILES if name in loaded)
        check_proxy_settings(
            settings.proxy_protocol, settings.trusted_proxies, trust_any=settings.insecure_trust_any_proxy
        )
        self._settings = settings
        self._init_tls(ssl_context, tls_sources)
        self.server_id: str = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Identifies this server process in a shared session store."""
        self.addresses: list[tuple[Any, ...]] = []
        """The (host, port, ...) socket addresses being served, once started."""
        self.metrics_recorder: Recorder = NULL_RECORDER
        """What this server counts (:mod:`asyncapy.metrics`): a
        :class:`~asyncapy.metrics.Recorder` when :attr:`metrics_port` is set (or this
        process is a worker whose supervisor serves metrics), else
        :data:`~asyncapy.metrics.NULL_RECORDER`, which counts nothing."""
        self.probes: Optional[ProbeServer] = None
        """The metrics and probes endpoint while serving with a :attr:`metrics_port`
        (its ``addresses`` say where it listens), else None."""
        self._dispatcher = Dispatcher()
        self._store_spec: Union[None, str, SessionStore] = own_store or settings.store
        self._store: SessionStore = own_store or open_session_store(settings.store, settings.session_lease)
        self._limiter = open_rate_limiter(settings.store)
        """Where the rate limits' state lives: beside the session store."""
        self._sessions = Sessions(settings, self._dispatcher.dispatch, self._store, server_id=self.server_id)
        """The serving machinery's sessions (see :mod:`asyncapy.sessions`)."""
        self._listening = Listening(settings, self._sessions)
        """The serving machinery's listeners (see :mod:`asyncapy.listening`)."""
        self._choose_recorder()
        self._wire()

    # -- settings ------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        """Every setting, validated, as one frozen :class:`~asyncapy.config.Settings`:
        what the serving machinery is handed. Assigning a setting's attribute makes a
        new one."""
        return self._settings

    def _change(self, values: dict[str, Any], source: str = "") -> None:
        """Apply ``values`` (validated, :class:`~asyncapy.config.ConfigError` naming
        ``source``) and hand the new settings to the serving machinery."""
        self._settings = make_settings(values, source, base=self._settings)
        self._wire()

    def _wire(self) -> None:
        """Hand the serving machinery what it uses, as it is now: the settings, the
        dispatcher (timing its handlers when metrics are on), the session store, the
        recorder and the ``session_ended`` hook. Called whenever one of them changes."""
        sessions = self.__dict__.get("_sessions")
        if sessions is None:  # still in __init__
            return
        recorder = self.metrics_recorder
        sessions.settings = self._listening.settings = self._settings
        sessions.dispatch = metered_dispatcher(self._dispatcher, recorder).dispatch
        sessions.store = self._store
        sessions.recorder = self._listening.recorder = recorder
        overridden = type(self).session_ended is not Server.session_ended
        sessions.session_ended = self.session_ended if overridden else None
        sessions.limits = Limits(self._settings, self._limiter, recorder)

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
        if isinstance(store, SessionStore):
            self._store_spec = store
            self._store = store
            self._wire()
            return
        self._store_spec = validate("store", store)
        self._store = open_session_store(self._store_spec, self.session_lease)
        self._limiter = open_rate_limiter(self._store_spec)
        self._change({"store": store})

    @property
    def session_lease(self) -> float:
        """Seconds a session in a shared store outlives this process's last renewal."""
        return self._settings.session_lease

    @session_lease.setter
    def session_lease(self, lease: float) -> None:
        self._change({"session_lease": lease})
        spec = self._store_spec
        if isinstance(spec, str) and not spec.lower().startswith("memory://"):
            self._store = open_session_store(spec, self.session_lease)  # the new lease
            self._wire()

    # -- metrics -------------------------------------------------------------------
    def _choose_recorder(self) -> None:
        """Count (a :class:`~asyncapy.metrics.Recorder`) when someone will read the
        counts: this server's own endpoint (:attr:`metrics_port`), or the supervisor of
        ``asyncapy run --workers`` this process works for. A recorder already counting
        is kept (its counts, and whoever publishes them, stay valid)."""
        wanted = self.metrics_port is not None or worker_metrics.worker_directory() is not None
        if wanted and not self.metrics_recorder.enabled:
            self.metrics_recorder = Recorder()
            self._wire()

    # -- configuration helpers -------------------------------------------------------
    def _init_tls(self, ssl_context: Optional[ssl.SSLContext], tls_sources: dict[str, str]) -> None:
        """Serve TLS with the application's ``ssl_context``, or with a context built
        from the certificate settings, or not at all; refuse both at once."""
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise ConfigError("ssl_context", ssl_context, "an ssl.SSLContext or None")
        self._files_context: Optional[ssl.SSLContext] = None
        """The context built from the certificate files, if that is where
        :attr:`ssl_context` came from (any other context is the application's own)."""
        self.ssl_context: Optional[ssl.SSLContext] = ssl_context
        if ssl_context is None:
            self._use_tls_files()
            return
        for name in _TLS_FILES:
            value = getattr(self._settings, name)
            if value is not None:
                raise tls_conflict(name, value, tls_sources[name])

    def _has_own_tls_context(self) -> bool:
        """True when :attr:`ssl_context` is the application's, not built from the files."""
        return self.ssl_context is not None and self.ssl_context is not self._files_context

    def _use_tls_files(self, sources: Optional[dict[str, tuple[Any, str]]] = None) -> None:
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
            self._change({name: value for name, (value, _) in sources.items()})
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
            values.get("proxy_protocol", self.proxy_protocol),
            values.get("trusted_proxies", self.trusted_proxies),
            source,
            trust_any=values.get("insecure_trust_any_proxy", self.insecure_trust_any_proxy),
        )
        store = values.pop("store", _UNSET)
        lease = values.pop("session_lease", _UNSET)
        self._change(values, source)
        if lease is not _UNSET:
            self.session_lease = lease
        if store is not _UNSET:
            self.store = store
        if tls:
            self._use_tls_files(tls)

    # -- registration ----------------------------------------------------------------
    def register_handler(self, handler: HandlerFunction, *filters: SupportsCheck, group: int = 0) -> Handler:
        """Register the async function ``handler`` in ``group``, guarded by ``filters``.

        Groups run in ascending order; inside a group, the first handler (in
        registration order) whose filters all pass is called. Returns the
        :class:`~asyncapy.core.Handler`.
        """
        registered = self._dispatcher.register(Handler(handler, filters), group)
        self._wire()  # a metered dispatcher is a copy: make it anew
        return registered

    def add_handler(self, *filters: SupportsCheck, group: int = 0) -> Callable[[HandlerT], HandlerT]:
        """Decorator form of :meth:`register_handler`; returns the function unchanged
        (its type too, for a type checker)::

            @server.add_handler(Filters.Fields(ping=None), group=-1)
            async def ping(client, packet): ...
        """
        if filters and callable(filters[0]) and not hasattr(filters[0], "check"):
            raise TypeError(
                "add_handler is a decorator factory: write @server.add_handler(), "
                "with parentheses"
            )

        def decorate(function: HandlerT) -> HandlerT:
            self.register_handler(function, *filters, group=group)
            return function

        return decorate

    @property
    def handlers(self) -> tuple[tuple[int, tuple[Handler, ...]], ...]:
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
        sync_fn: Callable[..., T],
        *args: Any,
        cancellable: bool = False,
        limiter: Optional[trio.CapacityLimiter] = None,
    ) -> T:
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
        """Configure logging, serve until Ctrl-C or SIGTERM, then shut down. Blocking.

        A failure to start (the port in use or not permitted, a certificate file gone,
        a bad setting) is one line on stderr and :class:`SystemExit` with status 1 (2
        for a bad setting), as ``asyncapy run`` says it; the traceback is logged at
        DEBUG level."""
        self.configure_logging()
        try:
            trio.run(self._run_until_signalled)
        except (OSError, ConfigError) as exc:
            logger.debug("The server could not start", exc_info=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"asyncapy: {reason}", file=sys.stderr)
            raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None

    def configure_logging(self) -> None:
        """Send log records to stderr in :attr:`log_format` (text with
        :attr:`console_format` and :attr:`datefmt`, or JSON lines), unless the
        application configured logging itself, and set the ``asyncapy`` loggers'
        level to :attr:`logging_level`."""
        logs.configure_server_logging(self._settings)

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
        # The signal receiver encloses the nursery: its watcher may not have run yet when
        # serve() fails at once (setup() raised), and must still find it open.
        failure: Optional[Exception] = None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
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
            metrics.publish(recorder)  # the API-key factories' stores count into it
        await self.setup()
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
        try:
            listeners, probes = await self._open_listeners(sockets)
            self._announce()
            async with trio.open_nursery() as nursery:
                await nursery.start(sessions.run_services)
                nursery.start_soon(self._check_store)
                nursery.start_soon(self._report_suppressed)
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
            metrics.unpublish(recorder)
            listening.log_refusals()
            sessions.report_refusals()
            with trio.CancelScope(shield=True):
                try:
                    await self.shutdown()
                finally:
                    if listeners:  # it served: a failure to start says so itself
                        logger.info("AsyncAPY stopped")

    async def _open_listeners(self, sockets: Optional[Sequence[socket.socket]]) -> tuple[list[trio.abc.Listener[trio.abc.Stream]], Optional[ProbeServer]]:
        """The listeners and the probe endpoint, both bound, or neither."""
        listeners = await self._listening.open(sockets, self.ssl_context)
        self.addresses = [sockname(listener) for listener in listeners]
        try:
            self.probes = await self._bind_probes(self._listening)
        except BaseException:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            raise
        return listeners, self.probes

    def _announce(self) -> None:
        """The start's log lines: where it serves, and a missing accelerator."""
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
            "TLS" if self._listening.ssl_context else "plain TCP",
            self.store,
            where_keys_live(", API keys in "),
        )

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

    async def _report_suppressed(self) -> None:
        """Every :data:`SUPPRESSED_REPORT_SECONDS`, one line per kind of log line the
        rate limits left out since its last line (a flood that stopped is counted even
        if no later line of its kind comes to carry the count)."""
        while True:
            await trio.sleep(SUPPRESSED_REPORT_SECONDS)
            self._listening.log_refusals()
            self._sessions.report_refusals()

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

    async def _sessions_of(self, address: str) -> list[Session]:
        """The sessions of ``address``'s client group (what a handler's
        ``client.get_sessions()`` answers)."""
        return await self._sessions.sessions_of(address)

    # A Client made by hand with a Server (0.5's Client(address, server, stream, ...))
    # asks it what it asks the sessions that serve it: the same answers.
    def attach(self, client: Client) -> None:
        """Give a :class:`~asyncapy.core.Client` made by hand its channel and protocol state."""
        self._sessions.attach(client)

    async def sessions_of(self, address: str) -> list[Session]:
        """The sessions of ``address``'s client group (as ``client.get_sessions()``)."""
        return await self._sessions.sessions_of(address)

    def __repr__(self) -> str:
        return f"Server(addr={self.addr!r}, port={self.port!r})"


def _setting_property(name: str) -> property:
    """``server.NAME``: the setting read from :attr:`Server.settings`; assigned,
    validated and handed to the serving machinery."""

    def get(self: Server) -> Any:
        return getattr(self._settings, name)

    def set(self: Server, value: Any) -> None:
        self._change({name: value})

    return property(get, set, doc=f"The ``{name}`` setting: {SETTINGS[name].accepted}.")


for _name in SETTINGS:
    if _name not in vars(Server):  # store and session_lease have their own
        setattr(Server, _name, _setting_property(_name))


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
