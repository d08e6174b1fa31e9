"""``--workers``: a worker that crashed after it served is restarted for as long as the
supervisor runs, while the others go on serving; only a worker that cannot start
makes the supervisor give up. Every worker's log lines name the worker.

Real processes throughout (``tests/e2e/processes.py``): the supervisor and its
workers, killed with SIGKILL from outside as the OOM killer would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from .processes import Running, alive, ask

APP = "tests.e2e.workers_app:app"
CRASHING = "tests.e2e.workers_app:crashing"
SLOT = re.compile(r"Worker (\d) \(pid (\d+)\) serving")


def _serving_pid(run: Running, slot: int, count: int, timeout: float = 30) -> int:
    """The pid of the ``count``-th worker of ``slot`` to say it serves (waiting for it)."""
    deadline = time.monotonic() + timeout
    while True:
        mine = [m for m in run.matches(SLOT) if int(m.group(1)) == slot]
        if len(mine) >= count:
            return int(mine[count - 1].group(2))
        if time.monotonic() > deadline or run.process.poll() is not None:
            pytest.fail(f"worker {slot} did not serve {count} time(s):\n{run.output}")
        time.sleep(0.05)


def test_a_worker_killed_six_times_after_serving_is_restarted_each_time(redis_url):
    """The issue's scenario: one slot killed six times, each time after it served.
    The supervisor never gives up, the healthy worker answers all along, and a
    SIGTERM at the end is still a clean stop (status 0)."""
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        port = run.serving(2)
        survivor = _serving_pid(run, 2, 1)
        for kill in range(1, 7):
            victim = _serving_pid(run, 1, kill)
            assert ask(port, {"before": kill})["pid"] in {victim, survivor}
            os.kill(victim, signal.SIGKILL)
            run.wait_for(re.compile(rf"\(pid {victim}\) was killed by SIGKILL: restarting it in [\d.]+s \(it had served"))
            # Meanwhile the healthy worker serves: every connection is answered.
            for n in range(3):
                assert ask(port, {"during": kill, "n": n})["pid"] != victim
            _serving_pid(run, 1, kill + 1)  # the slot is filled again
        assert alive(survivor)
        assert not run.matches(re.compile("giving up"))
        assert run.process.poll() is None, run.output
        newest = _serving_pid(run, 1, 7)
        seen = {ask(port, {"after": n})["pid"] for n in range(100)}
        assert survivor in seen
        assert seen <= {survivor, newest}
        assert run.stop() == 0, run.output
    delays = [float(m.group(1)) for m in run.matches(re.compile(r"restarting it in ([\d.]+)s"))]
    assert len(delays) == 6 and delays == sorted(delays) and delays[0] < delays[-1], delays  # backoff


def test_a_worker_that_cannot_start_makes_the_supervisor_exit_1_with_one_clear_line():
    with Running.asyncapy("run", CRASHING, "--port", "0", "--workers", "2") as run:
        status = run.finish(timeout=30)
    assert status == 1, run.output
    (give_up,) = [line for line in run.err if "giving up" in line]
    assert re.search(r"\[ERROR\] .*Worker \d \(pid \d+\) exited with status 1 before it served, "
                     r"3 times in a row: giving up", give_up), give_up
    assert "bad deployment" in give_up
    # Each worker's failure is logged too, every line labelled with its worker.
    failures = [line for line in run.err if re.match(r"worker \d \(pid \d+\) \| \[CRITICAL\] .*This worker failed: ", line)]
    assert len(failures) >= 3, run.output
    assert all(line.startswith("worker ") or line.startswith("[") for line in run.err), run.output


def test_every_worker_log_line_names_its_worker(redis_url):
    with Running.asyncapy("run", APP, "--port", "0", "--workers", "2", "--store", redis_url) as run:
        run.serving(2)
        pids = {int(m.group(1)): int(m.group(2)) for m in run.matches(SLOT)}
        assert run.stop() == 0, run.output
    for slot, pid in pids.items():
        mine = [line for line in run.err if line.startswith(f"worker {slot} (pid {pid}) | ")]
        assert any("AsyncAPY serving" in line or "shutting down" in line for line in mine), run.output
    # The supervisor's own lines are not labelled as a worker's.
    assert any(line.startswith("[INFO]") and "with 2 worker processes" in line for line in run.err)


def test_json_log_lines_carry_the_worker(redis_url):
    with Running.asyncapy(
        "run", APP, "--port", "0", "--workers", "2", "--store", redis_url, "--log-format", "json"
    ) as run:
        port = int(run.wait_for(re.compile(r'"message": "AsyncAPY serving on \S+:(\d+) '))[0].group(1))
        run.wait_for(re.compile(r'"message": "Worker \d \(pid \d+\) serving'), count=2)
        ask(port, {"hello": 1})
        assert run.stop() == 0, run.output
    records = [json.loads(line) for line in run.err if line.startswith("{")]
    workers = [r for r in records if "worker" in r]
    assert {r["worker"] for r in workers} == {1, 2}
    assert all(isinstance(r["worker_pid"], int) and r["worker_pid"] != run.process.pid for r in workers)
    assert any("worker" not in r and "with 2 worker processes" in r["message"] for r in records)
