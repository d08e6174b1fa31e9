"""A scrape right after start: every labelled series docs/operations.md promises is
there at 0 (``asyncapy_store_errors_total`` included), with ``asyncapy_build_info``;
with ``--workers``, ``process_*`` of the supervisor and of each live worker, labelled
``process``. Real servers on loopback, scraped over HTTP, parsed by
prometheus_client's own parser."""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import trio
from prometheus_client.parser import text_string_to_metric_families

from asyncapy import Client, Packet, Server, __version__
from asyncapy.domain.errors import ALL_CODES
from asyncapy.metrics import ENCODINGS, OUTCOMES, PROCESS_METRICS, SESSION_OPERATIONS
from tests.conftest import serving
from tests.e2e.processes import WORKER_SERVING, Running

APP = "tests.e2e.workers_app:app"
METRICS = re.compile(r"Metrics of every worker on http://127\.0\.0\.1:(\d+)")


def _fetch(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _promised_at_zero(samples: dict) -> None:
    """Every labelled series of the docs' table is there, at 0."""
    for encoding in ENCODINGS:
        assert samples[("asyncapy_requests_total", (("encoding", encoding),))] == 0
    for code in ALL_CODES:
        assert samples[("asyncapy_error_replies_total", (("code", code),))] == 0
    for outcome in OUTCOMES:
        assert samples[("asyncapy_connections_total", (("outcome", outcome),))] == 0
    for operation in SESSION_OPERATIONS:
        assert samples[("asyncapy_store_errors_total", (("operation", operation),))] == 0
    for name in ("asyncapy_sessions", "asyncapy_key_cache_hits_total", "asyncapy_key_cache_misses_total",
                 "asyncapy_received_bytes_total", "asyncapy_sent_bytes_total"):
        assert samples[(name, ())] == 0
    build = (("python", platform.python_version()), ("version", __version__))
    assert samples[("asyncapy_build_info", build)] == 1


async def test_a_scrape_right_after_start_has_every_promised_series_at_0():
    server = Server(addr="127.0.0.1", port=0, timeout=5, metrics_port=0)

    @server.add_handler()
    async def echo(client: Client, packet: Packet) -> None:
        await client.send(packet)

    async with serving(server):
        port = server.probes.addresses[0][1]
        samples = await trio.to_thread.run_sync(_fetch, port)
    _promised_at_zero(samples)
    # One process: its own process_* metrics, unlabelled, from prometheus_client.
    assert ("process_cpu_seconds_total", ()) in samples
    assert ("process_resident_memory_bytes", ()) in samples


def _wait(port: int, check, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = _fetch(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def _processes(samples: dict, name: str = "process_resident_memory_bytes") -> set:
    return {dict(labels)["process"] for (n, labels), _ in samples.items() if n == name}


def test_workers_scrape_has_promised_series_and_process_metrics_of_each_live_process():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    with Running.asyncapy(
        "run", APP, "--port", "0", "--workers", "2", "--metrics-port", str(metrics_port)
    ) as run:
        run.wait_for(METRICS)
        # Right after start, before any worker published: the series are there.
        _promised_at_zero(_fetch(metrics_port))
        run.serving(2)
        everyone = {"supervisor", "worker-1", "worker-2"}
        samples = _wait(metrics_port, lambda s: _processes(s) == everyone)
        _promised_at_zero(samples)
        for name, (kind, _) in PROCESS_METRICS.items():
            rendered = f"{name}_total" if kind == "counter" else name
            assert _processes(samples, rendered) == everyone, (name, samples)
        supervisor = (("process", "supervisor"),)
        assert samples[("process_start_time_seconds", supervisor)] > 0
        assert samples[("process_resident_memory_bytes", (("process", "worker-1"),))] > 0
        # The series are labelled, not summed: the plain process_* of one process are gone.
        assert ("process_cpu_seconds_total", ()) not in samples

        # A killed worker's slot comes back (a new process) under the same label.
        slot_1 = [int(m.group(2)) for m in run.matches(WORKER_SERVING) if m.group(1) == "1"][0]
        start = samples[("process_start_time_seconds", (("process", "worker-1"),))]
        os.kill(slot_1, signal.SIGKILL)
        run.wait_for(WORKER_SERVING, count=3, timeout=15)
        key = ("process_start_time_seconds", (("process", "worker-1"),))
        samples = _wait(metrics_port, lambda s: s.get(key, start) > start)
        assert samples[key] > start and _processes(samples) == everyone
        assert run.stop() == 0, run.output
