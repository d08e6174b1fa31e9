"""Secrets: API keys and TLS, audited (see docs/security.md, "Secrets").

What is checked here, and where the rest already is:

- API keys come from :mod:`secrets`, never from :mod:`random` (here).
- A key is never logged: no logging call in the library or the examples takes a
  key-named value unless through ``fingerprint()`` (a static check of the source, here),
  and the API-key filter logs only the fingerprint, at every level (here).
- No code compares a key with ``==``/``!=`` (a static check, here): the stores look
  keys up by hash (the in-memory store: a ``dict``; Redis and SQLite: the key's SHA-256
  as the record's name), so there is no byte-by-byte comparison whose timing would say
  how much of a guessed key was right. docs/security.md explains why a ``dict`` lookup
  is acceptable.
- Keys are stored hashed by every store but the in-memory one: Redis (fakeredis here;
  a real redis-server in tests/integration/test_redis_keys.py::
  test_keys_are_stored_only_hashed) and the SQLite example
  (tests/contract/test_sqlite_key_store.py::test_the_database_never_holds_a_key_in_clear).
- The ``Ip`` filter sees the real peer address, IPv4-mapped IPv6 unwrapped: through a
  dual-stack socket (here) and through the in-process test client (here).
- TLS: the clients verify certificates and host names by default (their default
  context, here; over sockets in tests/e2e/test_tls.py::
  test_client_verifies_the_server_by_default and ::test_host_name_mismatch_fails);
  ``cafile`` makes the server require client certificates (here; over sockets in
  tests/e2e/test_tls.py::test_mutual_tls_*).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import pathlib
import re
import socket
import ssl

import fakeredis
import pytest
import trio
import trustme

import asyncapy.util
from asyncapy.adapters.redis import RedisKeyStore
from asyncapy import Filters, Server
from asyncapy.client import AsyncClient, Client
from asyncapy.errors import StoreUnavailable
from asyncapy.testing import open_test_client
from asyncapy.util import KEY_ALPHABET, APIKeyFactory, fingerprint
from asyncapy.domain.ports import KeyStore

ROOT = pathlib.Path(__file__).resolve().parents[2]
AUDITED = ("asyncapy", "adapters", "domain", "examples")
"""The code whose logging and comparisons are audited: the library and the examples
people copy."""


def source_files() -> list[pathlib.Path]:
    files = [path for top in AUDITED for path in sorted((ROOT / top).rglob("*.py"))]
    assert len(files) > 20, "the audit found no source: wrong root?"
    return files


# -- where keys come from ---------------------------------------------------------------
def test_keys_come_from_the_secrets_module(monkeypatch):
    drawn = []

    def choice(alphabet):
        drawn.append(alphabet)
        return alphabet[0]

    monkeypatch.setattr(asyncapy.util.secrets, "choice", choice)
    key = APIKeyFactory(size=20).new_key()
    assert key == KEY_ALPHABET[0] * 20
    # The first character from letters and digits (never "-"), the rest from all 64.
    assert drawn == [asyncapy.util._FIRST_ALPHABET] + [KEY_ALPHABET] * 19


def test_the_key_module_does_not_use_random():
    tree = ast.parse((ROOT / "asyncapy" / "util.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "secrets" in imported
    assert "random" not in imported


def test_keys_carry_at_least_96_bits():
    assert len(set(KEY_ALPHABET)) == 64  # 6 bits a character
    with pytest.raises(ValueError):
        APIKeyFactory(size=15)
    assert 16 * 6 >= 96 and APIKeyFactory().size * 6 == 192


# -- keys are never logged ----------------------------------------------------------------
KEY_NAME = re.compile(r"(^|_)key$", re.IGNORECASE)
LOGGING_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}


def _key_names(node: ast.AST) -> list[str]:
    """Key-named variables and attributes used in ``node``, except inside fingerprint()."""
    found = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Call) and getattr(item.func, "id", getattr(item.func, "attr", "")) == "fingerprint":
            continue
        if isinstance(item, ast.Name) and KEY_NAME.search(item.id):
            found.append(item.id)
        elif isinstance(item, ast.Attribute) and KEY_NAME.search(item.attr):
            found.append(item.attr)
        stack.extend(ast.iter_child_nodes(item))
    return found


def _logging_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOGGING_METHODS
            and isinstance(node.func.value, (ast.Name, ast.Attribute, ast.Call))
            and re.search(r"log", ast.unparse(node.func.value), re.IGNORECASE)
        ):
            yield node


def test_no_logging_call_takes_a_key_except_through_fingerprint():
    offenders = []
    calls = 0
    for path in source_files():
        tree = ast.parse(path.read_text(), str(path))
        for call in _logging_calls(tree):
            calls += 1
            names = _key_names(ast.Module(body=[ast.Expr(arg) for arg in [*call.args, *(k.value for k in call.keywords)]], type_ignores=[]))
            if names:
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} logs {names}")
    assert calls > 30, "the audit found no logging calls: the pattern is wrong"
    assert not offenders, "\n".join(offenders)


def test_the_audit_would_catch_a_logged_key():
    tree = ast.parse(
        "logger.warning('bad key %s', key)\n"
        "self.log.info(f'reissued {new_key}')\n"
        "logger.warning('checked %s', fingerprint(key))\n"
        "logging.getLogger('x').error('%s', self.api_key)\n"
    )
    flagged = [call.lineno for call in _logging_calls(tree) if _key_names(ast.Module(body=[ast.Expr(a) for a in call.args], type_ignores=[]))]
    assert flagged == [1, 2, 4]


def test_fingerprint_is_a_truncated_sha256():
    key = APIKeyFactory().new_key()
    assert fingerprint(key) == hashlib.sha256(key.encode()).hexdigest()[:12]
    assert key not in fingerprint(key)


async def no_reply(client) -> bool:
    """True if the test client receives nothing within its timeout.

    Assert on the result *after* the ``open_test_client`` block, never with
    ``pytest.raises``/``pytest.fail`` inside it: those raise a ``BaseException``, which
    the block swallows once the client has connected (an open bug of
    ``asyncapy/testing/client.py``; an ``AssertionError`` is an ``Exception`` and is
    not swallowed)."""
    try:
        await client.receive()
    except TimeoutError:
        return True
    return False


class DownKeyStore(KeyStore):
    """A key store whose backend is unreachable."""

    async def put(self, key, metadata):
        raise StoreUnavailable("down")

    async def get(self, key):
        raise StoreUnavailable("down")

    async def delete(self, key):
        raise StoreUnavailable("down")

    async def contains(self, key):
        raise StoreUnavailable("down")

    async def replace(self, old_key, new_key):
        raise StoreUnavailable("down")


async def test_the_api_key_filter_logs_only_a_fingerprint(caplog):
    caplog.set_level(logging.DEBUG)
    keys = APIKeyFactory()
    valid = keys.issue({"user": "alice"})
    guessed = keys.new_key()
    down = APIKeyFactory(store=DownKeyStore())
    server = Server(addr="127.0.0.1", port=0)

    @server.add_handler(Filters.APIFactory(keys, "key"))
    async def ok(client, packet):
        await client.send(packet)

    @server.add_handler(Filters.APIFactory(down, "key"))
    async def never(client, packet):  # pragma: no cover - the store is down
        raise AssertionError("a key that could not be checked passed")

    async with open_test_client(server, timeout=0.5) as client:
        assert await client.request({"key": valid}) == {"key": valid}
        await client.send({"key": guessed})
        unanswered = await no_reply(client)
    assert unanswered  # refused by both filters

    # The store-unavailable warning names the key by its fingerprint only...
    warnings = [r.getMessage() for r in caplog.records if "not checked" in r.getMessage()]
    assert any(fingerprint(guessed) in message for message in warnings), warnings
    # ...and no record, at any level, holds either key.
    for record in caplog.records:
        assert valid not in record.getMessage() and guessed not in record.getMessage()
    assert valid not in caplog.text and guessed not in caplog.text


# -- keys are never compared byte by byte ---------------------------------------------------
def test_no_code_compares_a_key_with_equality():
    """Equality on a secret stops at the first differing byte; a lookup by hash (a dict,
    a digest-named Redis key, an SQL primary key on the digest) does not. Comparing with
    a literal (the CLI's ``key == "-"``, meaning stdin) reveals nothing."""
    offenders = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                continue
            sides = [node.left, *node.comparators]
            if any(isinstance(side, ast.Constant) for side in sides):
                continue
            # A side that *is* a key (``key``, ``self.api_key``, ``keys[i]``), not one
            # that merely uses one (``store.get(key) == metadata`` compares metadata).
            names = [
                name
                for side in sides
                if isinstance(side, (ast.Name, ast.Attribute, ast.Subscript))
                for name in _key_names(side.value if isinstance(side, ast.Subscript) else side)
            ]
            if names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "compare keys with hmac.compare_digest, or look them up by hash:\n" + "\n".join(offenders)


# -- keys are stored hashed ------------------------------------------------------------------
def test_the_redis_store_holds_only_digests():
    """fakeredis: the unit-level twin of tests/integration/test_redis_keys.py::
    test_keys_are_stored_only_hashed (which uses a real redis-server)."""
    try:
        import lupa  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("install the test extra: fakeredis[lua]", pytrace=False)
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    factory = APIKeyFactory(store=RedisKeyStore(redis))
    issued = [factory.issue({"user": f"user-{n}"}) for n in range(3)]
    reissued = factory.reissue(issued[0])
    factory.update(issued[1], {"user": "renamed"})

    dump = b""
    for name in redis.scan_iter():
        dump += name + b"\0" + (redis.dump(name) or b"") + b"\0"
    for key in [*issued, reissued]:
        assert key.encode() not in dump
    for key in [reissued, *issued[1:]]:
        assert hashlib.sha256(key.encode()).hexdigest().encode() in dump
    assert factory.get(reissued) == {"user": "user-0"}


# -- the Ip filter sees the real peer, IPv4-mapped IPv6 unwrapped ---------------------------
def ip_guarded_server() -> Server:
    server = Server(addr="127.0.0.1", port=0, timeout=5)

    @server.add_handler(Filters.Ip("127.0.0.1"))
    async def loopback(client, packet):
        await client.send(type(packet)({"via": "127.0.0.1", "address": client.address}, packet.encoding))

    @server.add_handler(Filters.Ip("10.0.0.0/8"))
    async def private(client, packet):
        await client.send(type(packet)({"via": "10.0.0.0/8"}, packet.encoding))

    return server


async def test_ip_filter_unwraps_an_ipv4_mapped_test_client():
    async with open_test_client(ip_guarded_server(), address="::ffff:127.0.0.1") as client:
        # The payload cannot claim an address: only the peer's counts.
        assert await client.request({"ip": "10.1.2.3"}) == {"via": "127.0.0.1", "address": "127.0.0.1"}
    async with open_test_client(ip_guarded_server(), address="::ffff:10.9.9.9") as client:
        assert client.address == "10.9.9.9"
        assert await client.request({"x": 1}) == {"via": "10.0.0.0/8"}  # networks too
    async with open_test_client(ip_guarded_server(), address="::ffff:192.0.2.1", timeout=0.5) as client:
        await client.send({"ip": "127.0.0.1"})
        unanswered = await no_reply(client)
    assert unanswered  # neither filter lets it through


def dual_stack_socket() -> socket.socket | None:
    """A listening IPv6 socket that accepts IPv4 too (IPV6_V6ONLY off), or None where
    the machine has no IPv6. (trio's own listeners are IPv6-only.)"""
    if not socket.has_ipv6:
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


async def test_ip_filter_unwraps_an_ipv4_client_of_a_dual_stack_socket():
    """An IPv4 client of a dual-stack socket has the peer address ::ffff:127.0.0.1: the
    filter for 127.0.0.1 must let it through. Without IPv6 on the machine, the same
    session path is driven through the in-process test client instead."""
    server = ip_guarded_server()
    sock = dual_stack_socket()
    if sock is None:  # pragma: no cover - no IPv6 here
        async with open_test_client(server, address="::ffff:127.0.0.1") as client:
            assert await client.request({"a": 1}) == {"via": "127.0.0.1", "address": "127.0.0.1"}
        return
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(server.serve, sockets=[sock]))
        async with AsyncClient(tls=False, timeout=5) as client:
            await client.connect("127.0.0.1", port)  # IPv4, into the IPv6 socket
            assert await client.request({"a": 1}) == {"via": "127.0.0.1", "address": "127.0.0.1"}
        server.request_shutdown()


# -- TLS ----------------------------------------------------------------------------------
@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_clients_verify_certificates_and_host_names_by_default(client_class):
    context = client_class()._tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client_class().tls is True  # TLS is on unless asked off


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_a_private_ca_still_verifies(client_class, tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = client_class(cafile=str(tmp_path / "ca.pem"))._tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True


def test_the_server_requires_client_certificates_with_cafile(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("certfile", "keyfile", "cafile")}
    cert.cert_chain_pems[0].write_to_path(paths["certfile"])
    cert.private_key_pem.write_to_path(paths["keyfile"])
    ca.cert_pem.write_to_path(paths["cafile"])

    mutual = Server(port=0, **paths)
    assert mutual.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert mutual.ssl_context.minimum_version >= ssl.TLSVersion.TLSv1_2
    plain_tls = Server(port=0, certfile=paths["certfile"], keyfile=paths["keyfile"])
    assert plain_tls.ssl_context.verify_mode == ssl.CERT_NONE  # no client certificate asked
