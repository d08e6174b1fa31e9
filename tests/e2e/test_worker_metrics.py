"""``asyncapy run --workers N --metrics-port PORT``: one scrape of the supervisor gives
the sum of every worker's counts, parsed by prometheus_client's own parser; a worker
killed and restarted never makes a counter go down; the probes answer."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from asyncapy.client import Client
from tests.e2e.processes import WORKER_SERVING, Running

APP = "tests.e2e.workers_app:app"
METRICS = re.compile(r"Metrics of every worker on http://127\.0\.0\.1:(\d+)")


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _samples(port: int) -> dict:
    status, body = _get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _admits(samples: dict) -> float:
    return samples.get(
        ("asyncapy_store_duration_seconds_count", (("operation", "admit"),)), 0.0
    )


def _wait_for(port: int, check, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = _samples(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def _sessions(port: int, count: int) -> None:
    """``count`` sessions, one after the other, each answered (so admitted)."""
    for n in range(count):
        with Client(tls=False, timeout=5) as client:
            client.connect("127.0.0.1", port)
            assert "pid" in client.request({"n": n})


def test_one_scrape_sums_every_worker_and_survives_a_restart():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    with Running.asyncapy(
        "run", APP, "--port", "0", "--workers", "2", "--metrics-port", str(metrics_port)
    ) as run:
        port = run.serving(2)
        assert int(run.wait_for(METRICS)[0].group(1)) == metrics_port
        assert _get(metrics_port, "/healthz") == (200, b"ok\n")
        assert _get(metrics_port, "/readyz") == (200, b"ready\n")

        _sessions(port, 24)
        samples = _wait_for(metrics_port, lambda s: _admits(s) >= 24)
        assert _admits(samples) == 24  # summed exactly: not one worker's share
        releases = ("asyncapy_store_duration_seconds_count", (("operation", "release"),))
        samples = _wait_for(metrics_port, lambda s: s.get(releases) == 24)
        assert samples[releases] == 24
        assert samples[("asyncapy_sessions", ())] == 0

        # Both workers served some of them (the kernel spreads connections; over 24
        # sessions both get some): the sum is not one worker's count.
        workers = run.worker_pids()
        assert len(workers) == 2

        # SIGKILL one worker after its counts were published: its slot restarts with
        # a new pid, and the total never goes down.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        run.wait_for(WORKER_SERVING, count=3, timeout=15)
        assert _admits(_samples(metrics_port)) >= 24
        _sessions(port, 6)
        samples = _wait_for(metrics_port, lambda s: _admits(s) >= 30)
        assert _admits(samples) == 30

        assert run.stop() == 0, run.output
    assert "Traceback" not in run.output


def test_a_metrics_port_in_use_is_one_line_before_any_worker_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with Running.asyncapy(
            "run", APP, "--port", "0", "--workers", "2", "--metrics-port", str(port)
        ) as run:
            status = run.finish()
    assert status == 1, run.output
    assert f"asyncapy: [Errno 98] cannot listen on 127.0.0.1:{port} for metrics" in run.output
    assert not run.worker_pids()


def test_json_logs_from_the_supervisor_and_its_workers():
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--log-format", "json") as run:
        run.serving(2)
        assert run.stop() == 0, run.output
    entries = [json.loads(line) for line in run.err if line.startswith("{")]
    assert len(entries) == len([line for line in run.err if line.strip()]), run.output
    assert {entry["logger"] for entry in entries} >= {"asyncapy.workers", "asyncapy.server"}
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys()
