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
import configparser
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
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncapy.util
from asyncapy import Filters, Server
from asyncapy.adapters.redis import RedisKeyStore
from asyncapy.client import AsyncClient, Client
from asyncapy.config import ConfigError, load_config
from asyncapy.domain.ports import KeyStore
from asyncapy.errors import StoreUnavailable
from asyncapy.testing import open_test_client
from asyncapy.util import KEY_ALPHABET, APIKeyFactory, fingerprint

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
        # Not a key of `keys`; `down` cannot tell: "retry later", and no handler runs.
        assert await client.request({"key": guessed}) == {"status": "failure", "error": "ERR_UNAVAILABLE"}

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


# -- no credential in any message ------------------------------------------------------------
# (docs/security.md, "Secrets in messages"; the command line's paths, as subprocesses, are in
# tests/e2e/test_cli_secrets.py)
PASSWORD = "S3cr3t-pw"
"""The password of the URLs below: no message may hold it."""

BROKEN_URLS = [
    f"redis://:{PASSWORD}@127.0.0.1:bad/0",  # the port is no number
    f"redis://:{PASSWORD}@127.0.0.1:6379/abc",  # nor the database
    f"redis://:{PASSWORD}@127.0.0.1:6379/-1",
    f"redis://:{PASSWORD}@127.0.0.1:6379/2147483648",
    f"redis://:{PASSWORD}@127.0.0.1:6379?db=x",
    f"redsi://:{PASSWORD}@127.0.0.1:6379/0",  # a mistyped scheme
    f"redis:/:{PASSWORD}@127.0.0.1:6379/0",  # a slash short: no "://" at all
    f":{PASSWORD}@127.0.0.1:6379/0",  # no scheme
    f"redis://alice:{PASSWORD}@127.0.0.1:0/0",
    f"redis://:{PASSWORD}/x@127.0.0.1:6379/0",  # an unencoded "/" in the password
    f"redis://:{PASSWORD}#x@127.0.0.1:6379/0",  # an unencoded "#"
    f"redis://:{PASSWORD}",  # no "@" and no host: the "port" is the password
    f"redis://127.0.0.1:6379/0?password={PASSWORD}&foo=1",  # an unknown query parameter
    f"unix://:{PASSWORD}@run/redis.sock",  # two slashes: "run" would be a host
    f"rediss://:{PASSWORD}@127.0.0.1:6380/0?db=-2",
]


def chain(exc: BaseException) -> str:
    """The messages of ``exc`` and of every exception it was raised from or during."""
    texts = []
    seen: BaseException | None = exc
    while seen is not None:
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "\n".join(texts)


def assert_hidden(exc: BaseException) -> str:
    """The message of ``exc``, asserted free of :data:`PASSWORD` along its whole chain."""
    text = chain(exc)
    assert PASSWORD not in text, text
    assert PASSWORD not in repr(getattr(exc, "value", None))
    return str(exc)


def test_redact_masks_credentials_and_keeps_the_rest():
    from asyncapy.domain.redaction import redact, redact_url

    examples = {
        "redis://:hunter2@10.0.0.5:6379/0": "redis://:***@10.0.0.5:6379/0",
        "rediss://alice:hunter2@cache:6380/2": "rediss://alice:***@cache:6380/2",
        "redis://hunter2@cache": "redis://***@cache",
        "redis://:hun@ter2@cache/0": "redis://:***@cache/0",  # the last "@" ends it
        "redis://:hun/ter2@cache/0": "redis://:***@cache/0",
        "redis:/:hunter2@cache/0": "redis:/:***@cache/0",
        ":hunter2@cache:6379": ":***@cache:6379",
        "redis://:hunter2": "redis://:***",
        "redis://cache:oops/0": "redis://cache:***/0",
        "unix:///run/redis.sock?db=1&password=hunter2": "unix:///run/redis.sock?db=1&password=***",
        "REDIS_PASSWORD=hunter2\nAPI_TOKEN: 'a b'\nPORT=1": "REDIS_PASSWORD=***\nAPI_TOKEN: '***'\nPORT=1",
        "invalid store: 'redis://:hunter2@h:1/0'": "invalid store: 'redis://:***@h:1/0'",
    }
    for text, expected in examples.items():
        assert redact(text) == expected, text
        assert redact(expected) == expected  # idempotent
    assert redact_url(":Pw Pw@127.0.0.1") == "***@127.0.0.1"
    assert redact_url("redis://alice:pw@host/0") == "redis://alice:***@host/0"
    assert redact("error: mail bob@example.com") == "error: mail bob@example.com"
    for clean in [
        "redis://127.0.0.1:6379/0",
        "redis://[::1]:6379/2",
        "unix:///run/redis.sock?db=3",
        "memory://",
        "Error 111 connecting to 127.0.0.1:6379. Connection refused.",
        "WRONGPASS invalid username-password pair or user is disabled.",
        "error: mail bob@example.com",
        "%(levelname)s %(message)s",
    ]:
        assert redact(clean) is clean


@settings(max_examples=300, deadline=None)
@given(
    secret=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1, max_size=20),
    form=st.sampled_from(
        [
            "redis://{user}:{pw}@127.0.0.1:6379/0",
            "rediss://{user}:{pw}@cache.example:6380/15",
            "redis://:{pw}@[::1]:6379",
            "redsi://{user}:{pw}@127.0.0.1/0",
            "redis:/{user}:{pw}@127.0.0.1/0",
            "unix://{user}:{pw}@/run/redis.sock?db=2",
            "{user}:{pw}@127.0.0.1",
            "redis://127.0.0.1/0?password={pw}",
        ]
    ),
    user=st.sampled_from(["", "alice", "svc-1.cache"]),
)
def test_redact_hides_any_password_in_any_url_form(secret, form, user):
    """Whatever the password holds (an unencoded "/", "@", "#", spaces, quotes...), and
    however the URL around it is mistyped. A marker makes it distinct from the rest."""
    from asyncapy.domain.redaction import redact, redact_url

    password = f"Pw{secret}Pw"
    if "password=" in form:  # a query value ends at "&" or a blank, as a parser sees it
        password = "Pw" + "".join(c for c in secret if c not in "&;,'\" \t") + "Pw"
    url = form.format(user=user, pw=password)
    for text in (url, repr(url), f"{url} and more"):
        # With no scheme, redact() takes only the word before "@" for credentials
        # (prose stays readable); a value known to be a URL goes through redact_url().
        prose_like = form.startswith("{user}") and any(c.isspace() for c in password)
        if not prose_like:
            assert password not in redact(text), (url, redact(text))
        assert password not in redact_url(text), (url, redact_url(text))


@pytest.mark.parametrize("url", BROKEN_URLS)
def test_a_broken_store_url_is_a_config_error_without_the_password(url):
    """``Server(store=...)``, ``APIKeyFactory(store=...)``, the setting's own check and the
    Redis client of the URL: each a ConfigError naming ``store``, with the URL redacted
    in the message, in ``.value`` and along the chain."""
    from asyncapy.config import validate
    from asyncapy.stores import redis_client

    attempts = [
        lambda: Server(store=url),
        lambda: APIKeyFactory(store=url),
        lambda: validate("store", url, "--store"),
        lambda: redis_client(url),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError) as caught:
            attempt()
        message = assert_hidden(caught.value)
        assert message.startswith("invalid store"), message
        assert caught.value.key == "store"
        assert "***" in message or "@" not in url, message


def test_assigning_a_broken_store_url_to_a_server_hides_the_password():
    server = Server()
    for url in BROKEN_URLS:
        with pytest.raises(ConfigError) as caught:
            server.store = url
        assert_hidden(caught.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://127.0.0.1:6379/abc", "database"),
        ("redis://127.0.0.1:6379/-1", "database"),
        ("redis://127.0.0.1:6379/1.5", "database"),
        ("redis://127.0.0.1:6379/0/", "database"),
        ("redis://127.0.0.1:6379/2147483648", "database"),
        ("redis://127.0.0.1:6379?db=abc", "database"),
        ("unix:///run/redis.sock?db=-1", "database"),
        ("redis://127.0.0.1:bad/0", "port"),
        ("redis://127.0.0.1:0/0", "port"),
        ("redis://127.0.0.1:65536/0", "port"),
        ("redis://127.0.0.1:6379/0?foo=1", "unknown query parameter 'foo'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://:a/b@127.0.0.1/0", "percent-encode"),
        ("redis://:a#b@127.0.0.1/0", "%23"),
        ("unix://run/redis.sock", "unix:///PATH"),
        ("unix://", "socket path"),
        ("redis//127.0.0.1/0", "SCHEME://"),
        ("http://127.0.0.1/0", "scheme"),
    ],
)
def test_each_malformed_part_of_a_store_url_is_named(url, reason):
    """A database that is not a number once silently became database 0: every part
    redis-py would misread is a ConfigError naming the setting, what is wrong, and one
    good URL, in one short line (the full grammar is in --help)."""
    with pytest.raises(ConfigError) as caught:
        Server(store=url)
    message = str(caught.value)
    assert caught.value.key == "store"
    assert reason in caught.value.reason, message
    assert "e.g. unix:///" in message if url.startswith("unix") else "e.g. redis://localhost:6379/0" in message
    assert len(message) < 300 and "\n" not in message


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("redis://127.0.0.1:6379", 0),
        ("redis://127.0.0.1:6379/", 0),
        ("redis://127.0.0.1:6379/15", 15),
        ("redis://127.0.0.1/2147483647", 2147483647),
        ("redis://127.0.0.1:6379/0?db=3", 3),
        ("redis://:p%2Fw@127.0.0.1:6379/4", 4),  # a percent-encoded "/" in the password
        ("unix:///run/redis.sock?db=2", 2),
        ("unix://:pw@/run/redis.sock", 0),
    ],
)
def test_well_formed_store_urls_are_accepted_as_redis_reads_them(url, db):
    store = Server(store=url).store
    assert store.redis.connection_pool.connection_kwargs.get("db", 0) == db


def test_store_reprs_hold_no_password():
    for url in (f"redis://alice:{PASSWORD}@127.0.0.1:6379/3", f"unix://:{PASSWORD}@/run/redis.sock"):
        server = Server(store=url)
        factory = APIKeyFactory(store=url)
        for shown in (repr(server.store), repr(factory), repr(factory.store), repr(server.store.redis), str(server)):
            assert PASSWORD not in shown, shown
        assert "3" in repr(server.store) or "unix" in repr(server.store)


async def test_an_unreachable_store_fails_without_the_password():
    """``StoreUnavailable`` from a Redis that refuses connections: its message and its
    chain name the host and port only."""
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never listening
        port = dead.getsockname()[1]
        factory = APIKeyFactory(store=f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
        with pytest.raises(StoreUnavailable) as caught:
            await factory.acontains("x" * 32)
    assert f"127.0.0.1:{port}" in assert_hidden(caught.value)


def _ini(tmp_path, text: str) -> str:
    path = tmp_path / "settings.ini"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # a misspelt key whose value is a URL with a password
        (f"[AsyncAPY]\nstroe = redis://:{PASSWORD}@127.0.0.1:6379/0\n", "stroe"),
        # the right key, a broken URL
        (f"[AsyncAPY]\nstore = redis://:{PASSWORD}@127.0.0.1:6379/abc\n", "database"),
        (f"[AsyncAPY]\nstore = redsi://:{PASSWORD}@127.0.0.1\n", "scheme"),
        # a .env file given as the config: no section header, secrets on every line
        (f"REDIS_URL=redis://:{PASSWORD}@127.0.0.1:6379/0\nAPI_TOKEN={PASSWORD}\n", "line 1"),
        (f"[AsyncAPY]\nport = 1\nREDIS_URL\n{PASSWORD}\n", "valid INI file"),
        (f"[AsyncAPY]\n{PASSWORD} = 1\n{PASSWORD} = 2\n", "appears twice"),
        (f"[AsyncAPY]\nstore = redis://127.0.0.1/0\n[AsyncAPY]\npassword = {PASSWORD}\n", "appears twice"),
        # a secret-named key is not shown at all
        (f"[AsyncAPY]\nredis_password = {PASSWORD}\n", "redis_password"),
    ],
)
def test_config_files_never_echo_a_secret(tmp_path, text, fragment):
    path = _ini(tmp_path, text)
    for attempt in (lambda: load_config(path), lambda: Server(config=path)):
        with pytest.raises(ConfigError) as caught:
            attempt()
        message = assert_hidden(caught.value)
        assert fragment in message and path in message, message


def test_a_config_file_that_is_not_text_is_a_config_error(tmp_path):
    path = tmp_path / "binary.ini"
    path.write_bytes(b"\xff\xfe[AsyncAPY]\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(str(path))


def test_a_failed_interpolation_does_not_quote_the_value():
    """configparser's own message quotes the raw value; ours shows it redacted."""
    parser = configparser.ConfigParser()  # BasicInterpolation: a lone % is an error
    parser.read_string(f"[AsyncAPY]\nstore = redis://:{PASSWORD}%@127.0.0.1:6379/0\n")
    with pytest.raises(ConfigError) as caught:
        Server(cfg_parser=parser)
    message = assert_hidden(caught.value)
    assert "interpolation=None" in message and caught.value.key == "store"
