"""A real server with ``metrics_port``: its own endpoint, scraped with a real HTTP client
(urllib, in a thread) after real traffic on loopback sockets, the text parsed by
prometheus_client's own parser, every count exact; ``/readyz`` of a single process
following a real redis-server stopped and started again; ``asyncapy run --log-format
json --metrics-port 0`` writing log lines that carry the session and the error code."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from asyncapy.adapters.key_cache import CachedKeyStore
from asyncapy.config import ConfigError
from asyncapy.filters import Filters
from asyncapy.metrics import NULL_RECORDER, Recorder
from asyncapy.server import Server
from asyncapy.util import APIKeyFactory
from tests.conftest import serving
from tests.e2e.processes import Running
from tests.e2e.wire import (
    JSON_CODE,
    Wire,
    frame,
    json_error,
    json_packet,
    zi_packet,
)
from tests.redis_server import RedisServer


def _fetch(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def _get(port: int, path: str) -> tuple[int, bytes]:
    return await trio.to_thread.run_sync(_fetch, port, path)


def _parse(body: bytes) -> dict:
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def _scrape(port: int) -> dict:
    status, body = await _get(port, "/metrics")
    assert status == 200
    return _parse(body)


def _metrics_port(server: Server) -> int:
    assert server.probes is not None
    return server.probes.addresses[0][1]


def _by(samples: dict, name: str, label: str) -> dict:
    """{label value: sample} of ``name`` (a metric with one label)."""
    return {labels[0][1]: v for (n, labels), v in samples.items() if n == name and labels and labels[0][0] == label}


class _Boom(Exception):
    pass


def _app(**kwargs) -> Server:
    server = Server(addr="127.0.0.1", port=0, timeout=5, metrics_port=0, **kwargs)

    @server.add_handler()
    async def answer(client, packet):
        if "boom" in packet:
            raise _Boom("a handler's bug")
        await client.send(packet)

    return server


async def test_a_scrape_counts_exactly_what_the_server_did():
    server = _app(session_limit=2)
    assert isinstance(server.metrics_recorder, Recorder) and server.metrics_recorder.enabled
    async with serving(server) as (host, port):
        metrics = _metrics_port(server)
        received = sent = 0
        first = await Wire.connect(host, port)
        second = await Wire.connect(host, port)
        for n in range(3):
            packet = json_packet({"n": n})
            await first.send(packet)
            reply = await first.read_packet()
            assert reply == packet
            received, sent = received + len(packet), sent + len(reply)
        packet = json_packet({"boom": 1})
        await first.send(packet)
        assert await first.read_packet() == json_error("ERR_INTERNAL")
        received, sent = received + len(packet), sent + len(json_error("ERR_INTERNAL"))
        packet = frame(b"[1]", JSON_CODE)  # a list, not an object: no request
        await first.send(packet)
        assert await first.read_packet() == json_error("ERR_REQUEST_MALFORMED")
        received += len(packet)
        sent += len(json_error("ERR_REQUEST_MALFORMED"))
        for n in range(2):
            packet = zi_packet({"z": n})
            await second.send(packet)
            reply = await second.read_packet()
            received, sent = received + len(packet), sent + len(reply)

        async with await Wire.connect(host, port) as third:  # past session_limit
            assert await third.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
            await third.read_eof()

        live = await _scrape(metrics)
        assert live[("asyncapy_sessions", ())] == 2
        # Live sessions' counts are in the scrape already, not only once they end.
        assert _by(live, "asyncapy_requests_total", "encoding") == {"json": 4, "ziproto": 2}

        await first.aclose()
        await second.aclose()
        with trio.fail_after(5):
            while (samples := await _scrape(metrics))[("asyncapy_sessions", ())] != 0:
                await trio.sleep(0.02)

    assert _by(samples, "asyncapy_requests_total", "encoding") == {"json": 4, "ziproto": 2}
    errors = {code: n for code, n in _by(samples, "asyncapy_error_replies_total", "code").items() if n}
    assert errors == {"ERR_INTERNAL": 1, "ERR_REQUEST_MALFORMED": 1, "ERR_SESSION_LIMIT_REACHED": 1}
    assert _by(samples, "asyncapy_connections_total", "outcome") == {
        "admitted": 2,
        "refused_session_limit": 1,
        "refused_max_connections": 0,
        "store_unavailable": 0,
        "tls_handshake_failed": 0,
        "refused_handshakes": 0,
        "refused_proxy": 0,
    }
    assert samples[("asyncapy_received_bytes_total", ())] == received
    assert samples[("asyncapy_sent_bytes_total", ())] == sent
    # Six requests reached the handler (the one that raised too); its qualified name.
    name = server.handlers[0][1][0].name
    assert name.endswith(".answer")
    assert samples[("asyncapy_handler_duration_seconds_count", (("handler", name),))] == 6
    assert samples[("asyncapy_handler_duration_seconds_bucket", (("handler", name), ("le", "+Inf")))] == 6
    assert samples[("asyncapy_store_duration_seconds_count", (("operation", "admit"),))] == 3
    assert samples[("asyncapy_store_duration_seconds_count", (("operation", "release"),))] == 2
    assert sum(_by(samples, "asyncapy_store_errors_total", "operation").values()) == 0


async def test_refusals_past_max_connections_and_timeouts_are_counted():
    server = _app(max_connections=1)
    server.timeout = 0.5
    async with serving(server) as (host, port):
        metrics = _metrics_port(server)
        async with await Wire.connect(host, port) as idle:
            with trio.fail_after(5):  # the session holds the one slot once admitted
                while (await _scrape(metrics))[("asyncapy_sessions", ())] != 1:
                    await trio.sleep(0.02)
            async with await Wire.connect(host, port) as refused:
                await refused.read_eof()  # closed at once, no reply
            assert await idle.read_packet() == json_error("ERR_TIMED_OUT")
            await idle.read_eof()
        with trio.fail_after(5):
            while (samples := await _scrape(metrics))[("asyncapy_sessions", ())] != 0:
                await trio.sleep(0.02)
    outcomes = _by(samples, "asyncapy_connections_total", "outcome")
    assert outcomes["admitted"] == 1 and outcomes["refused_max_connections"] == 1
    assert _by(samples, "asyncapy_error_replies_total", "code")["ERR_TIMED_OUT"] == 1
    assert samples[("asyncapy_sent_bytes_total", ())] == len(json_error("ERR_TIMED_OUT"))
    assert samples[("asyncapy_received_bytes_total", ())] == 0


async def test_readyz_of_one_process_follows_a_real_redis_server():
    redis = RedisServer().start()
    try:
        server = _app(store=redis.url + "?socket_timeout=0.5", store_timeout=2)
        async with serving(server) as (host, port):
            metrics = _metrics_port(server)
            assert await _get(metrics, "/readyz") == (200, b"ready\n")
            async with await Wire.connect(host, port) as wire:
                assert await wire.request({"n": 1}) == {"n": 1}

            redis.stop()
            with trio.fail_after(10):
                while (answer := await _get(metrics, "/readyz"))[0] != 503:
                    await trio.sleep(0.1)
            assert answer[1].startswith(b"not ready: session store unavailable"), answer
            assert await _get(metrics, "/healthz") == (200, b"ok\n")  # alive, not ready
            async with await Wire.connect(host, port) as wire:  # refused meanwhile
                assert await wire.read_packet(timeout=10) == json_error("ERR_UNAVAILABLE")

            redis.start()
            with trio.fail_after(20):  # back by itself once Redis answers again
                while (await _get(metrics, "/readyz"))[0] != 200:
                    await trio.sleep(0.1)
            samples = await _scrape(metrics)
            assert _by(samples, "asyncapy_connections_total", "outcome")["store_unavailable"] == 1
            assert _by(samples, "asyncapy_error_replies_total", "code")["ERR_UNAVAILABLE"] == 1
            assert _by(samples, "asyncapy_store_errors_total", "operation")["admit"] == 1
    finally:
        redis.stop()


async def test_readyz_says_shutting_down_while_handlers_finish():
    server = Server(addr="127.0.0.1", port=0, metrics_port=0, shutdown_grace=5)
    started = trio.Event()
    release = trio.Event()

    @server.add_handler()
    async def slow(client, packet):
        started.set()
        await release.wait()
        await client.send(packet)

    async with serving(server) as (host, port):
        metrics = _metrics_port(server)
        async with await Wire.connect(host, port) as wire:
            await wire.send(json_packet({"slow": 1}))
            await started.wait()
            server.request_shutdown()
            assert await _get(metrics, "/readyz") == (503, b"not ready: shutting down\n")
            release.set()
            assert await wire.read_json() == {"slow": 1}


async def test_api_key_caches_and_stores_are_counted(redis_url):
    factory = APIKeyFactory(store=redis_url)
    assert isinstance(factory.store, CachedKeyStore)
    key = await factory.aissue({"user": "someone"})
    server = Server(addr="127.0.0.1", port=0, metrics_port=0)

    @server.add_handler(Filters.APIFactory(factory, "api_key"))
    async def guarded(client, packet):
        await client.send(packet)

    async with serving(server) as (host, port):
        metrics = _metrics_port(server)
        async with await Wire.connect(host, port) as wire:
            for _ in range(4):
                assert await wire.request({"api_key": key}) == {"api_key": key}
        samples = await _scrape(metrics)
    hits = samples[("asyncapy_key_cache_hits_total", ())]
    misses = samples[("asyncapy_key_cache_misses_total", ())]
    assert hits + misses >= 4 and misses >= 1
    assert hits == factory.store.cache.hits and misses == factory.store.cache.misses
    # The store behind the cache is timed: the look-ups the cache could not answer.
    assert samples[("asyncapy_store_duration_seconds_count", (("operation", "key_get"),))] >= 1 or \
        samples[("asyncapy_store_duration_seconds_count", (("operation", "key_contains"),))] >= 1


def test_metrics_are_off_unless_someone_reads_them():
    server = Server(port=0)
    assert server.metrics_recorder is NULL_RECORDER
    assert server.metrics_port is None and server.metrics_host == "127.0.0.1"
    assert server.log_format == "text"
    on = Server(port=0, metrics_port=9100, metrics_host="10.0.0.5", log_format="json")
    assert on.metrics_recorder.enabled
    assert (on.metrics_port, on.metrics_host, on.log_format) == (9100, "10.0.0.5", "json")


@pytest.mark.parametrize(
    "name, value",
    [("metrics_port", 70000), ("metrics_port", -1), ("metrics_port", "9100x"), ("log_format", "xml"),
     ("metrics_host", "")],
)
def test_bad_settings_name_themselves(name, value):
    with pytest.raises(ConfigError) as caught:
        Server(port=0, **{name: value})
    assert caught.value.key == name
    assert str(caught.value).startswith(f"invalid {name}: ")


async def test_a_metrics_port_in_use_is_a_plain_os_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = Server(addr="127.0.0.1", port=0, metrics_port=taken.getsockname()[1])
        with pytest.raises(OSError, match="for metrics"):
            await server._run_until_signalled()


SERVING = re.compile(r"AsyncAPY serving on 127\.0\.0\.1:(\d+)")
METRICS = re.compile(r"Metrics and probes on http://127\.0\.0\.1:(\d+)")


def test_the_command_line_serves_metrics_and_json_logs_with_the_session():
    with Running.asyncapy(
        "run", "tests.e2e.cli_app:app", "--port", "0", "--log-format", "json", "--metrics-port", "0"
    ) as run:
        port = int(run.wait_for(SERVING)[0].group(1))
        metrics = int(run.wait_for(METRICS)[0].group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(frame(b"[1]", JSON_CODE))
            expected = json_error("ERR_REQUEST_MALFORMED")
            data = b""
            while len(data) < len(expected):
                data += sock.recv(4096)
            assert data == expected
            local = sock.getsockname()
        status, body = _fetch(metrics, "/metrics")
        assert status == 200
        samples = _parse(body)
        assert samples[("asyncapy_error_replies_total", (("code", "ERR_REQUEST_MALFORMED"),))] == 1
        assert _fetch(metrics, "/readyz") == (200, b"ready\n")
        assert run.stop() == 0, run.output
    entries = [json.loads(line) for line in run.err if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys()
    warning = next(e for e in entries if e.get("error_code") == "ERR_REQUEST_MALFORMED")
    assert warning["level"] == "WARNING" and warning["client_address"] == local[0]
    started = next(e for e in entries if "Session started" in e["message"])
    assert started["session_id"] == warning["session_id"]
    assert started["session_id"] in warning["message"]


@pytest.mark.parametrize(
    "trusted, first_bytes",
    [("10.0.0.1", b""), ("127.0.0.1", b"GET / HTTP/1.1\r\n\r\n")],
    ids=["untrusted peer", "no PROXY header"],
)
async def test_connections_refused_by_the_proxy_gate_are_counted(trusted, first_bytes):
    server = _app(proxy_protocol=True, trusted_proxies=trusted)
    async with serving(server) as (host, port):
        metrics = _metrics_port(server)
        async with await Wire.connect(host, port) as wire:
            if first_bytes:
                await wire.send(first_bytes)
            with trio.fail_after(10):  # closed: an EOF, or a reset (its bytes unread)
                try:
                    while await wire.stream.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass
        with trio.fail_after(5):
            while (samples := await _scrape(metrics))[
                ("asyncapy_connections_total", (("outcome", "refused_proxy"),))
            ] != 1:
                await trio.sleep(0.02)
    assert _by(samples, "asyncapy_connections_total", "outcome")["admitted"] == 0
