"""The recorder, its snapshots, the metered stores and handlers, the JSON log format
and the probe endpoint's request-head reader, driven directly."""

from __future__ import annotations

import io
import json
import logging

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from asyncapy.adapters.memory import MemoryKeyStore, MemorySessionStore
from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.httphead import MAX_HEAD, BadRequest, head_end, parse_head
from asyncapy.domain.ports import SessionRecord, SessionStore, run_to_completion
from asyncapy.logs import JsonFormatter, configure_logging, log_context, make_formatter
from asyncapy.metered import (
    MeteredKeyStore,
    MeteredSessionStore,
    metered_dispatcher,
    metered_key_store,
    metered_session_store,
)
from asyncapy.metrics import HANDLER_BUCKETS, NULL_RECORDER, Recorder, Snapshot, Timings
from asyncapy.testing.contracts import KeyStoreContract, SessionStoreContract


class _Client:
    def __init__(self, encoding="json"):
        self.encoding = encoding


# -- recorder ---------------------------------------------------------------------------
def test_live_and_ended_sessions_are_both_counted():
    recorder = Recorder()
    live = recorder.session_started(_Client("ziproto"))
    live.requests += 2
    live.received += 10
    ended = recorder.session_started(_Client("json"))
    ended.requests += 3
    ended.sent += 7
    recorder.session_ended(ended)
    snap = recorder.snapshot()
    assert snap.requests == {"json": 3, "ziproto": 2}
    assert (snap.sessions, snap.received, snap.sent) == (1, 10, 7)
    live.requests += 1  # a snapshot does not move afterwards
    assert snap.requests["ziproto"] == 2
    assert recorder.snapshot().requests["ziproto"] == 3


def test_the_null_recorder_counts_nothing_and_wraps_nothing():
    meter = NULL_RECORDER.session_started(_Client())
    meter.requests += 5
    NULL_RECORDER.session_ended(meter)
    NULL_RECORDER.connection("admitted")
    NULL_RECORDER.error_reply("ERR_INTERNAL")
    NULL_RECORDER.key_cache.hit()
    snap = NULL_RECORDER.snapshot()
    assert snap.requests == {"json": 0, "ziproto": 0} and snap.connections["admitted"] == 0
    assert snap.cache_hits == 0
    store = MemorySessionStore()
    assert metered_session_store(store, NULL_RECORDER) is store


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_timings_count_each_observation_in_its_le_bucket(values):
    timings = Timings(HANDLER_BUCKETS)
    for value in values:
        timings.observe(value)
    cumulative = 0
    for bound, count in zip(HANDLER_BUCKETS, timings.counts):
        cumulative += count
        assert cumulative == sum(1 for v in values if v <= bound)
    assert sum(timings.counts) == len(values)
    assert timings.total == pytest.approx(sum(values))


def test_a_snapshot_round_trips_through_its_dict_and_merges():
    recorder = Recorder()
    recorder.session_started(_Client()).requests += 4
    recorder.handler_timings("h").observe(0.003)
    recorder.store_timings("admit").observe(0.0002)
    recorder.store_error("admit")
    snap = recorder.snapshot()
    again = Snapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert again.to_dict() == snap.to_dict()
    again.merge(snap, gauges=False)
    assert again.requests["json"] == 8 and again.sessions == 1
    assert sum(again.handlers["h"].counts) == 2 and _nonzero(again.store_errors) == {"admit": 2}
    with pytest.raises(ValueError):
        Snapshot.from_dict({"requests": {}})


# -- metered stores ---------------------------------------------------------------------
class TestMeteredSessionStoreContract(SessionStoreContract):
    @pytest.fixture
    def store(self):
        return MeteredSessionStore(MemorySessionStore(), Recorder())


class TestMeteredKeyStoreContract(KeyStoreContract):
    @pytest.fixture
    def store(self):
        return MeteredKeyStore(MemoryKeyStore(), Recorder())


async def test_store_calls_are_timed_and_failures_counted():
    class Down(SessionStore):
        async def admit(self, record, limit):
            raise StoreUnavailable("connection refused")

        async def release(self, record):
            return None

        async def sessions(self, address):
            return []

    recorder = Recorder()
    store = metered_session_store(Down(), recorder)
    assert metered_session_store(store, recorder) is store  # never twice
    with pytest.raises(StoreUnavailable):
        await store.admit(SessionRecord("s", "10.0.0.1", 0.0), 1)
    await store.release(SessionRecord("s", "10.0.0.1", 0.0))
    snap = recorder.snapshot()
    assert sum(snap.store["admit"].counts) == 1 and sum(snap.store["release"].counts) == 1
    assert _nonzero(snap.store_errors) == {"admit": 1}


def test_an_unknown_key_is_an_answer_not_a_store_error():
    recorder = Recorder()
    keys = metered_key_store(MemoryKeyStore(), recorder)
    run_to_completion(keys.put("k", {"u": 1}))
    assert run_to_completion(keys.get("k")) == {"u": 1}
    with pytest.raises(KeyError):
        run_to_completion(keys.get("missing"))
    snap = recorder.snapshot()
    assert sum(snap.store["key_get"].counts) == 2 and _nonzero(snap.store_errors) == {}
    assert repr(keys) == repr(keys.inner)


async def test_a_metered_dispatcher_keeps_order_filters_and_names():
    from asyncapy.domain.dispatch import Dispatcher, Handler

    seen = []

    class Never:
        def check(self, client, packet):
            return False

    async def first(client, packet):
        seen.append("first")

    async def skipped(client, packet):
        seen.append("skipped")

    async def failing(client, packet):
        raise RuntimeError("boom")

    dispatcher = Dispatcher()
    dispatcher.register(Handler(skipped, [Never()]), -1)
    dispatcher.register(Handler(first), -1)
    dispatcher.register(Handler(failing), 0)
    recorder = Recorder()
    metered = metered_dispatcher(dispatcher, recorder)
    assert [[h.name for h in hs] for _, hs in metered.groups] == [
        [h.name for h in hs] for _, hs in dispatcher.groups
    ]

    class Client:
        closed = False
        handler = None

    from asyncapy.domain.dispatch import HandlerFailed

    with pytest.raises(HandlerFailed):
        await metered.dispatch(Client(), {})
    assert seen == ["first"]
    snap = recorder.snapshot()
    names = {name.rsplit(".", 1)[1]: sum(t.counts) for name, t in snap.handlers.items()}
    assert names == {"first": 1, "failing": 1, "skipped": 0}
    assert metered_dispatcher(dispatcher, NULL_RECORDER) is dispatcher
    again = metered_dispatcher(metered, recorder)  # handlers already metered stay as they are
    assert [h.function for _, hs in again.groups for h in hs] == [
        h.function for _, hs in metered.groups for h in hs
    ]


# -- JSON logs --------------------------------------------------------------------------
def _record(message="hello %s", args=("world",), **extra):
    record = logging.LogRecord("asyncapy.server", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_json_line_has_the_fields_and_the_context():
    formatter = JsonFormatter()
    entry = json.loads(formatter.format(_record()))
    assert entry["level"] == "WARNING" and entry["logger"] == "asyncapy.server"
    assert entry["message"] == "hello world" and entry["time"].endswith("Z")
    assert "session_id" not in entry

    async def in_a_session():
        log_context("abc-123", "203.0.113.7")
        return json.loads(formatter.format(_record(error_code="ERR_TIMED_OUT")))

    entry = trio.run(in_a_session)
    assert entry["session_id"] == "abc-123" and entry["client_address"] == "203.0.113.7"
    assert entry["error_code"] == "ERR_TIMED_OUT"
    # The context was the session task's: gone outside it.
    assert "session_id" not in json.loads(formatter.format(_record()))
    explicit = json.loads(formatter.format(_record(session_id="s-1", client_address="::1")))
    assert (explicit["session_id"], explicit["client_address"]) == ("s-1", "::1")


def test_a_traceback_and_a_multiline_message_stay_on_one_line():
    formatter = JsonFormatter()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        record = _record("two\nlines", ())
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines" and "ValueError: bad" in entry["exception"]


def test_configure_logging_installs_the_chosen_format(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging(logging.INFO, log_format="json")
    (handler,) = root.handlers
    assert isinstance(handler.formatter, JsonFormatter)
    stream = io.StringIO()
    handler.setStream(stream)
    logging.getLogger("asyncapy.test").info("one %d", 1)
    assert json.loads(stream.getvalue())["message"] == "one 1"
    with pytest.raises(ValueError, match="log_format"):
        make_formatter("yaml", "%(message)s", "%H")


# -- the request head of the probe endpoint ---------------------------------------------
def test_a_request_head_is_read():
    data = b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/plain\r\n\r\nrest"
    end = head_end(data)
    head = parse_head(data[:end])
    assert (head.method, head.path, head.version) == ("GET", "/metrics", "HTTP/1.1")
    assert head.header("ACCEPT") == "text/plain" and head.header("none", "d") == "d"
    assert parse_head(b"GET http://h:9/readyz HTTP/1.0\r\n\r\n").path == "/readyz"
    assert head_end(b"GET / HTTP/1.1\r\nHost") == -1


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\n\r\n", 400),
        (b"G\x00T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / FTP/1.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNo colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad\x01: x\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 65 + b"\r\n", 431),
    ],
)
def test_bad_heads_are_refused_with_their_status(head, status):
    with pytest.raises(BadRequest) as caught:
        parse_head(head[: head_end(head)])
    assert caught.value.status == status


def test_a_head_without_end_is_refused_past_the_limit():
    assert head_end(b"a" * MAX_HEAD) == -1
    with pytest.raises(BadRequest) as caught:
        head_end(b"a" * (MAX_HEAD + 1))
    assert caught.value.status == 431


@given(st.binary(max_size=300))
def test_any_bytes_give_a_head_or_bad_request(data):
    try:
        end = head_end(data)
        if end >= 0:
            parse_head(data[:end])
    except BadRequest:
        pass


# -- settings ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [("log_format", "yaml"), ("log_format", None), ("metrics_port", 65536), ("metrics_port", -1),
     ("metrics_port", "9100"), ("metrics_port", 9100.0), ("metrics_host", ""), ("metrics_host", 7)],
)
def test_bad_operations_settings_name_the_setting(key, value):
    from asyncapy.config import ConfigError, validate

    with pytest.raises(ConfigError, match=f"invalid {key}") as caught:
        validate(key, value)
    assert caught.value.key == key


def test_operations_settings_from_an_ini_file(tmp_path):
    from asyncapy.config import ConfigError, load_config

    path = tmp_path / "server.ini"
    path.write_text("[AsyncAPY]\nlog_format = json\nmetrics_port = 9100\nmetrics_host = 0.0.0.0\n")
    assert load_config(str(path)) == {"log_format": "json", "metrics_port": 9100, "metrics_host": "0.0.0.0"}
    path.write_text("[AsyncAPY]\nmetrics_port =\n")
    assert load_config(str(path)) == {"metrics_port": None}
    path.write_text("[AsyncAPY]\nmetrics_port = ninety\n")
    with pytest.raises(ConfigError, match="invalid metrics_port"):
        load_config(str(path))


def _nonzero(counts: dict) -> dict:
    """The series of ``counts`` that counted something (every one exists from the start)."""
    return {key: value for key, value in counts.items() if value}


def test_every_store_error_series_exists_at_0_from_the_start():
    from asyncapy.metrics import SESSION_OPERATIONS, families

    recorder = Recorder()
    assert recorder.snapshot().store_errors == {op: 0 for op in SESSION_OPERATIONS}
    recorder.store_timings("key_get")  # a key store metered later: its series appears at 0
    assert recorder.snapshot().store_errors["key_get"] == 0
    rendered = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families(Snapshot())
        for sample in family.samples
    }
    for op in SESSION_OPERATIONS:
        assert rendered[("asyncapy_store_errors_total", (("operation", op),))] == 0


def test_build_info_names_the_version_and_python():
    import platform

    from asyncapy import __version__
    from asyncapy.metrics import families

    (build,) = [f for f in families(Snapshot()) if f.name == "asyncapy_build_info"]
    (sample,) = build.samples
    assert sample.labels == {"version": __version__, "python": platform.python_version()}
    assert sample.value == 1


def test_process_series_are_labelled_and_only_live_ones_merge():
    from asyncapy.metrics import families

    live, gone = Snapshot(), Snapshot()
    live.processes["worker-1"] = {"process_cpu_seconds": 1.5, "process_open_fds": 9.0}
    gone.processes["worker-2"] = {"process_cpu_seconds": 7.0}
    total = Snapshot()
    total.merge(Snapshot.from_dict(live.to_dict()))
    total.merge(gone, gauges=False)  # an exited worker: no process series
    assert set(total.processes) == {"worker-1"}
    samples = {(s.name, s.labels["process"]): s.value for f in families(total) for s in f.samples if s.name.startswith("process_")}
    assert samples == {("process_cpu_seconds_total", "worker-1"): 1.5, ("process_open_fds", "worker-1"): 9.0}


# -- key stores metered when their factory is made -------------------------------------------
def test_a_factorys_store_counts_into_whichever_server_counts(tmp_path):
    """The factory meters its store when it is made; nothing is rewired when a server
    starts: calls count into the published recorder, before or after the factory, and
    into nothing once that server stopped."""
    from asyncapy import APIKeyFactory, metrics

    before = APIKeyFactory(store=f"sqlite:///{tmp_path / 'before.db'}")
    recorder = Recorder()
    metrics.publish(recorder)
    try:
        after = APIKeyFactory(store=f"sqlite:///{tmp_path / 'after.db'}")
        snapshot = recorder.snapshot()
        assert snapshot.store_errors["key_get"] == 0  # its series exist from the start
        assert sum(snapshot.store["key_put"].counts) == 0
        before.issue({"u": 1})
        key = after.issue({"u": 2})
        assert after.get(key) == {"u": 2}
        counted = recorder.snapshot()
        assert sum(counted.store["key_put"].counts) == 2 and sum(counted.store["key_get"].counts) == 1
    finally:
        metrics.unpublish(recorder)
    after.issue({"u": 3})  # no server counts: nothing observed
    assert sum(recorder.snapshot().store["key_put"].counts) == 2
    assert metrics.published() is NULL_RECORDER
    assert len(after.store) == 2  # the metered store is still the file's
