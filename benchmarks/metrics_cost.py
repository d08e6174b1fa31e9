"""What the metrics cost a packet, hook by hook, in nanoseconds (run by hand).

The budget: a small JSON request costs the server about 24 µs of CPU (see
docs/performance.md), and metrics on must keep at least 0.9x, aiming at 0.97x, of
the rate with them off: about 0.7 µs a packet for everything the session loop and the
wrappers add. This measures each hook alone, under no event loop, so that a change
that makes one dearer shows up here before it shows in ``make bench``. The end-to-end
comparison (the same server with and without ``metrics_port``, in the same run) is
the ``metrics on`` server of ``benchmarks/run.py`` once the server calls the hooks.

    python -m benchmarks.metrics_cost
"""

from __future__ import annotations

import timeit

import trio

from asyncapy.metered import metered_handler
from asyncapy.metrics import Recorder


class _Client:
    encoding = "json"


async def _handler(client, packet):
    return None


def _per_call(statement, setup_globals, number=1_000_000) -> float:
    timer = timeit.Timer(statement, globals=setup_globals)
    best = min(timer.repeat(repeat=5, number=number))
    return best / number * 1e9


def main() -> None:
    recorder = Recorder()
    meter = recorder.session_started(_Client())
    data = b"x" * 60
    metered = metered_handler(_handler, "bench", recorder)

    def drive(function, rounds=200_000):
        async def run():
            for _ in range(rounds):
                await function(None, None)

        return run

    rows = [
        ("meter.requests += 1 (per request)", _per_call("meter.requests += 1", {"meter": meter})),
        ("meter.received += len(data) (per read)",
         _per_call("meter.received += len(data)", {"meter": meter, "data": data})),
        ("meter.sent += len(data) (per write)",
         _per_call("meter.sent += len(data)", {"meter": meter, "data": data})),
    ]
    plain = min(timeit.repeat(lambda: trio.run(drive(_handler)), number=1, repeat=3)) / 200_000
    timed = min(timeit.repeat(lambda: trio.run(drive(metered)), number=1, repeat=3)) / 200_000
    rows.append(("metered handler, over a plain one (per handler run)", (timed - plain) * 1e9))
    snapshot_cost = _per_call("recorder.snapshot()", {"recorder": recorder}, number=20_000)
    total = sum(cost for _, cost in rows)
    print(f"{'hook':<58} ns")
    for name, cost in rows:
        print(f"{name:<58} {cost:6.0f}")
    print(f"{'per packet, all of the above':<58} {total:6.0f}"
          f"   ({total / 24_000:.1%} of a 24 µs request)")
    print(f"{'recorder.snapshot() (per scrape, 1 live session)':<58} {snapshot_cost:6.0f}")


if __name__ == "__main__":
    main()
