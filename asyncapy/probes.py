"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, in trio.

A Prometheus server scrapes ``/metrics``; a load balancer or an orchestrator asks
``/healthz`` (is the process alive: 200 whenever the event loop answers at all) and
``/readyz`` (may it be sent new sessions: 200, or 503 with the reason in the body).
:class:`ProbeServer` serves them from the server's own event loop, next to the API,
so a few things matter more than they would for a web framework:

Nothing may block the loop
    A connection is a task, never a thread. The metrics text is rendered in a worker
    thread (one at a time), from a snapshot the loop takes in microseconds
    (:class:`RecorderExposition`). The readiness check of the session store runs at
    most once per :attr:`StoreProbe.interval` however many probes come, and a probe
    waits for it at most :attr:`StoreProbe.timeout` seconds.

A slow or hostile scraper cannot harm the API
    Everything a client can make the endpoint hold is bounded: the request head
    (:data:`asyncapy.domain.httphead.MAX_HEAD` bytes, 64 header lines), the time to
    send it (:data:`REQUEST_TIMEOUT` from the connection, however the bytes trickle:
    a slowloris gets no more), the time to take the response
    (:data:`RESPONSE_TIMEOUT`), and the connections at once
    (:data:`MAX_CONNECTIONS`). Past that cap, a new connection evicts the oldest
    one still sending its request, so a flood of idle connections delays a real
    probe by no more than its own round trip; if every connection is already being
    answered, the new one is closed at once. The endpoint binds to 127.0.0.1 unless
    told otherwise: expose it only where the scrapers and probes are.

The endpoint understands only ``GET`` and ``HEAD`` of these three paths (a query
string is ignored), answers with ``Connection: close``, and never reads a body.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Protocol, Sequence

import trio

from asyncapy.domain.httphead import BadRequest, RequestHead, head_end, parse_head
from asyncapy.domain.ports import SessionStore

from .metrics import Recorder, SnapshotCollector

__all__ = [
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT",
    "RESPONSE_TIMEOUT",
    "ReadinessSource",
    "Exposition",
    "StoreProbe",
    "Readiness",
    "RecorderExposition",
    "CombinedRegistry",
    "ProbeServer",
]

logger: logging.Logger = logging.getLogger("asyncapy.probes")

MAX_CONNECTIONS = 32
"""Connections the endpoint serves at once (a scraper and a few probes need three)."""

REQUEST_TIMEOUT = 2.0
"""Seconds from accepting a connection to having its whole request head. A scraper on
the same network sends it in one packet; Kubernetes' probes give up after 1 s."""

RESPONSE_TIMEOUT = 10.0
"""Seconds to produce and send a response (the metrics render and a store check)."""

LINGER_TIMEOUT = 0.5
"""Seconds to drain what a client sent beyond its request, after the response, so that
closing does not reset the connection under a response it has not read yet."""

PROBE_ADDRESS = "readiness-probe"
"""The client address :class:`StoreProbe` lists the sessions of: no client has it."""


class ReadinessSource(Protocol):
    """What ``/readyz`` asks: None when ready for new sessions, else why not."""

    async def not_ready(self) -> Optional[str]:
        """None if ready; otherwise the reason, one line, for the 503's body."""


class Exposition(Protocol):
    """What ``/metrics`` renders."""

    async def render(self, accept: str) -> tuple[bytes, str]:
        """The metrics for a scraper sending ``Accept: accept``: ``(body, content type)``."""


class StoreProbe:
    """Whether a session store answers, checked through its port (``sessions()`` of an
    address no client has: a read that changes nothing).

    One check at a time, and its result reused for ``interval`` seconds, however many
    probes come: probes never multiply the load on a store that is struggling. A
    check that takes longer than ``timeout`` counts as a failure (the store's own
    socket timeouts end it in the background).
    """

    def __init__(self, store: SessionStore, *, interval: float = 1.0, timeout: float = 2.0) -> None:
        self.store = store
        """The store checked."""
        self.interval = interval
        """Seconds a result is reused."""
        self.timeout = timeout
        """Seconds a probe waits for a check."""
        self._reason: Optional[str] = None
        self._checked_at = -math.inf
        self._running: Optional[trio.Event] = None

    async def not_ready(self) -> Optional[str]:
        """None if the store answered (lately), else why it is taken as unreachable."""
        if trio.current_time() - self._checked_at < self.interval:
            return self._reason
        if self._running is None:
            self._running = trio.Event()
            # The check runs in the system nursery, not in the probe's task: a probe
            # that gives up (its deadline) must not leave the next one without a result.
            trio.lowlevel.spawn_system_task(self._check, self._running)
        running = self._running
        with trio.move_on_after(self.timeout):
            await running.wait()
            return self._reason
        return f"session store did not answer within {self.timeout}s"

    async def _check(self, done: trio.Event) -> None:
        try:
            with trio.move_on_after(max(self.timeout, self.interval) * 5) as scope:
                await self.store.sessions(PROBE_ADDRESS)
            self._reason = "session store timed out" if scope.cancelled_caught else None
        except Exception as exc:  # StoreUnavailable, or a store broken another way
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._reason = f"session store unavailable: {detail}"
        finally:
            self._checked_at = trio.current_time()
            self._running = None
            done.set()


class Readiness:
    """The readiness of a server: it listens, is not shutting down, and its session
    store answers (in that order; the first failure is the reason).

    ``listening`` and ``stopping`` are called at each probe; ``store`` is checked
    through a :class:`StoreProbe` (pass None for no store check). The server builds
    one when it starts serving; the supervisor of ``--workers`` builds its own.
    """

    def __init__(
        self,
        *,
        listening: Callable[[], bool],
        stopping: Callable[[], bool],
        store: Optional[SessionStore] = None,
        extra: Optional[Callable[[], Optional[str]]] = None,
    ) -> None:
        self.listening = listening
        """True while the API's sockets accept connections."""
        self.stopping = stopping
        """True once a shutdown has begun."""
        self.store: StoreProbe | None = StoreProbe(store) if store is not None else None
        """The probe of the session store, or None."""
        self.extra = extra
        """Another check (None or a reason), asked last: the supervisor's "no worker
        serving yet"."""

    async def not_ready(self) -> Optional[str]:
        """None if ready, else the first reason not to be."""
        if self.stopping():
            return "shutting down"
        if not self.listening():
            return "not listening"
        if self.extra is not None:
            reason = self.extra()
            if reason is not None:
                return reason
        if self.store is not None:
            return await self.store.not_ready()
        return None


class CombinedRegistry:
    """What ``prometheus_client.generate_latest`` needs of a registry (``collect()``),
    over several collectors or registries at once: AsyncAPY's own metrics and the
    process's default registry (``process_*``, ``python_*``, and the application's
    own metrics), without registering AsyncAPY's in the global one (two servers in
    one process would clash there)."""

    def __init__(self, collectors: Sequence[Any]) -> None:
        self.collectors: list[Any] = list(collectors)
        """Objects with a ``collect()`` method, rendered in this order."""

    def collect(self) -> Any:
        """Every family of every collector."""
        for collector in self.collectors:
            yield from collector.collect()


class RecorderExposition:
    """``/metrics`` of one server process: its :class:`~asyncapy.metrics.Recorder`'s
    snapshot, taken on the event loop, rendered in a worker thread together with
    ``registry`` (the default ``prometheus_client`` registry unless given; None for
    AsyncAPY's metrics alone)."""

    _DEFAULT: Any = object()

    def __init__(self, recorder: Recorder, registry: Any = _DEFAULT) -> None:
        if registry is RecorderExposition._DEFAULT:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        self.recorder = recorder
        """Where the counts come from."""
        self.registry = registry
        """Other metrics rendered after AsyncAPY's, or None."""
        self._limiter = trio.CapacityLimiter(1)

    async def render(self, accept: str) -> tuple[bytes, str]:
        """The text of a fresh snapshot (OpenMetrics if ``accept`` asks for it)."""
        snapshot = self.recorder.snapshot()
        collectors: list = [SnapshotCollector(lambda: snapshot)]
        if self.registry is not None:
            collectors.append(self.registry)
        return await trio.to_thread.run_sync(
            render_text, CombinedRegistry(collectors), accept, limiter=self._limiter
        )


def render_text(registry: Any, accept: str) -> tuple[bytes, str]:
    """``registry`` in the format ``accept`` asks for (Prometheus text by default):
    ``(body, content type)``. Blocking: run it in a thread."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TEXT = "text/plain; charset=utf-8"


def _response(status: int, body: bytes, content_type: str = _TEXT, *, head: bool = False,
              extra: str = "") -> bytes:
    lines = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        f"{extra}\r\n"
    )
    return lines.encode("latin-1") + (b"" if head else body)


class _Connection:
    __slots__ = ("scope", "reading", "evicted")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.reading = True
        self.evicted = False


class ProbeServer:
    """The HTTP endpoint: ``/metrics`` from ``exposition``, ``/healthz``, and ``/readyz``
    from ``readiness`` (see the module's docstring for its limits).

    ``await nursery.start(probes.serve)`` returns the addresses it listens on once it
    does; it serves until cancelled.
    """

    def __init__(
        self,
        exposition: Exposition,
        readiness: ReadinessSource,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        response_timeout: float = RESPONSE_TIMEOUT,
    ) -> None:
        self.exposition = exposition
        """What ``/metrics`` renders."""
        self.readiness = readiness
        """What ``/readyz`` asks."""
        self.host = host
        """Address to bind (``metrics_host``)."""
        self.port = port
        """Port to bind (``metrics_port``; 0 for any free one)."""
        self.max_connections = max_connections
        """Connections served at once."""
        self.request_timeout = request_timeout
        """Seconds to receive a request head, from the connection."""
        self.response_timeout = response_timeout
        """Seconds to produce and send a response."""
        self.addresses: list[tuple] = []
        """The (host, port, ...) addresses listened on, once serving."""
        self._listeners: list = []
        self._active = 0
        self._reading: dict[_Connection, None] = {}  # oldest first

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return self._active

    async def bind(self) -> list[tuple]:
        """Listen on :attr:`host` and :attr:`port` now (``serve`` does it otherwise);
        the addresses. A failure is an ``OSError`` naming the address
        (``cannot listen on 127.0.0.1:9100 for metrics: ...``)."""
        try:
            self._listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen on {self.host}:{self.port} for metrics: {exc.strerror or exc}",
            ) from exc
        self.addresses = [listener.socket.getsockname() for listener in self._listeners]
        return self.addresses

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (unless :meth:`bind` did) and serve until cancelled; the listeners
        are closed then."""
        if not self._listeners:
            await self.bind()
        listeners, self._listeners = self._listeners, []
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, nursery)
                task_status.started(self.addresses)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError:  # out of descriptors: the API's accept loop logs those
                await trio.sleep(0.1)
                continue
            if self._active >= self.max_connections:
                if not self._reading:
                    stream.socket.close()  # every slot is answering: no room
                    continue
                victim = next(iter(self._reading))
                del self._reading[victim]
                victim.evicted = True
                victim.scope.cancel()
                self._active -= 1
            connection = _Connection()
            self._active += 1
            self._reading[connection] = None
            nursery.start_soon(self._serve_connection, stream, connection)

    async def _serve_connection(self, stream: trio.SocketStream, connection: _Connection) -> None:
        try:
            with connection.scope:
                connection.scope.deadline = trio.current_time() + self.request_timeout
                try:
                    head = await self._read_head(stream)
                except BadRequest as exc:
                    self._done_reading(connection)
                    connection.scope.deadline = trio.current_time() + 1.0
                    await stream.send_all(_response(exc.status, f"{exc.reason}\n".encode()))
                    return
                if head is None:
                    return
                self._done_reading(connection)
                connection.scope.deadline = trio.current_time() + self.response_timeout
                try:
                    response = await self._answer(head)
                except Exception:
                    logger.exception("The %s endpoint failed", head.path)
                    response = _response(500, b"internal error: see the server's log\n")
                await stream.send_all(response)
                await self._linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._done_reading(connection)
            if not connection.evicted:
                self._active -= 1
            stream.socket.close()

    def _done_reading(self, connection: _Connection) -> None:
        if connection.reading:
            connection.reading = False
            self._reading.pop(connection, None)

    async def _read_head(self, stream: trio.SocketStream) -> Optional[RequestHead]:
        buffer = bytearray()
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return None  # the client left before its request was complete
            buffer += data
            end = head_end(buffer)
            if end >= 0:
                return parse_head(buffer[:end])

    async def _linger(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(LINGER_TIMEOUT):
            await stream.send_eof()
            while await stream.receive_some(4096):
                pass

    async def _answer(self, head: RequestHead) -> bytes:
        is_head = head.method == "HEAD"
        if head.method not in ("GET", "HEAD"):
            return _response(405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
        path = head.path
        if path == "/healthz":
            return _response(200, b"ok\n", head=is_head)
        if path == "/readyz":
            reason = await self.readiness.not_ready()
            if reason is None:
                return _response(200, b"ready\n", head=is_head)
            return _response(503, f"not ready: {reason}\n".encode(), head=is_head)
        if path == "/metrics":
            body, content_type = await self.exposition.render(head.header("accept"))
            return _response(200, body, content_type, head=is_head)
        return _response(404, b"not found: try /metrics, /healthz or /readyz\n", head=is_head)
