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
