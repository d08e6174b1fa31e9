"""Rate limits exact across processes: several OS processes hammer one key through
the Redis adapter (tests/integration/ratelimit_hammer.py) on a real redis-server and a
real Cluster for about 2 s.

Redis decides every call with its own clock, inside the window from the first call
sent to the last reply read (the processes share the wall clock of this machine), so
the allowed total is at most ``rate * window + burst + 1``; and since they ask far
faster than the rate, at least all but a few percent of that. Another key, hammered
by its own process at the same time, gets its own full allowance: one key's traffic
takes nothing from another's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.integration.processes import ROOT

RATE, BURST, SECONDS, PROCESSES = 200, 20, 2.0, 4


def run(url: str) -> tuple[list[dict], dict]:
    start = time.time() + 3.0  # time to import and connect
    def spawn(key: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.ratelimit_hammer", url, key, f"{RATE}/s", str(BURST), str(SECONDS), repr(start)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    crowd = [spawn("203.0.113.7") for _ in range(PROCESSES)]
    alone = spawn("198.51.100.9")
    results = []
    for process in crowd + [alone]:
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    return results[:-1], results[-1]


def check(results: list[dict]) -> None:
    window = max(r["last"] for r in results) - min(r["first"] for r in results)
    allowed = sum(r["allowed"] for r in results)
    tried = sum(r["tried"] for r in results)
    bound = RATE * window + BURST + 1
    print(f"{len(results)} process(es): {allowed} allowed of {tried} in {window:.3f} s; bound {bound:.1f}")
    assert tried > 2 * bound, "the processes did not ask faster than the rate: nothing was tested"
    assert allowed <= bound
    assert allowed >= 0.95 * (RATE * SECONDS + BURST + 1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("deployment", ["single node", "Cluster"])
def test_processes_hammering_one_key_get_the_rate_and_no_more(deployment, request):
    url = request.getfixturevalue("redis_url" if deployment == "single node" else "cluster_url")
    crowd, alone = run(url)
    check(crowd)
    check([alone])
