"""What a server counts for Prometheus, and how it counts it without slowing a packet.

The names are a promise (dashboards and alerts depend on them; docs/operations.md
documents each):

=========================================== ======================================
``asyncapy_requests_total{encoding}``       requests decoded and dispatched
``asyncapy_error_replies_total{code}``      error replies sent, by ``ERR_*`` code
``asyncapy_sessions``                       sessions live now (gauge)
``asyncapy_connections_total{outcome}``     connections, by what became of them
``asyncapy_handler_duration_seconds``       one handler's run, by ``handler`` (histogram)
``asyncapy_store_duration_seconds``         one store call, by ``operation`` (histogram)
``asyncapy_rate_limited_total{limit}``      packets refused ``ERR_RATE_LIMITED``, by limit
``asyncapy_store_errors_total{operation}``  store calls that failed
``asyncapy_key_cache_hits_total``           API-key look-ups the cache answered
``asyncapy_key_cache_misses_total``         API-key look-ups that went to the store
``asyncapy_received_bytes_total``           bytes read from clients
``asyncapy_sent_bytes_total``               bytes of replies written to clients
``asyncapy_build_info{version,python}``     always 1: which AsyncAPY and Python run
=========================================== ======================================

Every label value a dashboard may ask for exists from the start, at 0: the encodings,
the error codes, the outcomes, and the store operations (``admit``, ``release``,
``sessions``, and ``key_*`` of every metered key store) of both the duration histogram
and ``asyncapy_store_errors_total``: a rate, or an alert on errors, is defined before
the first event.

Why not call ``prometheus_client`` per packet
    A ``Counter.inc()`` takes a lock and costs about a microsecond; a small request
    costs the whole server about 24 microseconds. Three such calls a packet would eat
    the 3% the metrics may cost. So the hot path only adds to plain ``int`` attributes
    (trio runs one thread: no lock is needed), mostly on a per-session
    :class:`SessionMeter`, and :class:`Recorder` folds them into totals when a session
    ends and when someone scrapes (:meth:`Recorder.snapshot`). The scrape turns the
    :class:`Snapshot` into ``prometheus_client`` metric families
    (:func:`families`), which ``prometheus_client.generate_latest`` writes in the
    Prometheus text format. Handler and store timings are histograms with fixed
    buckets, kept as lists of counts; the fixed buckets are also what lets the
    snapshots of several worker processes be summed exactly
    (:meth:`Snapshot.merge`).

Metrics off
    :data:`NULL_RECORDER` has the same methods and does nothing: the wrappers of
    :mod:`asyncapy.metered` hand back what they were given, and its meters are never
    read.
"""

from __future__ import annotations

import bisect
import platform
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional

import attrs

from asyncapy.domain.errors import ALL_CODES

__all__ = [
    "HANDLER_BUCKETS",
    "STORE_BUCKETS",
    "ENCODINGS",
    "OUTCOMES",
    "LIMITS",
    "Timings",
    "SessionMeter",
    "CacheMeter",
    "Snapshot",
    "Recorder",
    "NullRecorder",
    "NULL_RECORDER",
    "KEY_OPERATIONS",
    "published",
    "publish",
    "unpublish",
    "key_store_metered",
    "watch_key_cache",
    "families",
    "SnapshotCollector",
    "SESSION_OPERATIONS",
    "PROCESS_METRICS",
    "process_stats",
]

HANDLER_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
"""Upper bounds (seconds) of ``asyncapy_handler_duration_seconds``' buckets: from 100 µs
(a handler that answers from memory) to 10 s. Fixed, so that workers' histograms add up."""

STORE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
)
"""Upper bounds (seconds) of ``asyncapy_store_duration_seconds``' buckets: from 50 µs (the
memory store) through a Redis round trip (about 0.1-1 ms) to a store timing out."""

ENCODINGS = ("json", "ziproto")
"""The ``encoding`` label's values; both are exported from the start, at 0."""

LIMITS = ("address", "key", "key_failures")
"""The ``limit`` label of ``asyncapy_rate_limited_total``: the client address's
``rate_limit``; an API key's own limit; the failed-key-check throttle of an address.
Every series is exported from the start, at 0."""

OUTCOMES = (
    "admitted",
    "refused_session_limit",
    "refused_max_connections",
    "store_unavailable",
    "tls_handshake_failed",
    "refused_handshakes",
    "refused_proxy",
)
"""The ``outcome`` label of ``asyncapy_connections_total``: admitted as a session;
refused for the client address's ``session_limit``; closed at once past the process's
``max_connections``; refused with ``ERR_UNAVAILABLE`` because the session store failed;
closed because its TLS handshake failed or did not finish within ``timeout``; closed
with ``proxy_protocol`` on, from a peer not in ``trusted_proxies`` or without a valid
PROXY header in time."""


SESSION_OPERATIONS = ("admit", "release", "sessions")
"""The session store's timed operations; their ``asyncapy_store_errors_total`` series
exist from the start, at 0 (the key store's ``key_*`` ones from when it is metered)."""

PROCESS_METRICS = {
    "process_cpu_seconds": ("counter", "Total user and system CPU time spent in seconds."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
}
"""The ``process_*`` families of ``prometheus_client``'s process collector: what each
worker of ``--workers`` reports of itself, rendered by the supervisor with a
``process`` label (``supervisor``, ``worker-1``...)."""


def process_stats() -> dict:
    """This process's ``process_*`` values (:data:`PROCESS_METRICS`), read by
    ``prometheus_client``'s process collector (from ``/proc``: empty elsewhere).
    Blocking: run it in a thread."""
    from prometheus_client import ProcessCollector

    stats = {}
    for family in ProcessCollector(registry=None).collect():
        if family.name in PROCESS_METRICS and family.samples:
            stats[family.name] = float(family.samples[0].value)
    return stats


class Timings:
    """A histogram kept as plain numbers: a count per bucket (not cumulative) and a sum.

    ``counts[i]`` counts observations ``<= bounds[i]`` and above the bound before;
    the last entry counts those above every bound (``+Inf``).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts: list[int] = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation of ``seconds``."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def copy(self) -> "Timings":
        """An independent copy (a snapshot must not move as the server goes on)."""
        other = Timings(self.bounds)
        other.counts = list(self.counts)
        other.total = self.total
        return other

    def add(self, other: "Timings") -> None:
        """Add ``other``'s observations to these (same bounds)."""
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different buckets")
        counts = self.counts
        for index, count in enumerate(other.counts):
            counts[index] += count
        self.total += other.total


class SessionMeter:
    """One live session's counts, added to by the session loop as plain ints.

    ``requests`` (decoded requests), ``received`` and ``sent`` (bytes). The session's
    encoding is read from ``client.encoding`` (any object with that attribute) when
    the counts are folded: it is fixed by the session's first valid packet, so the
    loop need not say it per request.
    """

    __slots__ = ("requests", "received", "sent", "client")

    def __init__(self, client: Any = None) -> None:
        self.requests: int = 0
        self.received: int = 0
        self.sent: int = 0
        self.client: Any = client

    @property
    def encoding(self) -> Optional[str]:
        """The session's encoding (``client.encoding``), or None when unknown."""
        return getattr(self.client, "encoding", None)


class CacheMeter:
    """Hits and misses of an API-key cache: the cache calls :meth:`hit` or :meth:`miss`
    once per look-up.

    Any object with these two methods will do for a cache (a cache in ``adapters/``
    cannot import this module); :data:`NULL_RECORDER`'s does nothing.
    """

    __slots__ = ("hits", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0

    def hit(self) -> None:
        """A look-up answered from the cache."""
        self.hits += 1

    def miss(self) -> None:
        """A look-up that had to ask the store."""
        self.misses += 1


class _NullCacheMeter(CacheMeter):
    __slots__ = ()

    def hit(self) -> None:
        """Counts nothing (metrics off)."""

    def miss(self) -> None:
        """Counts nothing (metrics off)."""


def _zeroes(names: Iterable[str]) -> dict:
    return {name: 0 for name in names}


@attrs.define
class Snapshot:
    """Every metric's value at one moment, as plain data (no ``prometheus_client``).

    What a scrape renders (:func:`families`), and what each worker process of
    ``asyncapy run --workers N`` writes for its supervisor to sum (:meth:`to_dict`,
    :meth:`from_dict`, :meth:`merge`).
    """

    requests: dict = attrs.field(factory=lambda: _zeroes(ENCODINGS))
    """Requests by encoding (counter)."""
    error_replies: dict = attrs.field(factory=lambda: _zeroes(ALL_CODES))
    """Error replies by code (counter)."""
    connections: dict = attrs.field(factory=lambda: _zeroes(OUTCOMES))
    """Connections by outcome (counter)."""
    sessions: int = 0
    """Live sessions (gauge)."""
    received: int = 0
    """Bytes received (counter)."""
    sent: int = 0
    """Bytes sent (counter)."""
    cache_hits: int = 0
    """API-key cache hits (counter)."""
    cache_misses: int = 0
    """API-key cache misses (counter)."""
    store_errors: dict = attrs.field(factory=lambda: _zeroes(SESSION_OPERATIONS))
    """Failed store calls by operation (counter)."""
    rate_limited: dict = attrs.field(factory=lambda: _zeroes(LIMITS))
    """Packets refused ``ERR_RATE_LIMITED``, by the limit that refused them (counter)."""
    handlers: dict = attrs.field(factory=dict)
    """Handler name -> :class:`Timings` (histogram)."""
    store: dict = attrs.field(factory=dict)
    """Store operation -> :class:`Timings` (histogram)."""
    processes: dict = attrs.field(factory=dict)
    """Process label (``worker-1``...) -> its :func:`process_stats` (gauges of live
    processes: filled by the workers of ``--workers`` only)."""

    def merge(self, other: "Snapshot", *, gauges: bool = True) -> None:
        """Add ``other`` into this snapshot: counters and histograms summed exactly;
        the ``sessions`` gauge summed too unless ``gauges`` is False (the snapshot of
        a worker that has exited: its sessions are gone, its counts are not)."""
        for mine, theirs in (
            (self.requests, other.requests),
            (self.error_replies, other.error_replies),
            (self.connections, other.connections),
            (self.store_errors, other.store_errors),
            (self.rate_limited, other.rate_limited),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        if gauges:
            self.sessions += other.sessions
            self.processes.update(other.processes)
        self.received += other.received
        self.sent += other.sent
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        for mine, theirs in ((self.handlers, other.handlers), (self.store, other.store)):
            for key, timings in theirs.items():
                if key in mine:
                    mine[key].add(timings)
                else:
                    mine[key] = timings.copy()

    def to_dict(self) -> dict:
        """JSON-ready plain data (what a worker writes to its snapshot file)."""
        data = attrs.asdict(self, recurse=False)
        for name in ("handlers", "store"):
            data[name] = {
                key: {"counts": list(t.counts), "sum": t.total} for key, t in data[name].items()
            }
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Snapshot":
        """The snapshot :meth:`to_dict` wrote. ``ValueError`` if it is not one."""
        try:
            histograms: dict[str, Any] = {}
            for name, bounds in (("handlers", HANDLER_BUCKETS), ("store", STORE_BUCKETS)):
                histograms[name] = {}
                for key, entry in data[name].items():
                    timings = Timings(bounds)
                    counts = [int(c) for c in entry["counts"]]
                    if len(counts) != len(timings.counts):
                        raise ValueError(f"{name}[{key!r}] has {len(counts)} buckets")
                    timings.counts = counts
                    timings.total = float(entry["sum"])
                    histograms[name][key] = timings
            return cls(
                requests={str(k): int(v) for k, v in data["requests"].items()},
                error_replies={str(k): int(v) for k, v in data["error_replies"].items()},
                connections={str(k): int(v) for k, v in data["connections"].items()},
                sessions=int(data["sessions"]),
                received=int(data["received"]),
                sent=int(data["sent"]),
                cache_hits=int(data["cache_hits"]),
                cache_misses=int(data["cache_misses"]),
                store_errors={str(k): int(v) for k, v in data["store_errors"].items()},
                rate_limited={str(k): int(v) for k, v in data.get("rate_limited", {}).items()},
                processes={
                    str(label): {str(k): float(v) for k, v in stats.items()}
                    for label, stats in data.get("processes", {}).items()
                },
                **histograms,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a metrics snapshot: {exc!r}") from None


class Recorder:
    """Counts what one server process does, cheaply (see the module's docstring).

    The hooks, and who calls them:

    * :meth:`session_started` / :meth:`session_ended`: once per admitted session; in
      between, the session loop adds to the returned :class:`SessionMeter`'s
      ``requests`` (per decoded request), ``received`` (per read) and ``sent`` (per
      write) attributes directly.
    * :meth:`connection`: once per accepted connection, with its outcome.
    * :meth:`error_reply`: once per error reply written.
    * handler and store timings come from the wrappers of :mod:`asyncapy.metered`,
      which call :meth:`handler_timings` and :meth:`store_timings` once, up front.
    * :attr:`key_cache`: the :class:`CacheMeter` an API-key cache counts on.
    """

    enabled = True
    """True: the wrappers of :mod:`asyncapy.metered` instrument for this recorder."""

    def __init__(self) -> None:
        self._live: set[SessionMeter] = set()
        self._ended = Snapshot()
        self._handlers: dict[str, Timings] = {}
        self._store: dict[str, Timings] = {}
        self._store_errors: dict[str, int] = _zeroes(SESSION_OPERATIONS)
        self._rate_limited: dict[str, int] = _zeroes(LIMITS)
        self._errors = self._ended.error_replies
        self._connections = self._ended.connections
        self.key_cache: CacheMeter = CacheMeter()
        """Counts the API-key cache's hits and misses (hand it to the cache)."""
        self._key_caches: list = []

    # -- the hooks ---------------------------------------------------------------------
    def session_started(self, client: Any = None) -> SessionMeter:
        """A new live session: its meter (``client.encoding`` names its encoding)."""
        meter = SessionMeter(client)
        self._live.add(meter)
        return meter

    def session_ended(self, meter: SessionMeter) -> None:
        """Fold an ended session's counts into the totals; it is no longer live."""
        self._live.discard(meter)
        self._fold(self._ended, meter)

    def connection(self, outcome: str) -> None:
        """Count a connection by ``outcome`` (one of :data:`OUTCOMES`)."""
        connections = self._connections
        connections[outcome] = connections.get(outcome, 0) + 1

    def error_reply(self, code: str) -> None:
        """Count an error reply with ``code`` (an ``ERR_*`` code)."""
        errors = self._errors
        errors[code] = errors.get(code, 0) + 1

    def rate_limited(self, limit: str) -> None:
        """Count a packet refused by ``limit`` (one of :data:`LIMITS`)."""
        counts = self._rate_limited
        counts[limit] = counts.get(limit, 0) + 1

    def handler_timings(self, name: str) -> Timings:
        """The histogram of handler ``name`` (created on first use), to observe into."""
        timings = self._handlers.get(name)
        if timings is None:
            timings = self._handlers[name] = Timings(HANDLER_BUCKETS)
        return timings

    def store_timings(self, operation: str) -> Timings:
        """The histogram of store ``operation`` (``admit``, ``get``...), to observe into."""
        timings = self._store.get(operation)
        if timings is None:
            timings = self._store[operation] = Timings(STORE_BUCKETS)
            # Its error series exists from now on, at 0: an alert on a rate of errors
            # must not wait for the first failure to have a series to look at.
            self._store_errors.setdefault(operation, 0)
        return timings

    def store_error(self, operation: str) -> None:
        """Count a failed call of store ``operation``."""
        self._store_errors[operation] = self._store_errors.get(operation, 0) + 1

    def watch_key_cache(self, cache: Any) -> None:
        """Add the counts of ``cache`` (any object with ``hits`` and ``misses``
        attributes, such as :class:`asyncapy.adapters.key_cache.KeyCache`, which
        counts them anyway) to the key cache's, read at each snapshot: the cache's
        look-ups cost nothing more. Watching one cache twice counts it once."""
        if not any(watched is cache for watched in self._key_caches):
            self._key_caches.append(cache)

    # -- reading -----------------------------------------------------------------------
    @staticmethod
    def _fold(into: Snapshot, meter: SessionMeter) -> None:
        if meter.requests:
            encoding = meter.encoding or "unknown"
            into.requests[encoding] = into.requests.get(encoding, 0) + meter.requests
        into.received += meter.received
        into.sent += meter.sent

    def snapshot(self) -> Snapshot:
        """Every value now, as an independent :class:`Snapshot`. Call it from the
        event loop's thread (it reads the live sessions' meters, which the loop
        changes); it costs a few attribute reads per live session."""
        ended = self._ended
        snap = Snapshot(
            requests=dict(ended.requests),
            error_replies=dict(self._errors),
            connections=dict(self._connections),
            sessions=len(self._live),
            received=ended.received,
            sent=ended.sent,
            cache_hits=self.key_cache.hits + sum(c.hits for c in self._key_caches),
            cache_misses=self.key_cache.misses + sum(c.misses for c in self._key_caches),
            store_errors=dict(self._store_errors),
            rate_limited=dict(self._rate_limited),
            handlers={name: t.copy() for name, t in self._handlers.items()},
            store={name: t.copy() for name, t in self._store.items()},
        )
        for meter in self._live:
            self._fold(snap, meter)
        return snap


class NullRecorder(Recorder):
    """The recorder of a server with metrics off: every hook does nothing, and the
    wrappers of :mod:`asyncapy.metered` leave what they are given as it is."""

    enabled = False
    """False: nothing is instrumented."""

    def __init__(self) -> None:
        super().__init__()
        self.key_cache: _NullCacheMeter = _NullCacheMeter()
        self._discarded = SessionMeter()

    def session_started(self, client: Any = None) -> SessionMeter:
        """A meter that is never read (shared by every session)."""
        return self._discarded

    def session_ended(self, meter: SessionMeter) -> None:
        """Does nothing."""

    def connection(self, outcome: str) -> None:
        """Does nothing."""

    def error_reply(self, code: str) -> None:
        """Does nothing."""

    def rate_limited(self, limit: str) -> None:
        """Does nothing."""

    def store_error(self, operation: str) -> None:
        """Does nothing."""


    def watch_key_cache(self, cache: Any) -> None:
        """Does nothing."""


NULL_RECORDER = NullRecorder()

KEY_OPERATIONS = ("put", "get", "delete", "contains", "update", "replace")
"""The key store's timed operations (``key_put``...)."""

_published: Recorder = NULL_RECORDER
_key_caches: "weakref.WeakSet[Any]" = weakref.WeakSet()
_metered_key_stores = 0


def published() -> Recorder:
    """The recorder of this process's serving server (:func:`publish`), or
    :data:`NULL_RECORDER`: where the key stores metered at their construction
    (:class:`asyncapy.metered.MeteredKeyStore` without a recorder of its own) count."""
    return _published


def publish(recorder: Recorder) -> None:
    """Make ``recorder`` this process's (the server does when it serves with metrics
    on): the API-key factories made before, and after, count into it, with no store
    rewired. Their ``key_*`` series and the key caches' counts exist from now on."""
    global _published
    _published = recorder
    if _metered_key_stores:
        for operation in KEY_OPERATIONS:
            recorder.store_timings(f"key_{operation}")
    for cache in list(_key_caches):
        recorder.watch_key_cache(cache)


def unpublish(recorder: Recorder) -> None:
    """Stop counting into ``recorder`` if it is the published one (its server stopped)."""
    global _published
    if _published is recorder:
        _published = NULL_RECORDER


def key_store_metered() -> None:
    """Note a key store metered at its construction (its ``key_*`` series are due)."""
    global _metered_key_stores
    _metered_key_stores += 1
    if _published.enabled:
        for operation in KEY_OPERATIONS:
            _published.store_timings(f"key_{operation}")


def watch_key_cache(cache: Any) -> None:
    """Count ``cache``'s hits and misses in the published recorder, now and in any
    published later (an API-key factory's cache, at its construction)."""
    _key_caches.add(cache)
    _published.watch_key_cache(cache)
"""The shared recorder of servers without metrics."""


# -- rendering ---------------------------------------------------------------------------
def _histogram(name: str, documentation: str, label: str, series: dict) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, documentation, labels=[label])
    for key in sorted(series):
        timings = series[key]
        cumulative = 0
        buckets = []
        for bound, count in zip((*timings.bounds, float("inf")), timings.counts):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        family.add_metric([key], buckets, timings.total)
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def families(snapshot: Snapshot) -> Iterator[Any]:
    """The ``prometheus_client`` metric families of ``snapshot``, names as documented."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def counter(name: str, documentation: str, label: Optional[str], values: Any) -> Any:
        if label is None:
            family = CounterMetricFamily(name, documentation, value=values)
        else:
            family = CounterMetricFamily(name, documentation, labels=[label])
            for key in sorted(values):
                family.add_metric([key], values[key])
        return family

    yield counter(
        "asyncapy_requests", "Requests decoded and dispatched, by encoding.", "encoding",
        snapshot.requests,
    )
    yield counter(
        "asyncapy_error_replies", "Error replies sent, by error code.", "code",
        snapshot.error_replies,
    )
    yield GaugeMetricFamily("asyncapy_sessions", "Sessions live now.", value=snapshot.sessions)
    yield counter(
        "asyncapy_connections", "Connections accepted, by what became of them.", "outcome",
        snapshot.connections,
    )
    yield _histogram(
        "asyncapy_handler_duration_seconds", "Time one handler took for one packet.",
        "handler", snapshot.handlers,
    )
    yield _histogram(
        "asyncapy_store_duration_seconds", "Time one call of the session or key store took.",
        "operation", snapshot.store,
    )
    yield counter(
        "asyncapy_store_errors", "Store calls that failed (unreachable or broken store).",
        "operation", snapshot.store_errors,
    )
    yield counter(
        "asyncapy_rate_limited", "Packets refused ERR_RATE_LIMITED, by the limit that refused them.",
        "limit", snapshot.rate_limited,
    )
    yield counter(
        "asyncapy_key_cache_hits", "API-key look-ups answered by the local cache.", None,
        snapshot.cache_hits,
    )
    yield counter(
        "asyncapy_key_cache_misses", "API-key look-ups that went to the key store.", None,
        snapshot.cache_misses,
    )
    yield counter("asyncapy_received_bytes", "Bytes read from clients.", None, snapshot.received)
    yield counter("asyncapy_sent_bytes", "Bytes written to clients.", None, snapshot.sent)
    build = GaugeMetricFamily(
        "asyncapy_build_info", "Always 1: the AsyncAPY and Python versions running.",
        labels=["version", "python"],
    )
    build.add_metric([_version(), platform.python_version()], 1)
    yield build
    if snapshot.processes:
        for name, (kind, documentation) in PROCESS_METRICS.items():
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, documentation + " By process.", labels=["process"])
            for label in sorted(snapshot.processes):
                value = snapshot.processes[label].get(name)
                if value is not None:
                    family.add_metric([label], value)
            yield family


def _version() -> str:
    from asyncapy import __version__

    return __version__


class SnapshotCollector:
    """A ``prometheus_client`` collector rendering the snapshot ``source()`` returns.

    Register it in a ``CollectorRegistry`` (or pass it where a registry is expected:
    ``generate_latest`` only calls :meth:`collect`). ``source`` is called once per
    collection, in the thread that renders.
    """

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        """The metric families of a fresh snapshot."""
        return families(self.source())

    def describe(self) -> list:
        """Nothing: the registry must not collect at registration (the source may
        only be readable from the event loop)."""
        return []
