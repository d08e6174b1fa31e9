"""The benchmark's servers must answer what the load generator expects, or it would
measure something else: the load generator counts a reply as whole once it has as
many bytes as the request (every server echoes)."""

import pytest

from benchmarks.bare_trio_echo import recode
from benchmarks.run import WORKLOADS


@pytest.mark.parametrize("title, connections, packet", WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_the_codec_echo_answers_each_workload_byte_for_byte(title, connections, packet):
    assert recode(bytearray(packet)) == packet


def test_the_load_generator_counts_replies_and_the_servers_cpu():
    """A short run against the real bare trio echo: replies are counted, and the
    server's CPU time per request is measured (Linux /proc)."""
    from benchmarks import loadgen
    from benchmarks.run import SERVERS, server

    with server("bare trio", SERVERS["bare trio"]) as (port, pid):
        result = loadgen.run(port, WORKLOADS[0][2], 2, 0.3, warmup=0.1, pid=pid)
    assert result.requests > 0 and result.errors == 0
    assert len(result.latencies) == result.requests
    assert 0 < result.cpu_per_request < 1e6


def test_slices_on_kept_connections_end_drained_and_combine():
    """benchmarks.run interleaves servers in short slices on connections kept open:
    each slice must end with no request in flight (or the next slice, or another
    server's, would be measured with this one's leftovers), and the slices of a round
    add up to one result."""
    import select

    from benchmarks import loadgen
    from benchmarks.run import SERVERS, server

    with server("bare trio", SERVERS["bare trio"]) as (port, pid):
        driver = loadgen.Driver(port, WORKLOADS[0][2], 3, pid=pid)
        try:
            driver.drive(0.0, warmup=0.05)
            slices = [driver.drive(0.1) for _ in range(3)]
            readable, _, _ = select.select([c.sock for c in driver.conns], [], [], 0.2)
            assert readable == []  # drained: no reply was left unread
        finally:
            driver.close()
    assert all(s.requests > 0 and s.errors == 0 for s in slices)
    total = loadgen.combine(slices)
    assert total.requests == sum(s.requests for s in slices)
    assert abs(total.seconds - 0.3) < 1e-6
    assert len(total.latencies) == total.requests
    assert 0 < total.cpu_per_request < 1e6
