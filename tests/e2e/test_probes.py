"""The operations endpoint on real loopback sockets: scraped by a real HTTP client
(urllib, in a thread), the text parsed by prometheus_client's own parser; probes that
flip with the server's state and with a real redis-server stopped and started again;
and scrapers that misbehave (slowloris, huge heads, floods of connections) while a
real probe still gets its answer."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.adapters.redis import RedisSessionStore
from asyncapy.domain.httphead import MAX_HEAD
from asyncapy.domain.ports import SessionRecord
from asyncapy.metered import metered_dispatcher, metered_session_store
from asyncapy.metrics import Recorder
from asyncapy.probes import ProbeServer, Readiness, RecorderExposition, StoreProbe
from asyncapy.stores import redis_client
from tests.redis_server import RedisServer


class _State:
    def __init__(self) -> None:
        self.listening = True
        self.stopping = False


def _endpoint(recorder=None, store=None, state=None, **kwargs):
    recorder = recorder or Recorder()
    state = state or _State()
    readiness = Readiness(
        listening=lambda: state.listening, stopping=lambda: state.stopping, store=store
    )
    registry = CollectorRegistry()
    return ProbeServer(RecorderExposition(recorder, registry), readiness, **kwargs), state


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, dict]:
    def fetch():
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    return await trio.to_thread.run_sync(fetch)


def _families(text: bytes) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def _value(families: dict, name: str, sample: str, **labels) -> float:
    for s in families[name].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no {sample} {labels}")


async def test_metrics_are_scraped_and_parsed(nursery):
    recorder = Recorder()
    probes, _ = _endpoint(recorder)
    (host, port, *_), = await nursery.start(probes.serve)
    assert host == "127.0.0.1"

    class Client:
        encoding = "ziproto"

    meter = recorder.session_started(Client())
    meter.requests += 3
    meter.received += 100
    meter.sent += 40
    ended = recorder.session_started(Client())
    ended.requests += 2
    ended.sent += 10
    recorder.session_ended(ended)
    recorder.connection("admitted")
    recorder.connection("refused_session_limit")
    recorder.error_reply("ERR_REQUEST_MALFORMED")
    recorder.key_cache.hit()
    recorder.key_cache.miss()
    recorder.key_cache.miss()

    store = metered_session_store(MemorySessionStore(), recorder)
    await store.admit(SessionRecord("s", "10.0.0.1", 0.0), 0)

    status, body, headers = await _get(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    families = _families(body)
    assert _value(families, "asyncapy_requests", "asyncapy_requests_total", encoding="ziproto") == 5
    assert _value(families, "asyncapy_requests", "asyncapy_requests_total", encoding="json") == 0
    assert _value(families, "asyncapy_sessions", "asyncapy_sessions") == 1
    assert _value(families, "asyncapy_connections", "asyncapy_connections_total", outcome="admitted") == 1
    assert _value(
        families, "asyncapy_connections", "asyncapy_connections_total",
        outcome="refused_max_connections",
    ) == 0
    assert _value(
        families, "asyncapy_error_replies", "asyncapy_error_replies_total", code="ERR_REQUEST_MALFORMED"
    ) == 1
    assert _value(families, "asyncapy_received_bytes", "asyncapy_received_bytes_total") == 100
    assert _value(families, "asyncapy_sent_bytes", "asyncapy_sent_bytes_total") == 50
    assert _value(families, "asyncapy_key_cache_hits", "asyncapy_key_cache_hits_total") == 1
    assert _value(families, "asyncapy_key_cache_misses", "asyncapy_key_cache_misses_total") == 2
    assert _value(
        families, "asyncapy_store_duration_seconds", "asyncapy_store_duration_seconds_count",
        operation="admit",
    ) == 1
    assert _value(
        families, "asyncapy_store_duration_seconds", "asyncapy_store_duration_seconds_bucket",
        operation="admit", le="+Inf",
    ) == 1
    assert families["asyncapy_handler_duration_seconds"].type == "histogram"


async def test_metrics_include_the_registry_passed(nursery):
    registry = CollectorRegistry()
    Counter("myapp_orders", "Orders taken.", registry=registry).inc(7)
    probes = ProbeServer(
        RecorderExposition(Recorder(), registry), Readiness(listening=lambda: True, stopping=lambda: False)
    )
    (_, port, *_), = await nursery.start(probes.serve)
    families = _families((await _get(port, "/metrics"))[1])
    assert _value(families, "myapp_orders", "myapp_orders_total") == 7
    assert "asyncapy_requests" in families


async def test_handler_timings_through_a_metered_dispatcher(nursery):
    from asyncapy.domain.dispatch import Dispatcher, Handler

    recorder = Recorder()
    calls = []

    async def hello(client, packet):
        calls.append(packet)
        await trio.sleep(0.01)

    dispatcher = Dispatcher()
    dispatcher.register(Handler(hello))
    metered = metered_dispatcher(dispatcher, recorder)

    class Client:
        closed = False
        handler = None

    await metered.dispatch(Client(), {"a": 1})
    await metered.dispatch(Client(), {"a": 2})
    probes, _ = _endpoint(recorder)
    (_, port, *_), = await nursery.start(probes.serve)
    families = _families((await _get(port, "/metrics"))[1])
    name = "test_handler_timings_through_a_metered_dispatcher.<locals>.hello"
    assert _value(
        families, "asyncapy_handler_duration_seconds", "asyncapy_handler_duration_seconds_count",
        handler=name,
    ) == 2
    assert _value(
        families, "asyncapy_handler_duration_seconds", "asyncapy_handler_duration_seconds_sum",
        handler=name,
    ) >= 0.02
    assert len(calls) == 2


async def test_healthz_and_head_and_unknown_paths(nursery):
    probes, _ = _endpoint()
    (_, port, *_), = await nursery.start(probes.serve)
    assert (await _get(port, "/healthz"))[:2] == (200, b"ok\n")
    status, body, headers = await _get(port, "/healthz", "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "3")
    assert (await _get(port, "/metrics?name[]=x"))[0] == 200
    assert (await _get(port, "/nothing"))[0] == 404
    status, _, headers = await _get(port, "/metrics", "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


async def test_readyz_follows_listening_and_stopping(nursery):
    probes, state = _endpoint(store=MemorySessionStore())
    (_, port, *_), = await nursery.start(probes.serve)
    assert (await _get(port, "/readyz"))[:2] == (200, b"ready\n")
    state.listening = False
    assert (await _get(port, "/readyz"))[:2] == (503, b"not ready: not listening\n")
    state.listening = True
    state.stopping = True
    assert (await _get(port, "/readyz"))[:2] == (503, b"not ready: shutting down\n")
    state.stopping = False
    assert (await _get(port, "/readyz"))[0] == 200


async def test_readyz_follows_a_real_redis_server_going_and_coming_back(nursery):
    redis = RedisServer().start()
    try:
        store = RedisSessionStore(redis_client(redis.url + "?socket_timeout=0.5"), lease=30)
        probes, _ = _endpoint(store=store)
        probes.readiness.store.interval = 0.1
        (_, port, *_), = await nursery.start(probes.serve)
        assert (await _get(port, "/readyz"))[:2] == (200, b"ready\n")

        redis.stop()
        await trio.sleep(0.2)
        status, body, _ = await _get(port, "/readyz")
        assert status == 503
        assert body.startswith(b"not ready: session store unavailable")
        assert (await _get(port, "/healthz"))[0] == 200  # alive, just not ready

        redis.start()
        with trio.fail_after(20):  # flips back by itself once Redis answers again
            while (await _get(port, "/readyz"))[0] != 200:
                await trio.sleep(0.1)
    finally:
        redis.stop()


async def test_the_store_is_checked_once_per_interval_whatever_the_probes():
    calls = []

    class CountingStore(MemorySessionStore):
        async def sessions(self, address):
            calls.append(address)
            await trio.sleep(0.05)
            return []

    probe = StoreProbe(CountingStore(), interval=10, timeout=1)
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(probe.not_ready)
    assert await probe.not_ready() is None
    assert len(calls) == 1


async def test_a_store_that_hangs_makes_the_probe_fail_within_its_timeout():
    class HangingStore(MemorySessionStore):
        async def sessions(self, address):
            await trio.sleep_forever()

    probe = StoreProbe(HangingStore(), interval=0.01, timeout=0.2)
    with trio.fail_after(5):
        reason = await probe.not_ready()
    assert reason == "session store did not answer within 0.2s"


# -- hostile scrapers -------------------------------------------------------------------
async def _raw(port: int, data: bytes, *, read: bool = True) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if not read:
            return b""
        reply = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                reply += chunk
        return reply


async def test_a_huge_head_is_refused_with_431(nursery):
    probes, _ = _endpoint()
    (_, port, *_), = await nursery.start(probes.serve)
    head = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (MAX_HEAD + 100)
    reply = await _raw(port, head)
    assert reply.startswith(b"HTTP/1.1 431 ")
    reply = await _raw(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")


async def test_garbage_gets_400_and_the_endpoint_goes_on(nursery):
    probes, _ = _endpoint()
    (_, port, *_), = await nursery.start(probes.serve)
    for garbage in (b"\x00\x01\x02\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n"):
        reply = await _raw(port, garbage)
        assert reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 505 ")), reply
    assert (await _get(port, "/healthz"))[0] == 200


async def test_a_slowloris_is_cut_at_the_request_timeout(nursery):
    probes, _ = _endpoint(request_timeout=0.3)
    (_, port, *_), = await nursery.start(probes.serve)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        closed = False
        with trio.fail_after(5):
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 10:
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    closed = True
                    break
                await trio.sleep(0.02)
            if not closed:
                assert await stream.receive_some(100) == b""
    assert probes.connections == 0


async def test_a_flood_of_idle_connections_does_not_keep_a_probe_out(nursery):
    probes, _ = _endpoint(max_connections=8, request_timeout=30)
    (_, port, *_), = await nursery.start(probes.serve)
    idle = []
    try:
        for _ in range(40):  # five times the cap, each sending half a request
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            idle.append(sock)
        await trio.sleep(0.2)
        assert probes.connections <= 8
        with trio.fail_after(5):
            assert (await _get(port, "/healthz"))[:2] == (200, b"ok\n")
    finally:
        for sock in idle:
            sock.close()


async def test_a_scraper_that_never_reads_is_cut_at_the_response_timeout(nursery):
    recorder = Recorder()
    for index in range(3000):  # a large body: many handlers' histograms
        recorder.handler_timings(f"handler_{index}").observe(0.001)
    probes, _ = _endpoint(recorder, response_timeout=0.5)
    (_, port, *_), = await nursery.start(probes.serve)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while probes.connections:
                await trio.sleep(0.05)
        assert (await _get(port, "/healthz"))[0] == 200
    finally:
        sock.close()


async def test_a_bind_failure_names_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        probes, _ = _endpoint(port=port)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for metrics"):
            await probes.serve()


@pytest.fixture
async def nursery():
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()
