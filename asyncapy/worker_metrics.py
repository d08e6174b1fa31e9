"""One scrape for all the workers of ``asyncapy run --workers N``.

Each worker is a process of its own with its own counts, and the kernel hands a new
connection to whichever worker accepts first: a scraper asking one of them would see
a random share. So the workers do not serve the metrics port; the supervisor does,
with the sum of every worker's counts.

How the counts travel
    The supervisor makes a directory (:data:`DIRECTORY_ENV` tells each worker where)
    and each worker writes its :class:`~asyncapy.metrics.Snapshot` there as
    ``asyncapy-PID.json`` every :data:`PUBLISH_INTERVAL` seconds and once more when it
    stops (:func:`publish`), writing a temporary file and renaming it, so a reader
    never sees half a file. The file is written by a worker thread: a slow disk never
    blocks the worker's loop. At a scrape the supervisor reads the files
    (:class:`WorkersExposition`) and sums them exactly: counters and histograms over
    every worker that ever ran, ``asyncapy_sessions`` over the live ones. When a
    worker exits, the supervisor folds its last file into the *retired* totals and
    deletes it (:meth:`WorkersExposition.retire`), so a restarted worker (a new pid)
    never makes a counter go down. What a worker counted after its last write and
    before a SIGKILL is lost: at most :data:`PUBLISH_INTERVAL` seconds of it.

Process metrics
    Each worker adds its own ``process_*`` values (CPU seconds, memory, open files,
    start time: :func:`~asyncapy.metrics.process_stats`) to its snapshot, under the
    label ``worker-N`` (its slot); the supervisor adds its own as ``supervisor``. The
    scrape has each ``process_*`` family once, one series per live process, labelled
    ``process``: summing them is the whole server's (``sum(process_resident_memory_bytes)``).
    A worker that exited leaves no process series behind. ``python_*`` metrics are not
    exported with ``--workers``.

The application's own metrics
    The same directory is ``PROMETHEUS_MULTIPROC_DIR`` for the workers (unless it
    was set already), which switches ``prometheus_client`` in them to its multiprocess
    mode: metrics an application defines with ``prometheus_client`` are summed by the
    supervisor too (``prometheus_client.multiprocess.MultiProcessCollector``).
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Optional

import trio

from .metrics import Recorder, Snapshot, SnapshotCollector, process_stats
from .probes import CombinedRegistry, render_text

__all__ = [
    "DIRECTORY_ENV",
    "PUBLISH_INTERVAL",
    "worker_directory",
    "snapshot_path",
    "write_snapshot",
    "publish",
    "WorkersExposition",
    "MetricsDirectory",
]

logger: logging.Logger = logging.getLogger("asyncapy.workers")

DIRECTORY_ENV = "ASYNCAPY_METRICS_DIR"
"""The environment variable that tells a worker where to write its snapshots; set by
the supervisor only when it serves metrics. A server that finds it set publishes
there and serves no metrics port of its own."""

PUBLISH_INTERVAL = 1.0
"""Seconds between two snapshots of a worker: how stale a scrape can be."""


def worker_directory() -> Optional[str]:
    """Where this process (a worker) publishes its snapshots, or None."""
    return os.environ.get(DIRECTORY_ENV) or None


def snapshot_path(directory: str, pid: int) -> str:
    """The snapshot file of worker ``pid``."""
    return os.path.join(directory, f"asyncapy-{pid}.json")


def write_snapshot(
    directory: str, pid: int, snapshot: Snapshot, *, label: Optional[str] = None
) -> None:
    """Write ``snapshot`` as worker ``pid``'s file, atomically (blocking); with a
    ``label`` (``worker-2``), this process's ``process_*`` values under it too."""
    if label is not None:
        snapshot.processes[label] = process_stats()
    path = snapshot_path(directory, pid)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(snapshot.to_dict(), file)
    os.replace(temporary, path)


async def publish(
    recorder: Recorder,
    directory: str,
    interval: float = PUBLISH_INTERVAL,
    *,
    label: Optional[str] = None,
) -> None:
    """Write ``recorder``'s snapshot to ``directory`` every ``interval`` seconds until
    cancelled, and once more then (shielded): the worker's last counts reach the
    supervisor when it stops gracefully. ``label`` (``worker-2``) names this process
    in the ``process_*`` series it adds; None adds none."""
    pid = os.getpid()
    try:
        while True:
            await _publish_once(recorder, directory, pid, label)
            await trio.sleep(interval)
    finally:
        with trio.CancelScope(shield=True):
            await _publish_once(recorder, directory, pid, label)


async def _publish_once(recorder: Recorder, directory: str, pid: int, label: Optional[str]) -> None:
    snapshot = recorder.snapshot()  # on the loop: the live meters change there
    try:
        await trio.to_thread.run_sync(
            functools.partial(write_snapshot, directory, pid, snapshot, label=label)
        )
    except OSError as exc:
        logger.warning("Could not write this worker's metrics to %s: %s", directory, exc)


def _read_snapshot(path: str) -> Optional[Snapshot]:
    try:
        with open(path, encoding="utf-8") as file:
            return Snapshot.from_dict(json.load(file))
    except FileNotFoundError:
        return None  # retired between the listing and the read
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring the unreadable metrics snapshot %s: %s", path, exc)
        return None


def _pid_of(path: str) -> Optional[int]:
    name = os.path.basename(path)[len("asyncapy-"):-len(".json")]
    return int(name) if name.isdigit() else None


class MetricsDirectory:
    """The supervisor's directory for the workers' snapshots: made by :meth:`create`
    (or the ``PROMETHEUS_MULTIPROC_DIR`` already set, which is then kept), removed by
    :meth:`remove` if it made it. :meth:`environment` is what each worker gets."""

    def __init__(self, path: str, owned: bool) -> None:
        self.path = path
        """The directory."""
        self.owned = owned
        """True if it was made here (and is removed at the end)."""

    @classmethod
    def create(cls) -> "MetricsDirectory":
        """A fresh directory, or the application's ``PROMETHEUS_MULTIPROC_DIR``."""
        given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if given:
            os.makedirs(given, exist_ok=True)
            for stale in glob.glob(os.path.join(given, "asyncapy-*.json")):
                os.remove(stale)  # from an earlier run: not this run's counts
            return cls(given, owned=False)
        return cls(tempfile.mkdtemp(prefix="asyncapy-metrics-"), owned=True)

    def environment(self) -> dict:
        """The environment of a worker: this one's, plus where to publish."""
        return {
            **os.environ,
            DIRECTORY_ENV: self.path,
            "PROMETHEUS_MULTIPROC_DIR": os.environ.get("PROMETHEUS_MULTIPROC_DIR") or self.path,
        }

    def remove(self) -> None:
        """Delete the directory if it was made here."""
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


class WorkersExposition:
    """``/metrics`` of the supervisor: the sum of every worker's snapshot (see the
    module's docstring), then the application's multiprocess metrics.

    ``live_pids()`` is called on the event loop at each scrape: the workers running
    now, whose sessions count in the gauge.
    """

    def __init__(self, directory: str, live_pids: Callable[[], Iterable[int]]) -> None:
        self.directory = directory
        """Where the workers' snapshots are."""
        self.live_pids = live_pids
        """The pids of the running workers."""
        self._retired = Snapshot()
        # One thread at a time reads or changes the files and the retired totals.
        self._limiter = trio.CapacityLimiter(1)

    async def render(self, accept: str) -> tuple[bytes, str]:
        """Sum the snapshots and render them (in a worker thread)."""
        live = frozenset(self.live_pids())
        return await trio.to_thread.run_sync(self._render, live, accept, limiter=self._limiter)

    def total(self, live: frozenset) -> Snapshot:
        """The sum of the retired totals and every snapshot file (blocking)."""
        total = Snapshot()
        total.merge(self._retired, gauges=False)
        for path in sorted(glob.glob(os.path.join(self.directory, "asyncapy-*.json"))):
            snapshot = _read_snapshot(path)
            if snapshot is not None:
                total.merge(snapshot, gauges=_pid_of(path) in live)
        return total

    def _render(self, live: frozenset, accept: str) -> tuple[bytes, str]:
        total = self.total(live)
        total.processes["supervisor"] = process_stats()
        collectors: list[Any] = [SnapshotCollector(lambda: total)]
        from prometheus_client.multiprocess import MultiProcessCollector

        collectors.append(MultiProcessCollector(None, path=self.directory))
        return render_text(CombinedRegistry(collectors), accept)

    async def retire(self, pid: int) -> None:
        """Worker ``pid`` has exited: fold its last snapshot into the retired totals
        (its counts stay, its sessions go) and delete its file."""
        await trio.to_thread.run_sync(self._retire, pid, limiter=self._limiter)

    def _retire(self, pid: int) -> None:
        path = snapshot_path(self.directory, pid)
        snapshot = _read_snapshot(path)
        if snapshot is not None:
            self._retired.merge(snapshot, gauges=False)
        for leftover in (path, f"{path}.tmp"):
            try:
                os.remove(leftover)
            except FileNotFoundError:
                pass
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.directory)
        except OSError:
            pass
