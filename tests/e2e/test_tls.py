"""TLS on both sides, with throwaway certificates from trustme.

The server serves TLS from PEM files (``certfile``/``keyfile``) and, with ``cafile``,
requires client certificates. The bundled clients verify the server's certificate and
host name by default. The blocking client runs in a worker thread while the server runs
in the test's trio loop.
"""

from __future__ import annotations

import ssl

import pytest
import trio

from asyncapy.client import AsyncClient, Client
from asyncapy.config import ConfigError
from tests.conftest import serving


def blocking_request(port: int, payload, hostname: str = "127.0.0.1", **kwargs):
    with Client(tls=True, timeout=5, **kwargs) as client:
        client.connect(hostname, port)
        assert isinstance(client.sock, ssl.SSLSocket)
        return client.request(payload)


async def test_blocking_client_over_tls(make_echo, tls_files):
    server = make_echo(certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    async with serving(server) as (host, port):
        got = await trio.to_thread.run_sync(
            lambda: blocking_request(port, {"secure": True}, cafile=tls_files["cafile"])
        )
    assert got == {"secure": True}


async def test_async_client_over_tls_keeps_a_session(make_echo, tls_files):
    server = make_echo(certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    async with serving(server) as (host, port):
        async with AsyncClient(tls=True, cafile=tls_files["cafile"], timeout=5) as client:
            await client.connect(host, port)
            assert isinstance(client.stream, trio.SSLStream)
            for n in range(5):
                assert await client.request({"n": n}) == {"n": n}


async def test_certificate_and_key_in_one_file(make_echo, ca, tmp_path):
    combined = tmp_path / "combined.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(combined))
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    async with serving(make_echo(certfile=str(combined))) as (host, port):
        async with AsyncClient(tls=True, ssl_context=trust, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"one": "file"}) == {"one": "file"}


async def test_client_verifies_the_server_by_default(make_echo, tls_files):
    """Without the private CA, the system trust store does not know the certificate."""
    server = make_echo(certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    async with serving(server) as (host, port):
        with pytest.raises(ssl.SSLCertVerificationError):
            await trio.to_thread.run_sync(lambda: blocking_request(port, {"a": 1}))

        with pytest.raises(ssl.SSLCertVerificationError):
            async with AsyncClient(tls=True, timeout=5) as client:
                await client.connect(host, port)


async def test_host_name_mismatch_fails(make_echo, ca, tmp_path, tls_files):
    wrong = tmp_path / "wrong.pem"
    ca.issue_cert("wrong.example").private_key_and_cert_chain_pem.write_to_path(str(wrong))
    async with serving(make_echo(certfile=str(wrong))) as (host, port):
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            await trio.to_thread.run_sync(
                lambda: blocking_request(port, {"a": 1}, cafile=tls_files["cafile"])
            )
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            async with AsyncClient(tls=True, cafile=tls_files["cafile"], timeout=5) as client:
                await client.connect(host, port)


async def test_plain_client_against_a_tls_server_gets_no_packet(make_echo, tls_files):
    server = make_echo(certfile=tls_files["certfile"], keyfile=tls_files["keyfile"])
    async with serving(server) as (host, port):
        async with AsyncClient(tls=False, timeout=2) as client:
            await client.connect(host, port)
            await client.send({"plain": "text"})
            with pytest.raises((ConnectionError, TimeoutError)):
                await client.receive()
        # The server survives it.
        async with AsyncClient(tls=True, cafile=tls_files["cafile"], timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"still": "ok"}) == {"still": "ok"}


# -- mutual TLS ---------------------------------------------------------------------------
def client_context(ca, tls_files, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls_files["cafile"])
    if with_cert:
        ca.issue_cert("client.example").configure_cert(context)
    return context


def mutual_server(make_echo, tls_files):
    return make_echo(
        certfile=tls_files["certfile"], keyfile=tls_files["keyfile"], cafile=tls_files["cafile"]
    )


async def test_mutual_tls_accepts_a_client_certificate(make_echo, ca, tls_files):
    async with serving(mutual_server(make_echo, tls_files)) as (host, port):
        context = client_context(ca, tls_files, with_cert=True)
        got = await trio.to_thread.run_sync(
            lambda: blocking_request(port, {"mutual": 1}, ssl_context=context)
        )
        assert got == {"mutual": 1}
        async with AsyncClient(tls=True, ssl_context=context, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"mutual": 2}) == {"mutual": 2}


async def test_mutual_tls_refuses_a_client_without_certificate(make_echo, ca, tls_files):
    async with serving(mutual_server(make_echo, tls_files)) as (host, port):
        context = client_context(ca, tls_files, with_cert=False)
        # With TLS 1.3 the client's handshake may complete before the server rejects it:
        # the failure then shows on the first read.
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(
                lambda: blocking_request(port, {"a": 1}, ssl_context=context)
            )

        async def async_attempt():
            async with AsyncClient(tls=True, ssl_context=context, timeout=5) as client:
                await client.connect(host, port)
                return await client.request({"a": 1})

        with pytest.raises((trio.BrokenResourceError, ssl.SSLError, ConnectionError)):
            await async_attempt()

        # A client with a certificate is still served.
        good = client_context(ca, tls_files, with_cert=True)
        async with AsyncClient(tls=True, ssl_context=good, timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"ok": 1}) == {"ok": 1}


async def test_mutual_tls_refuses_a_certificate_from_another_ca(make_echo, tls_files):
    import trustme

    stranger = trustme.CA()
    context = ssl.create_default_context(cafile=tls_files["cafile"])
    stranger.issue_cert("client.example").configure_cert(context)
    async with serving(mutual_server(make_echo, tls_files)) as (host, port):
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(
                lambda: blocking_request(port, {"a": 1}, ssl_context=context)
            )


def test_tls_settings_are_checked_when_the_server_is_made(tmp_path, tls_files):
    from asyncapy import Server

    with pytest.raises(ConfigError, match="certfile"):
        Server(certfile=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="cafile"):
        Server(cafile=tls_files["cafile"])  # client certificates need a server certificate
    with pytest.raises(ConfigError, match="cafile"):
        Server(
            certfile=tls_files["certfile"],
            keyfile=tls_files["keyfile"],
            cafile=str(tmp_path / "missing-ca.pem"),
        )


async def test_reloaded_config_switches_the_server_to_tls(make_echo, tls_files, tmp_path):
    """``Server.load_config()`` (the 0.5 API) applies TLS files from the config too."""
    config = tmp_path / "server.ini"
    config.write_text("[AsyncAPY]\ntimeout = 5\n")
    server = make_echo(config=str(config))
    assert server.ssl_context is None
    config.write_text(
        f"[AsyncAPY]\ncertfile = {tls_files['certfile']}\nkeyfile = {tls_files['keyfile']}\n"
    )
    server.load_config()
    async with serving(server) as (host, port):
        async with AsyncClient(tls=True, cafile=tls_files["cafile"], timeout=5) as client:
            await client.connect(host, port)
            assert await client.request({"reloaded": True}) == {"reloaded": True}
