"""The server's policy against hostile clients (issue 17), over real sockets.

* TLS cannot be weakened by accident: certificate files next to an application's own
  ``ssl_context`` are an error naming both (constructor, config file, ``load_config()``,
  ``asyncapy run --certfile``); the handshake completes, within ``timeout``, before
  admission, so a client that never finishes it or fails mutual TLS takes no
  ``session_limit`` slot and causes no store write.
* Refusals for ``session_limit`` hold no ``max_connections`` slot while their close
  lingers: a burst from one address does not lock another out; lingering closes of
  refused connections are bounded by ``MAX_LINGERING`` instead.
* Logs cannot be used as a weapon: per-session rate limits on protocol-error warnings
  and handler tracebacks (with the count of what was left out), a session closed after
  ``max_protocol_errors`` errors in a row, and the echo example answering a reply its
  session cannot carry with an error instead of a traceback.
* ``session_limit`` counts IPv6 clients by ``session_limit_ipv6_prefix`` (a /64).

The store deadline (``store_timeout``) is tested against a paused redis-server in
``tests/integration/test_redis_stall.py``.
"""

from __future__ import annotations

import logging
import ssl
import sys
import textwrap

import pytest
import trio

from asyncapy import Client, Packet, Server, session_state, transport
from asyncapy.__main__ import _build_parser, _configure, main
from asyncapy.adapters.memory import MemorySessionStore
from asyncapy.client import AsyncClient
from asyncapy.config import SETTINGS, ConfigError
from asyncapy.testing import open_test_client
from examples import echo as echo_example

from ..conftest import serving
from .wire import Wire, frame, json_error, json_packet, settle, zi_packet

FORMATTER = logging.Formatter("[%(levelname)s] %(asctime)s %(message)s")


def log_size(records) -> tuple[int, int]:
    """(lines, bytes) of ``records`` as the console handler would write them,
    tracebacks included."""
    text = "\n".join(FORMATTER.format(record) for record in records)
    return text.count("\n") + 1 if records else 0, len(text.encode())


class CountingStore(MemorySessionStore):
    """A memory store that counts admissions: the store writes a client causes."""

    def __init__(self) -> None:
        super().__init__()
        self.admissions = 0

    async def admit(self, record, limit):
        self.admissions += 1
        return await super().admit(record, limit)


async def connect_from(source: str, host: str, port: int) -> Wire:
    """A raw connection whose client end is bound to ``source`` (another loopback
    address: 127.0.0.2, 127.0.0.3...), so the server sees a different client."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect((host, port))
    return Wire(trio.SocketStream(sock))


# -- new settings ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_protocol_errors", -1),
        ("max_protocol_errors", 1.5),
        ("max_protocol_errors", "100"),
        ("store_timeout", 0),
        ("store_timeout", float("inf")),
        ("store_timeout", "5"),
        ("session_limit_ipv6_prefix", 129),
        ("session_limit_ipv6_prefix", -1),
        ("session_limit_ipv6_prefix", 64.0),
    ],
)
def test_new_settings_are_validated(key, value):
    with pytest.raises(ConfigError) as caught:
        Server(**{key: value})
    message = str(caught.value)
    assert key in message and repr(value) in message and SETTINGS[key].accepted in message


def test_new_settings_from_a_config_file(tmp_path):
    config = tmp_path / "server.ini"
    config.write_text(
        "[AsyncAPY]\nmax_protocol_errors = 0\nstore_timeout = 0.5\nsession_limit_ipv6_prefix = 48\n"
    )
    server = Server(config=str(config))
    assert (server.max_protocol_errors, server.store_timeout, server.session_limit_ipv6_prefix) == (0, 0.5, 48)
    defaults = Server()
    assert (defaults.max_protocol_errors, defaults.store_timeout, defaults.session_limit_ipv6_prefix) == (100, 5.0, 64)


def test_new_flags_of_asyncapy_run():
    args = _build_parser().parse_args(
        ["run", "tests.e2e.cli_app:app", "--max-protocol-errors", "7", "--store-timeout", "1.5"]
    )
    app = _configure(args)
    assert (app.max_protocol_errors, app.store_timeout) == (7, 1.5)


# -- TLS: an application's ssl_context is never replaced by files ---------------------------
def mutual_context(tls_files) -> ssl.SSLContext:
    """What an application builds for mutual TLS: client certificates required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files["certfile"], tls_files["keyfile"])
    context.load_verify_locations(tls_files["cafile"])
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_ssl_context_with_certificate_arguments_is_an_error(tls_files):
    for name in ("certfile", "keyfile", "cafile"):
        with pytest.raises(ConfigError) as caught:
            Server(ssl_context=mutual_context(tls_files), certfile=tls_files["certfile"], **(
                {name: tls_files[name]} if name != "certfile" else {}
            ))
        message = str(caught.value)
        assert "ssl_context" in message and "certfile" in message and "Server()" in message


def test_ssl_context_with_a_config_file_setting_certfile_is_an_error(tls_files, tmp_path):
    config = tmp_path / "rotated.ini"
    config.write_text(f"[AsyncAPY]\ncertfile = {tls_files['certfile']}\nkeyfile = {tls_files['keyfile']}\n")
    with pytest.raises(ConfigError) as caught:
        Server(ssl_context=mutual_context(tls_files), config=str(config))
    message = str(caught.value)
    assert "invalid certfile in " + str(config) in message and "ssl_context" in message


def test_load_config_keeps_the_apps_context_and_says_why(tls_files, tmp_path):
    config = tmp_path / "server.ini"
    config.write_text("[AsyncAPY]\ntimeout = 5\n")
    context = mutual_context(tls_files)
    server = Server(ssl_context=context, config=str(config))
    config.write_text(f"[AsyncAPY]\ntimeout = 7\ncertfile = {tls_files['certfile']}\n")
    with pytest.raises(ConfigError, match="ssl_context"):
        server.load_config()
    # Refused before anything changed.
    assert server.ssl_context is context and server.timeout == 5 and server.certfile is None


@pytest.fixture
def mutual_app(tls_files, tmp_path, monkeypatch):
    """An importable module ``mutual_app`` whose server builds its own mutual-TLS context."""
    (tmp_path / "mutual_app.py").write_text(
        textwrap.dedent(
            f"""
            import ssl
            from asyncapy import Server

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain({tls_files['certfile']!r}, {tls_files['keyfile']!r})
            context.load_verify_locations({tls_files['cafile']!r})
            context.verify_mode = ssl.CERT_REQUIRED
            server = Server(ssl_context=context)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mutual_app", raising=False)
    yield "mutual_app:server"
    sys.modules.pop("mutual_app", None)


def test_run_with_certfile_beside_the_apps_ssl_context_is_an_error(mutual_app, tls_files, capsys):
    status = main(
        ["run", mutual_app, "--port", "0", "--certfile", tls_files["certfile"], "--keyfile", tls_files["keyfile"]]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"asyncapy: invalid certfile in --certfile: {tls_files['certfile']!r}"), err
    assert "ssl_context" in err and "client certificates" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_run_with_a_config_file_setting_certfile_beside_the_apps_ssl_context_is_an_error(
    mutual_app, tls_files, tmp_path, capsys
):
    config = tmp_path / "rotate.ini"
    config.write_text(f"[AsyncAPY]\ncertfile = {tls_files['certfile']}\n")
    assert main(["run", mutual_app, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "ssl_context" in err


def test_run_with_certfile_rotates_a_file_configured_server_keeping_its_cafile(tls_files, ca, tmp_path, monkeypatch):
    """The supported rotation: a server configured by files (cafile included) gets a
    new certificate from the command line and still requires client certificates."""
    (tmp_path / "files_app.py").write_text(
        "from asyncapy import Server\n"
        f"server = Server(certfile={tls_files['certfile']!r}, keyfile={tls_files['keyfile']!r}, "
        f"cafile={tls_files['cafile']!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rotated, rotated_key = tmp_path / "rotated.pem", tmp_path / "rotated.key"
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(rotated))
    issued.private_key_pem.write_to_path(str(rotated_key))
    app = _configure(
        _build_parser().parse_args(
            ["run", "files_app:server", "--certfile", str(rotated), "--keyfile", str(rotated_key)]
        )
    )
    sys.modules.pop("files_app", None)
    assert app.certfile == str(rotated) and app.cafile == tls_files["cafile"]
    assert app.ssl_context.verify_mode == ssl.CERT_REQUIRED


# -- TLS: the handshake comes before admission ----------------------------------------------
async def test_a_client_that_never_finishes_its_handshake_takes_no_session_slot(make_echo, tls_files, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    store = CountingStore()
    server = make_echo(certfile=tls_files["certfile"], keyfile=tls_files["keyfile"], session_limit=1, timeout=1)
    server.store = store
    async with serving(server) as (host, port):
        stalled = [await Wire.connect(host, port) for _ in range(3)]  # TCP only, no ClientHello
        await settle()
        assert store.admissions == 0 and len(server._sessions.live) == 0
        # One handshake in progress per address (its session_limit): the other two
        # were closed at once, their max_connections slots given back.
        assert server._listening.handshaking == {"127.0.0.1": 1} and server._listening.connections == 1
        context = ssl.create_default_context(cafile=tls_files["cafile"])
        other = await connect_from("127.0.0.2", host, port)
        tls = Wire(trio.SSLStream(other.stream, context, server_hostname="127.0.0.1"))
        assert await tls.request({"served": True}) == {"served": True}
        await tls.aclose()
        # Past `timeout`, the stalled handshake is closed (no reply: no TLS yet).
        for wire in stalled:
            await wire.read_eof(timeout=5)
            await wire.aclose()
    assert store.admissions == 1
    failed = [r.getMessage() for r in caplog.records if "TLS handshake with 127.0.0.1 failed" in r.getMessage()]
    assert len(failed) == 1 and all("not finished within timeout (1s)" in m for m in failed)
    crowded = [r.getMessage() for r in caplog.records if "TLS handshake(s) in progress" in r.getMessage()]
    assert crowded == ["127.0.0.1 already has 1 TLS handshake(s) in progress: refused a connection"]


async def test_a_client_failing_mutual_tls_takes_no_session_slot(make_echo, ca, tls_files, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    store = CountingStore()
    server = make_echo(
        certfile=tls_files["certfile"], keyfile=tls_files["keyfile"], cafile=tls_files["cafile"], session_limit=1
    )
    server.store = store
    no_certificate = ssl.create_default_context(cafile=tls_files["cafile"])
    with_certificate = ssl.create_default_context(cafile=tls_files["cafile"])
    ca.issue_cert("client.example").configure_cert(with_certificate)
    async with serving(server) as (host, port):
        for _ in range(5):
            with pytest.raises((trio.BrokenResourceError, ssl.SSLError, ConnectionError)):
                async with AsyncClient(tls=True, ssl_context=no_certificate, timeout=5) as client:
                    await client.connect(host, port)
                    await client.request({"a": 1})
        await settle()
        assert store.admissions == 0
        async with AsyncClient(tls=True, ssl_context=with_certificate, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"ok": 1}) == {"ok": 1}
    assert store.admissions == 1
    assert any("TLS handshake with 127.0.0.1 failed" in r.getMessage() for r in caplog.records)


# -- refusals hold no max_connections slot --------------------------------------------------
async def test_a_burst_of_refusals_from_one_address_does_not_lock_out_another(make_echo):
    server = make_echo(session_limit=1, max_connections=20)
    async with serving(server) as (host, port):
        async with await connect_from("127.0.0.2", host, port) as holder:
            assert await holder.request({"holder": 1}) == {"holder": 1}
            refused = []
            try:
                # 60 refusals, three times max_connections, all lingering at once: each
                # client keeps its end open, so the server drains it for LINGER_SECONDS.
                for n in range(60):
                    wire = await connect_from("127.0.0.2", host, port)
                    refused.append(wire)
                    await wire.send(json_packet({"n": n}))
                    assert await wire.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
                assert server._sessions.refusals.lingering == 60 and server._listening.connections == 1
                async with await connect_from("127.0.0.3", host, port) as other:
                    assert await other.request({"other": 1}) == {"other": 1}
            finally:
                for wire in refused:
                    await wire.aclose()


async def test_lingering_refusals_are_bounded(make_echo, monkeypatch):
    monkeypatch.setattr(transport, "MAX_LINGERING", 3)
    server = make_echo(session_limit=1)
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as holder:
            assert await holder.request({"holder": 1}) == {"holder": 1}
            refused = []
            try:
                for n in range(8):
                    wire = await Wire.connect(host, port)
                    refused.append(wire)
                    assert await wire.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
                    assert server._sessions.refusals.lingering == min(n + 1, 3)
                # Past the bound, the reply and an immediate close: no lingering.
                for wire in refused[3:]:
                    await wire.read_eof(timeout=1)
            finally:
                for wire in refused:
                    await wire.aclose()


# -- logs that cannot be used as a weapon ---------------------------------------------------
EMPTY = frame(b"")  # Content-Length 2, no payload: ERR_REQUEST_MALFORMED, session goes on


async def send_and_close(wire: Wire, data: bytes) -> None:
    """Send ``data``, then the end of the stream (run beside the reads: a client that
    writes everything before reading would stall on the server's backpressure)."""
    await wire.send(data)
    await wire.stream.send_eof()


async def read_replies(wire: Wire, expected: bytes) -> int:
    """How many copies of ``expected`` arrive before the server closes the connection."""
    count = 0
    while True:
        with trio.fail_after(30):
            data = await wire.stream.receive_some(1 << 20)
        if not data:
            assert not wire._buffer, bytes(wire._buffer[:100])
            return count
        wire._buffer += data
        whole = len(wire._buffer) // len(expected)
        assert wire._buffer[: whole * len(expected)] == expected * whole
        del wire._buffer[: whole * len(expected)]
        count += whole


async def test_200000_pipelined_empty_packets_close_the_session_after_max_protocol_errors(make_echo, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_echo()  # max_protocol_errors: the default, 100
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wire.send, EMPTY * 200_000)
                replies = await read_replies(wire, json_error("ERR_REQUEST_MALFORMED"))
        assert replies == 100
        async with await Wire.connect(host, port) as other:  # the server goes on
            assert await other.request({"after": 1}) == {"after": 1}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    lines, size = log_size(warnings)
    # LOG_BURST warnings, the closing line, and the count of what was left out.
    assert lines == session_state.LOG_BURST + 2, [r.getMessage() for r in warnings]
    assert size < 3000
    assert "100 protocol errors in a row (max_protocol_errors): closing the session" in warnings[-2].getMessage()
    assert "Not logged (rate limit): 90 protocol error(s), 0 handler failure(s)" in warnings[-1].getMessage()
    assert any("Session ended: too many protocol errors" in r.getMessage() for r in caplog.records)


async def test_protocol_error_warnings_are_rate_limited_per_session(make_echo, caplog):
    """With max_protocol_errors off, 200,000 errors are all answered, and the log holds
    LOG_BURST warnings per LOG_INTERVAL plus one count, not 200,000 lines."""
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_echo(max_protocol_errors=0)
    packets = 200_000
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_and_close, wire, EMPTY * packets)
                replies = await read_replies(wire, json_error("ERR_REQUEST_MALFORMED"))
            elapsed = trio.current_time() - started
    assert replies == packets
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    windows = int(elapsed // session_state.LOG_INTERVAL) + 1
    assert len(warnings) <= session_state.LOG_BURST * windows + 1, len(warnings)
    told = [r.getMessage() for r in warnings if "ERR_REQUEST_MALFORMED" in r.getMessage()]
    [summary] = [r.getMessage() for r in warnings if "Not logged (rate limit)" in r.getMessage()]
    # Every error is accounted for: logged, counted in a later line, or in the summary.
    counted = sum(int(m.split("(")[-1].split()[0]) for m in told if "more protocol errors" in m)
    assert len(told) + counted + int(summary.split(": ")[-1].split()[0]) == packets
    assert log_size(warnings)[1] < 2000 * windows


async def test_handler_tracebacks_are_rate_limited_per_session(make_server, caplog):
    caplog.set_level(logging.INFO, logger="asyncapy")
    server = make_server()

    @server.add_handler()
    async def broken(client: Client, packet: Packet) -> None:
        raise RuntimeError("always")

    packets = 20_000
    async with serving(server) as (host, port):
        async with await Wire.connect(host, port) as wire:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_and_close, wire, json_packet({"n": 1}) * packets)
                assert await read_replies(wire, json_error("ERR_INTERNAL")) == packets
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= session_state.LOG_BURST * 2
    assert all(r.exc_info for r in errors)  # those logged keep their traceback
    [summary] = [r.getMessage() for r in caplog.records if "Not logged (rate limit)" in r.getMessage()]
    assert "0 protocol error(s)" in summary
    # Every failure is accounted for: logged, counted in a later line, or in the summary.
    counted = sum(
        int(r.getMessage().split("(")[-1].split()[0]) for r in errors if "more handler failures" in r.getMessage()
    )
    assert len(errors) + counted + int(summary.split(", ")[-1].split()[0]) == packets
    lines, size = log_size(caplog.records)
    assert size < 50_000, size  # 20,000 tracebacks were 18.6 MB


async def test_the_echo_example_answers_what_its_session_cannot_carry(caplog):
    """20,000 ZiProto packets with a binary field, in a JSON session: each answered with
    an error, no traceback, no ERR_INTERNAL."""
    caplog.set_level(logging.INFO, logger="asyncapy")
    error = json_packet({"status": "failure", "error": "not representable in json"})
    async with serving(echo_example.app) as (host, port):
        async with await Wire.connect(host, port) as wire:
            assert await wire.request({"session": "json"}) == {"session": "json"}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_and_close, wire, zi_packet({"blob": b"\x00\x01"}) * 20_000)
                assert await read_replies(wire, error) == 20_000
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- IPv6 clients are grouped by prefix for session_limit -----------------------------------
async def test_session_limit_counts_an_ipv6_slash_64_as_one_client(make_echo):
    server = make_echo(session_limit=1)

    @server.add_handler(group=-1)
    async def whoami(client: Client, packet: Packet) -> None:
        if "whoami" in packet:
            await client.send(Packet({"address": client.address}, encoding=client.encoding))
            packet.stop_propagation()

    async with open_test_client(server, address="2001:db8:0:1::1") as first:
        assert await first.request({"whoami": 1}) == {"address": "2001:db8:0:1::1"}
        async with open_test_client(server, address="2001:db8:0:1:ffff::2") as same_64:
            await same_64.connect()
            assert same_64.admitted is False
            assert await same_64.receive() == {"status": "failure", "error": "ERR_SESSION_LIMIT_REACHED"}
        async with open_test_client(server, address="2001:db8:0:2::1") as next_64:
            assert await next_64.request({"whoami": 1}) == {"address": "2001:db8:0:2::1"}
        sessions = await server._sessions_of("2001:db8:0:1::99")
        assert len(sessions) == 1
    server.session_limit_ipv6_prefix = 128
    async with open_test_client(server, address="2001:db8:0:1::1") as first:
        async with open_test_client(server, address="2001:db8:0:1::2") as second:
            assert await first.request({"a": 1}) == {"a": 1}
            assert await second.request({"b": 2}) == {"b": 2}


async def test_session_limit_over_real_ipv6_loopback(make_echo):
    server = make_echo(session_limit=1)
    async with serving(server, host="::1") as (host, port):
        async with await Wire.connect(host, port) as first:
            assert await first.request({"v6": 1}) == {"v6": 1}
            [session] = server._sessions.live.values()
            assert session.client.address == "::1"
            assert [r.address for r in await server.store.sessions("::/64")] == ["::/64"]
            async with await Wire.connect(host, port) as second:
                await second.send(json_packet({"v6": 2}))
                assert await second.read_packet() == json_error("ERR_SESSION_LIMIT_REACHED")
