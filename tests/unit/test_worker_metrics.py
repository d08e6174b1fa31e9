"""The supervisor's sum of its workers' snapshot files (asyncapy.worker_metrics), on
files written as workers write them: counters summed over every worker that ever ran,
the sessions gauge over the live ones, a retired worker's counts kept."""

from __future__ import annotations

import json
import os

import trio
from prometheus_client.parser import text_string_to_metric_families

from asyncapy.metrics import Recorder, Snapshot
from asyncapy.worker_metrics import (
    MetricsDirectory,
    WorkersExposition,
    publish,
    snapshot_path,
    write_snapshot,
)


class _Client:
    encoding = "json"


def _worker(requests: int, live_sessions: int, admit: float) -> Snapshot:
    recorder = Recorder()
    for _ in range(live_sessions):
        recorder.session_started(_Client()).requests += requests
    recorder.connection("admitted")
    recorder.store_timings("admit").observe(admit)
    recorder.error_reply("ERR_TIMED_OUT")
    return recorder.snapshot()


async def test_counters_summed_gauges_of_live_workers_only(tmp_path):
    write_snapshot(str(tmp_path), 101, _worker(requests=5, live_sessions=2, admit=0.001))
    write_snapshot(str(tmp_path), 102, _worker(requests=7, live_sessions=3, admit=0.2))
    write_snapshot(str(tmp_path), 103, _worker(requests=1, live_sessions=4, admit=0.001))
    exposition = WorkersExposition(str(tmp_path), lambda: [101, 102])  # 103 has exited
    total = exposition.total(frozenset({101, 102}))
    assert total.requests["json"] == 5 * 2 + 7 * 3 + 1 * 4
    assert total.sessions == 5
    assert total.connections["admitted"] == 3
    assert total.error_replies["ERR_TIMED_OUT"] == 3
    assert sum(total.store["admit"].counts) == 3

    body, content_type = await exposition.render("")
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("asyncapy_sessions", ())] == 5
    assert samples[("asyncapy_requests_total", (("encoding", "json"),))] == 35
    assert samples[("asyncapy_store_duration_seconds_bucket", (("le", "0.001"), ("operation", "admit")))] == 2
    assert samples[("asyncapy_store_duration_seconds_bucket", (("le", "+Inf"), ("operation", "admit")))] == 3


async def test_a_retired_worker_keeps_its_counts_and_loses_its_sessions(tmp_path):
    write_snapshot(str(tmp_path), 201, _worker(requests=4, live_sessions=1, admit=0.01))
    live = {201}
    exposition = WorkersExposition(str(tmp_path), lambda: live)
    before = exposition.total(frozenset(live))
    live.clear()
    await exposition.retire(201)
    assert not os.path.exists(snapshot_path(str(tmp_path), 201))  # noqa: ASYNC240 - a test's local file
    after = exposition.total(frozenset())
    assert after.requests == before.requests
    assert after.sessions == 0
    # A new worker, perhaps with the old pid: added to what the old one counted.
    write_snapshot(str(tmp_path), 201, _worker(requests=1, live_sessions=1, admit=0.01))
    assert exposition.total(frozenset({201})).requests["json"] == 5


async def test_unreadable_files_are_skipped(tmp_path):
    (tmp_path / "asyncapy-300.json").write_text("{not json")
    (tmp_path / "asyncapy-301.json").write_text(json.dumps({"requests": {}}))
    write_snapshot(str(tmp_path), 302, _worker(requests=2, live_sessions=1, admit=0.01))
    total = WorkersExposition(str(tmp_path), list).total(frozenset({302}))
    assert total.requests["json"] == 2


async def test_publish_writes_periodically_and_once_more_when_cancelled(tmp_path):
    recorder = Recorder()
    meter = recorder.session_started(_Client())
    with trio.move_on_after(0.25):
        await publish(recorder, str(tmp_path), interval=0.05)
    meter.requests += 9  # counted after the last periodic write...
    with trio.CancelScope() as scope:
        scope.cancel()
        await publish(recorder, str(tmp_path), interval=10)  # ...and written on the way out
    data = json.loads(open(snapshot_path(str(tmp_path), os.getpid())).read())  # noqa: ASYNC230 - a test's local file
    assert Snapshot.from_dict(data).requests["json"] == 9


def test_the_directory_is_made_and_removed_or_the_given_one_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    made = MetricsDirectory.create()
    assert os.path.isdir(made.path)
    environment = made.environment()
    assert environment["ASYNCAPY_METRICS_DIR"] == made.path
    assert environment["PROMETHEUS_MULTIPROC_DIR"] == made.path
    made.remove()
    assert not os.path.exists(made.path)

    given = tmp_path / "multiproc"
    given.mkdir()
    (given / "asyncapy-1.json").write_text("{}")  # an earlier run's
    (given / "counter_1.db").write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    kept = MetricsDirectory.create()
    assert kept.path == str(given) and not kept.owned
    assert sorted(os.listdir(given)) == ["counter_1.db"]
    kept.remove()
    assert os.path.isdir(given)
