"""What an idle session costs in server memory: open N idle connections, read RSS.

Usage: ``python -m benchmarks.idle_memory [--connections 2000]``. Starts the AsyncAPY
echo example and the bare trio echo server as subprocesses, opens N connections to
each that send nothing (every one of them a live session for AsyncAPY, served by the
reactor and, as "no reactor", by a task each), and reports the
growth of each server's resident set size (VmRSS from /proc) per connection.
"""

from __future__ import annotations

import argparse
import resource
import socket
import time

from .run import SERVERS, server


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def measure(name: str, connections: int) -> tuple[int, int, float]:
    with server(name, SERVERS[name]) as (port, pid):
        time.sleep(0.5)
        before = rss_kib(pid)
        sockets = []
        for _ in range(connections):
            sockets.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(2.0)  # let the server accept and set up every session
        after = rss_kib(pid)
        for sock in sockets:
            sock.close()
        return before, after, (after - before) / connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.connections + 256)), hard))
    print(f"{args.connections} idle connections per server")
    print(f"  {'server':<10} {'RSS before':>11} {'RSS after':>10} {'KiB per connection':>19}")
    for name in ("bare trio", "asyncapy", "no reactor"):
        before, after, per = measure(name, args.connections)
        print(f"  {name:<10} {before:>8} KiB {after:>7} KiB {per:>19.1f}")


if __name__ == "__main__":
    main()
