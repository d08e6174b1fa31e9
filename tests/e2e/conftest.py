"""Fixtures of the end-to-end tests: echo servers and throwaway TLS certificates."""

from __future__ import annotations

import pytest
import trustme

from asyncapy import Client, Packet


@pytest.fixture
def make_echo(make_server):
    """Factory of servers that echo every packet back (in the session's encoding)."""

    def make(**kwargs):
        server = make_server(**kwargs)

        @server.add_handler()
        async def echo(client: Client, packet: Packet) -> None:
            await client.send(packet)

        return server

    return make


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path):
    """PEM files on disk: the CA, and a server certificate for 127.0.0.1 with its key
    in a separate file."""
    server_cert = ca.issue_cert("127.0.0.1")
    paths = {
        "cafile": tmp_path / "ca.pem",
        "certfile": tmp_path / "server.pem",
        "keyfile": tmp_path / "server.key",
    }
    ca.cert_pem.write_to_path(str(paths["cafile"]))
    server_cert.cert_chain_pems[0].write_to_path(str(paths["certfile"]))
    for pem in server_cert.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["certfile"]), append=True)
    server_cert.private_key_pem.write_to_path(str(paths["keyfile"]))
    return {name: str(path) for name, path in paths.items()}
