"""The benchmark's servers must answer what the load generator expects, or it would
measure something else: the load generator counts a reply as whole once it has as
many bytes as the request (every server echoes)."""

import pytest

from benchmarks.bare_trio_echo import recode
from benchmarks.run import WORKLOADS


@pytest.mark.parametrize("title, connections, packet", WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_the_codec_echo_answers_each_workload_byte_for_byte(title, connections, packet):
    assert recode(bytearray(packet)) == packet
