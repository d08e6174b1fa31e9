"""Many processes, one command: ``asyncapy run MODULE:ATTR --workers N``.

One trio loop runs on one core. To use more, ``asyncapy run --workers N`` starts a
*supervisor* (the process you started) and N *worker* processes, each a complete
server: it imports the application itself, applies the same command-line overrides,
runs ``setup()``, serves, and runs ``shutdown()``. Nothing is forked or pickled across,
so a worker is exactly the server ``asyncapy run`` without ``--workers`` would be.

How N processes share one port
    The supervisor binds the listening socket(s) once, so the port is known (port 0
    too) before any worker starts, and a worker that restarts cannot lose a race to
    bind it. Every worker inherits the socket (``pass_fds``) and serves it with
    ``Server.serve(sockets=...)``; the kernel hands each new connection to whichever
    worker accepts it first. Sessions are shared through the session store, which is
    why a session limit with several workers needs Redis (see ``asyncapy/__main__.py``).

How they talk
    One socketpair per worker, the *control channel*. The worker writes ``ready`` once
    it listens (its ``setup()`` done), so the supervisor can log it. Each side sees
    end-of-file when the other side dies: a worker whose supervisor was killed with
    SIGKILL shuts down gracefully instead of serving on as an orphan.

Signals
    SIGTERM or Ctrl-C (SIGINT) to the supervisor: it stops accepting (closes its copy of
    the sockets), sends SIGTERM to every worker and waits for them. Each worker stops
    accepting, gives in-flight handlers ``shutdown_grace`` seconds, releases its
    sessions, runs ``shutdown()`` and exits 0; then the supervisor exits 0. A second
    signal kills the workers (SIGKILL) and the supervisor exits 1. Workers are started
    in a session of their own: a terminal's Ctrl-C goes to its whole foreground process
    group, and a worker that saw that SIGINT and then the forwarded SIGTERM would take
    the second signal for an order to stop *now*.

Metrics and probes
    With a ``metrics_port`` (``--metrics-port``), the supervisor serves ``/metrics``,
    ``/healthz`` and ``/readyz`` (:mod:`asyncapy.probes`), and the workers do not:
    one scrape gives the sum of every worker's counts, which each worker publishes
    to a directory the supervisor reads (:mod:`asyncapy.worker_metrics`). The
    supervisor is ready while it listens, is not stopping, at least one worker
    serves, and the session store answers.

Crashes
    A worker that exits while nobody asked it to (a non-zero status, a signal) is
    logged and started again, after a delay that doubles with each crash of its slot
    within :attr:`RestartPolicy.window` seconds (up to :attr:`RestartPolicy.max_delay`).
    A worker that crashed after it served (one request that kills a process, the OOM
    killer) is restarted for as long as the supervisor runs, and the other workers
    go on serving meanwhile: giving up would turn one bad request into an outage.
    Only a worker that fails *before it ever serves* (``setup()`` raises, the app
    cannot be imported in the worker), :attr:`RestartPolicy.max_start_failures` times
    in a row in one slot, makes the supervisor give up: that is a bad deployment,
    which restarting will not fix. It logs one ERROR line saying so, stops the other
    workers gracefully and exits 1, for the process manager to see.

Logs
    Every line a worker logs says which worker wrote it: text lines start with
    ``worker N (pid P) |``, JSON lines carry ``"worker": N`` and ``"worker_pid": P``
    (:func:`label_worker_logs`). The supervisor's own lines name the worker they
    are about (``Worker 2 (pid 4711) serving``).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import signal
import socket
import sys
from typing import Any, Optional, Sequence

import attrs
import trio

if sys.version_info < (3, 11):  # built in since 3.11; trio depends on the backport before
    from exceptiongroup import BaseExceptionGroup

from . import worker_metrics
from .listening import bind_listeners, format_address, sockname
from .logs import JsonFormatter
from .probes import ProbeServer, Readiness
from .server import Server
from .util import where_keys_live

__all__ = [
    "RestartPolicy", "Supervisor", "supervise", "run_worker", "describe_store", "label_worker_logs",
]

logger: logging.Logger = logging.getLogger("asyncapy.workers")

READY = b"ready"
"""What a worker writes on its control channel once it serves."""

WORKER_COMMAND = "_worker"
"""The hidden ``asyncapy`` subcommand that runs one worker (see ``__main__``)."""


@attrs.frozen
class RestartPolicy:
    """How hard the supervisor keeps a worker slot filled.

    Restarting at once and forever would turn a worker that crashes on start (a bad
    deployment, an unreachable dependency in ``setup()``) into a busy loop that hides
    the failure; giving up on a worker that crashed after it served would let one bad
    request take the whole service down. So: a worker that served is restarted with
    backoff, always; one that cannot start is tried a few times, then the supervisor
    gives up loudly (as gunicorn and uvicorn do with a worker that fails to boot).
    """

    max_start_failures: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    """Workers of one slot that may fail in a row before serving; the last of them
    makes the supervisor give up."""
    window: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    """Seconds over which a slot's crashes count for its backoff."""
    first_delay: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    """Delay before restarting after a slot's first recent crash; doubles with each one."""
    max_delay: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    """Longest delay before a restart."""

    def delay(self, recent_crashes: int) -> float:
        """Seconds to wait before restarting a slot that crashed ``recent_crashes`` times."""
        return min(self.max_delay, self.first_delay * 2 ** max(0, recent_crashes - 1))


class Supervisor:
    """Keeps ``workers`` worker processes serving ``app``'s address until a signal.

    ``worker_args`` are the ``asyncapy run`` arguments each worker is started with
    (the application and the overrides, without ``--workers``): every worker builds
    its own server from them, as the supervisor built ``app``. The supervisor uses
    ``app`` only for where to listen and what to log; it never serves it.
    """

    def __init__(
        self,
        app: Server,
        worker_args: Sequence[str],
        workers: int,
        policy: RestartPolicy = RestartPolicy(),
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.app = app
        self.worker_args: list[str] = list(worker_args)
        self.workers = workers
        self.policy = policy
        self.status = 0
        """The exit status: 0, or 1 after a forced stop, a give-up, or a failed worker."""
        self.addresses: list[tuple] = []
        """The (host, port, ...) socket addresses served, once bound."""
        self._listeners: list[trio.SocketListener] = []
        self._processes: dict[int, trio.Process] = {}
        self._spawning = 0
        self._stopping = trio.Event()  # made anew by each run()
        self._forced = False
        self._serving: set[int] = set()  # pids of the workers that said they serve
        self._metrics: Optional[worker_metrics.WorkersExposition] = None
        self._environment: Optional[dict] = None
        self.probes: Optional[ProbeServer] = None
        """The metrics and probes endpoint, when ``app.metrics_port`` is set."""
        self._metrics_directory: Optional[worker_metrics.MetricsDirectory] = None

    async def run(self) -> int:
        """Bind, start the workers, keep them running until a signal; the exit status.

        A bind failure is raised (an :class:`OSError` naming the address) before any
        worker starts.
        """
        self._stopping = trio.Event()
        self._listeners = await bind_listeners(self.app.addr, self.app.port)
        try:
            self.addresses = [sockname(listener) for listener in self._listeners]
            if self.app.metrics_port is not None:
                await self._bind_metrics()
            logger.info(
                "AsyncAPY serving on %s (%s) with %d worker processes, sessions in %s%s",
                ", ".join(format_address(a) for a in self.addresses),
                "TLS" if self.app.ssl_context else "plain TCP",
                self.workers,
                describe_store(self.app.store),
                where_keys_live(", API keys in "),
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals)
                    if self.probes is not None:
                        nursery.start_soon(self.probes.serve)
                    async with trio.open_nursery() as slots:
                        for index in range(1, self.workers + 1):
                            slots.start_soon(self._keep_filled, index)
                    nursery.cancel_scope.cancel()
        finally:
            self._close_listeners()
            if self._metrics_directory is not None:
                self._metrics_directory.remove()
        logger.info("AsyncAPY stopped: every worker has exited")
        return self.status

    # -- metrics and probes --------------------------------------------------------------
    async def _bind_metrics(self) -> None:
        """Make the directory and bind the endpoint (``OSError`` naming the address if
        it cannot), before any worker starts."""
        directory = self._metrics_directory = worker_metrics.MetricsDirectory.create()
        self._environment = directory.environment()
        self._metrics = worker_metrics.WorkersExposition(
            directory.path, lambda: [p.pid for p in self._processes.values()]
        )
        readiness = Readiness(
            listening=lambda: bool(self._listeners),
            stopping=lambda: self._stopping.is_set(),
            store=self.app.store,
            extra=lambda: None if self._serving else "no worker serving yet",
        )
        host = self.app.metrics_host
        self.probes = ProbeServer(self._metrics, readiness, host=host, port=self.app.metrics_port)
        await self.probes.bind()
        logger.info(
            "Metrics of every worker on %s (/metrics, /healthz, /readyz)",
            ", ".join(f"http://{format_address(a)}" for a in self.probes.addresses),
        )

    # -- signals -----------------------------------------------------------------------
    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self._stopping.is_set():
                logger.info(
                    "%s received: stopping %d worker(s) (grace %ss); send it again to kill them",
                    name,
                    len(self._processes),
                    self.app.shutdown_grace,
                )
                self._stop()
            elif not self._forced:
                logger.warning("Second %s: killing the workers", name)
                self._forced = True
                self.status = 1
                for process in list(self._processes.values()):
                    self._signal(process)

    def _stop(self) -> None:
        """Stop accepting here and ask every worker to stop gracefully."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._close_listeners()
        for process in list(self._processes.values()):
            self._signal(process)

    def _signal(self, process: trio.Process) -> None:
        """SIGTERM ``process``, or SIGKILL it once a stop is forced."""
        try:
            if self._forced:
                process.kill()
            else:
                process.send_signal(signal.SIGTERM)
        except OSError:  # already gone
            pass

    def _close_listeners(self) -> None:
        # Never while a worker is being started: its fork would inherit a closed (or
        # worse, reused) descriptor number. The last spawn to finish closes them.
        if self._spawning:
            return
        for listener in self._listeners:
            listener.socket.close()
        self._listeners = []

    # -- one worker slot -------------------------------------------------------------------
    async def _keep_filled(self, index: int) -> None:
        """Run worker ``index``; start it again whenever it dies unasked (see the policy)."""
        crashes: collections.deque[float] = collections.deque()
        failed_starts = 0  # in a row: workers of this slot that died before serving
        while not self._stopping.is_set():
            pid, code, served = await self._run_one(index)
            if self._stopping.is_set():
                if code == 0 or code == -signal.SIGTERM or self._forced:
                    logger.info("Worker %d (pid %d) stopped", index, pid)
                else:
                    logger.error("Worker %d (pid %d) %s while stopping", index, pid, _describe(code))
                    self.status = 1
                return
            now = trio.current_time()
            crashes.append(now)
            while crashes[0] <= now - self.policy.window:
                crashes.popleft()
            delay = self.policy.delay(len(crashes))
            if served:
                failed_starts = 0
                logger.warning(
                    "Worker %d (pid %d) %s: restarting it in %gs (it had served; %d crash(es) "
                    "of this slot in the last %gs)",
                    index, pid, _describe(code), delay, len(crashes), self.policy.window,
                )
            else:
                failed_starts += 1
                if failed_starts >= self.policy.max_start_failures:
                    logger.error(
                        "Worker %d (pid %d) %s before it served, %d times in a row: giving up "
                        "(a worker that cannot start is a bad deployment; its own log lines "
                        "above say why), stopping the other workers",
                        index, pid, _describe(code), failed_starts,
                    )
                    self.status = 1
                    self._stop()
                    return
                logger.warning(
                    "Worker %d (pid %d) %s before it served: restarting it in %gs "
                    "(start failure %d of %d)",
                    index, pid, _describe(code), delay, failed_starts,
                    self.policy.max_start_failures,
                )
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _run_one(self, index: int) -> tuple[int, int, bool]:
        """Start worker ``index`` and wait for it to exit; its (pid, exit status,
        whether it had said it serves)."""
        ours, theirs = socket.socketpair()
        with ours:
            self._spawning += 1
            try:
                fds = [listener.socket.fileno() for listener in self._listeners]
                command = [
                    sys.executable, "-m", "asyncapy", WORKER_COMMAND,
                    "--listen-fds", ",".join(map(str, fds)),
                    "--control-fd", str(theirs.fileno()),
                    "--worker-index", str(index),
                    *self.worker_args,
                ]
                process = await trio.lowlevel.open_process(
                    command,
                    pass_fds=(*fds, theirs.fileno()),
                    start_new_session=True,
                    env=self._environment,  # None: this process's environment
                )
            finally:
                theirs.close()
                self._spawning -= 1
            self._processes[index] = process
            logger.info("Worker %d started (pid %d)", index, process.pid)
            if self._stopping.is_set():  # a signal came while it was being started
                self._close_listeners()
                self._signal(process)
            control = trio.socket.from_stdlib_socket(ours)
            try:
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._announce_ready, index, process, control)
                    await process.wait()
                    watch.cancel_scope.cancel()
                served = process.pid in self._serving or _said_ready(ours)
            finally:
                del self._processes[index]
                self._serving.discard(process.pid)
                if self._metrics is not None:
                    with trio.CancelScope(shield=True):
                        await self._metrics.retire(process.pid)
        return process.pid, process.returncode, served

    async def _announce_ready(self, index: int, process: trio.Process, control: Any) -> None:
        try:
            message = await control.recv(len(READY))
        except OSError:
            return
        if message == READY:
            self._serving.add(process.pid)
            logger.info("Worker %d (pid %d) serving", index, process.pid)


def _said_ready(control: socket.socket) -> bool:
    """Whether ``ready`` waits unread on an exited worker's control channel (it said
    so, then died before the supervisor's reader ran)."""
    try:
        return control.recv(len(READY), socket.MSG_DONTWAIT) == READY
    except OSError:
        return False


def _describe(code: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def describe_store(store: Any) -> str:
    """``RedisSessionStore at redis://host:6379/0``: where sessions live, for the log.

    Built from the connection settings rather than the URL, so that a password in the
    URL never reaches the log; other stores are named by their class.
    """
    name = type(store).__name__
    client = getattr(store, "redis", None)
    location = getattr(client, "location", None) or getattr(client, "asyncapy_location", None)
    if isinstance(location, str):  # a Sentinel or Cluster store: its URL without credentials
        return f"{name} at {location}"
    pool = getattr(client, "connection_pool", None)
    settings = getattr(pool, "connection_kwargs", None)
    if not isinstance(settings, dict):
        return name
    db = settings.get("db", 0)
    if settings.get("path"):
        return f"{name} at unix://{settings['path']}?db={db}"
    scheme = "rediss" if "SSL" in getattr(pool.connection_class, "__name__", "") else "redis"
    return f"{name} at {scheme}://{settings.get('host')}:{settings.get('port')}/{db}"


def supervise(
    app: Server, worker_args: Sequence[str], workers: int, policy: RestartPolicy = RestartPolicy()
) -> int:
    """Run a :class:`Supervisor` until it is signalled (blocking); its exit status."""
    app.configure_logging()
    return trio.run(Supervisor(app, worker_args, workers, policy).run)


# -- the worker side ---------------------------------------------------------------------------
class _Readiness:
    """The ``task_status`` a worker gives ``Server.serve``: it tells when serving began."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def started(self, value: Any = None) -> None:
        """Called by ``serve`` once it listens and ``setup()`` is done."""
        self.event.set()


def run_worker(
    app: Server, listen_fds: Sequence[int], control_fd: int, *, index: Optional[int] = None
) -> None:
    """Serve ``app`` on inherited listening sockets until signalled (blocking).

    ``listen_fds`` are the supervisor's listening sockets, ``control_fd`` this worker's
    end of its control channel, ``index`` its slot (named in each of its log lines).
    SIGTERM or SIGINT stop it gracefully, as they stop ``asyncapy run`` without
    workers; so does its supervisor's death.
    """
    sockets = [socket.socket(fileno=fd) for fd in listen_fds]
    control = socket.socket(fileno=control_fd)
    app.configure_logging()
    if index is not None:
        label_worker_logs(index)
    try:
        trio.run(_serve_worker, app, sockets, control, index)
    except Exception as exc:
        # Logged (each line labelled with this worker), not left to the interpreter's
        # unlabelled traceback among its siblings'; the supervisor sees status 1.
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        logger.critical("This worker failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        raise SystemExit(1) from None


class _WorkerFormatter(logging.Formatter):
    """Wraps a handler's formatter: the same lines, saying which worker wrote them."""

    def __init__(self, inner: logging.Formatter, index: int, pid: int) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        """The inner formatter's text, labelled with this worker's slot and pid."""
        text = self.inner.format(record)
        if isinstance(self.inner, JsonFormatter) and text.startswith("{"):
            return f'{{"worker": {self.index}, "worker_pid": {self.pid}, {text[1:]}'
        prefix = f"worker {self.index} (pid {self.pid}) | "
        return "\n".join(prefix + line for line in text.split("\n"))


def label_worker_logs(index: int) -> None:
    """Make every handler of the root logger say which worker wrote each record:
    text lines get ``worker N (pid P) |`` in front, JSON lines ``"worker": N`` and
    ``"worker_pid": P``. Several workers share one stderr: without it, a traceback
    cannot be told apart from its siblings'."""
    pid = os.getpid()
    for handler in logging.getLogger().handlers:
        inner = handler.formatter or logging.Formatter()
        if isinstance(inner, _WorkerFormatter):
            inner = inner.inner
        handler.setFormatter(_WorkerFormatter(inner, index, pid))


async def _serve_worker(
    app: Server, sockets: list[socket.socket], control: socket.socket, index: Optional[int] = None
) -> None:
    readiness = _Readiness()
    failure: Optional[Exception] = None
    directory = worker_metrics.worker_directory()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stay_in_touch, app, trio.socket.from_stdlib_socket(control), readiness)
        if directory is not None:
            # The server counts into its recorder (a real one: it found the directory
            # set) and serves no endpoint; the supervisor reads what this publishes.
            app._choose_recorder()
            label = None if index is None else f"worker-{index}"
            nursery.start_soon(
                functools.partial(
                    worker_metrics.publish, app.metrics_recorder, directory, label=label
                )
            )
        try:
            await app._run_until_signalled(sockets=sockets, task_status=readiness)
        except Exception as exc:  # re-raised as itself, not inside an ExceptionGroup
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _stay_in_touch(app: Server, control: Any, readiness: _Readiness) -> None:
    """Say ``ready`` to the supervisor, then stop gracefully if it goes away."""
    await readiness.event.wait()
    try:
        await control.send(READY)
        while await control.recv(64):  # the supervisor never writes: only EOF comes
            pass
    except OSError:
        pass
    logger.warning("The supervisor is gone: shutting down")
    app.request_shutdown()
