"""The one table of store URL schemes (:mod:`asyncapy.adapters.store_urls`): every text
that lists the schemes (the error messages, ``--help`` of ``asyncapy run`` and
``asyncapy keys``, the reference pages) names each of them, and every refusal is one
short line with a good URL of the scheme given. Nothing connects here."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from asyncapy import stores
from asyncapy.__main__ import main
from asyncapy.adapters import redis_urls, store_urls
from asyncapy.config import SETTINGS, ConfigError, validate

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _help(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*args, "--help"])
    return "".join(out.getvalue().split())  # argparse wraps lines, even inside a URL form


def test_every_scheme_has_a_good_example_that_passes_its_own_check():
    for scheme in store_urls.SCHEMES:
        if "ssl_ca_certs" in scheme.example:
            continue  # names a file: checked with a real one below
        assert store_urls.check(scheme.example) is scheme
        assert validate("store", scheme.example) == scheme.example


def test_tls_examples_pass_with_a_ca_file_that_exists(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed before connecting")
    for scheme in store_urls.SCHEMES:
        if scheme.tls:
            assert store_urls.check(scheme.example.replace("ca.pem", str(ca))) is scheme


def test_every_text_that_lists_the_schemes_comes_from_the_table():
    names = [scheme.name for scheme in store_urls.SCHEMES]
    assert redis_urls.SCHEMES == store_urls.REDIS_SCHEMES == tuple(n for n in names if n not in ("memory", "sqlite"))
    run_help, keys_help = _help("run"), _help("keys", "issue")
    for scheme in store_urls.SCHEMES:
        prefix = scheme.prefix
        assert prefix in stores.STORE_ACCEPTED and prefix in stores.KEY_STORE_ACCEPTED
        assert scheme.form in store_urls.grammar()
        assert prefix in run_help, prefix
        if scheme.name != "memory":
            assert prefix in keys_help, prefix
        assert prefix in (DOCS / "cli.md").read_text(), prefix
        row = f"| `{prefix}` | `{scheme.form}` | {scheme.note} |"
        assert row in (DOCS / "configuration.md").read_text(), row  # the table of store URLs
    assert SETTINGS["store"].accepted == store_urls.ACCEPTED


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:hunter2@db/keys",
        "localhost:6379",
        "redis://:hunter2@h:bad/0",
        "rediss://:hunter2@h:6380/0?ssl_ca_certs=/no/such/ca.pem",
        "rediss://:hunter2@h:6380/0?ssl_cert_reqs=maybe",
        "rediss+sentinel://:hunter2@s1/svc?ssl_certfile=/no/such/cert.pem",
        "rediss+sentinel://:hunter2@s1/svc?ssl_check_hostname=perhaps",
        "rediss+cluster://:hunter2@n1?ssl_ca_certs=",
        "redis+cluster://:hunter2@n1?ssl_ca_certs=/etc/hosts",
        "redis://:hunter2@h/0?ssl_cert_reqs=none",
        "sqlite://host/keys.db",
        "sqlite:///:memory:",
    ],
)
def test_a_refusal_is_one_short_line_with_the_reason_and_an_example(url):
    with pytest.raises(ConfigError) as caught:
        validate("store", url, "--store")
    message = str(caught.value)
    assert message.startswith("invalid store in --store: ")
    assert caught.value.reason and "e.g. " + store_urls.example(url) in message
    assert len(message) < 300 and "\n" not in message and "hunter2" not in message


def test_tls_options_reach_redis_py_and_plain_forms_refuse_them(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    parts = redis_urls._parse_multi(f"rediss+cluster://n1,n2:7001?ssl_ca_certs={ca}&ssl_cert_reqs=REQUIRED")
    assert parts.tls == {"ssl": True, "ssl_ca_certs": str(ca), "ssl_cert_reqs": "required"}
    parts = redis_urls._parse_multi(f"rediss+sentinel://s1/svc/2?wait_replicas=1&ssl_ca_certs={ca}")
    assert (parts.service, parts.db, parts.wait_replicas, parts.tls["ssl_ca_certs"]) == ("svc", 2, 1, str(ca))
    assert redis_urls._parse_multi("redis+cluster://n1").tls is None
    assert redis_urls.wait_replicas(f"rediss+sentinel://s1/svc?wait_replicas=2&ssl_ca_certs={ca}") == 2
    client = redis_urls.connect(f"rediss+sentinel://:pw@127.0.0.1:1/svc?ssl_ca_certs={ca}")
    assert client.asyncapy_location == "rediss+sentinel://127.0.0.1:1/svc/0"  # no password
    assert "SSL" in client.connection_pool.connection_class.__name__


def test_an_sqlite_store_serves_sessions_in_the_process(tmp_path):
    from asyncapy.adapters.memory import MemorySessionStore

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    assert isinstance(stores.open_session_store(url), MemorySessionStore)
    assert not (tmp_path / "keys.db").exists()  # a session store opens no key file


@pytest.mark.parametrize(
    "page, url, source, prefix",
    [
        ("configuration.md", "postgres://db/keys", "", ""),
        ("configuration.md", "redis://:hunter2@10.0.0.5:6379/abc", "app.ini", ""),
        ("security.md", "redis://:hunter2@127.0.0.1:bad/0", "--store", "asyncapy: "),
    ],
)
def test_the_store_errors_the_docs_quote_are_the_messages(page, url, source, prefix):
    with pytest.raises(ConfigError) as caught:
        validate("store", url, source)
    assert prefix + str(caught.value) in (DOCS / page).read_text().splitlines()
