"""Store URL schemes: the one table of the URLs that name a store.

A store URL is typed by people in four places (``store=``, the config file,
``ASYNCAPY_STORE``, ``--store`` of ``asyncapy run`` and ``asyncapy keys``), and is
spelt back to them in error messages, ``--help`` and the docs. :data:`SCHEMES` says
once which schemes exist, what each looks like and what it holds; every one of those
texts is made from it (:func:`grammar`, :func:`listing`, :data:`ACCEPTED`), and
:func:`check` is the one check, which hands each URL to its adapter's own parser.

A refusal is short: what is wrong and one good URL of the same scheme, never a quote
of the URL (it may carry a password). The full grammar is for ``--help`` and the docs.
This module imports nothing heavy: the Redis and SQLite parsers load only when a URL of
theirs is checked.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs

__all__ = ["Scheme", "SCHEMES", "REDIS_SCHEMES", "URL_FORMS", "ACCEPTED", "scheme_of", "listing", "grammar", "check", "example"]

TLS_OPTIONS = (
    "?ssl_ca_certs=FILE (the CA to trust), ssl_certfile=FILE and ssl_keyfile=FILE (a client "
    "certificate), ssl_cert_reqs=required|optional|none, ssl_check_hostname=true|false"
)
"""The TLS options every TLS form takes, as query parameters."""


@attrs.frozen
class Scheme:
    """One store URL scheme: how it is written, one good example, and what it holds."""

    name: str
    """The scheme, lowercase, without ``://`` (``redis+sentinel``)."""
    form: str
    """Its grammar, for ``--help`` and the docs."""
    example: str
    """One good URL, shown when a URL of this scheme is refused."""
    note: str
    """What it names, in a few words."""
    sessions: bool = True
    """Whether it can hold sessions (``False``: API keys only)."""
    tls: bool = False
    """Whether it speaks TLS (and takes :data:`TLS_OPTIONS`)."""

    @property
    def prefix(self) -> str:
        """``name://``, as people write it."""
        return f"{self.name}://"


SCHEMES: tuple[Scheme, ...] = (
    Scheme("memory", "memory://", "memory://", "this process only"),
    Scheme(
        "redis", "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]", "redis://localhost:6379/0",
        "one Redis node, port 6379 by default",
    ),
    Scheme(
        "rediss", "rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?TLS OPTIONS]",
        "rediss://cache:6380/0?ssl_ca_certs=ca.pem", "one Redis node over TLS", tls=True,
    ),
    Scheme("unix", "unix://[[USER]:PASSWORD@]/PATH[?db=DB]", "unix:///run/redis/redis.sock?db=0", "one Redis node's socket"),
    Scheme(
        "redis+sentinel",
        "redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?wait_replicas=N]",
        "redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster",
        "the sentinels of a Redis master, port 26379 by default",
    ),
    Scheme(
        "redis+cluster", "redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]",
        "redis+cluster://n1:6379,n2:6379,n3:6379", "some nodes of a Redis Cluster, port 6379 by default",
    ),
    Scheme(
        "rediss+sentinel",
        "rediss+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?wait_replicas=N&TLS OPTIONS]",
        "rediss+sentinel://s1:26379,s2:26379/mymaster?ssl_ca_certs=ca.pem",
        "Sentinel over TLS, to the sentinels and to the master", tls=True,
    ),
    Scheme(
        "rediss+cluster", "rediss+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][?TLS OPTIONS]",
        "rediss+cluster://n1:6379,n2:6379?ssl_ca_certs=ca.pem",
        "a Redis Cluster over TLS, to every node", tls=True,
    ),
    Scheme(
        "sqlite", "sqlite:///PATH or sqlite:////ABSOLUTE/PATH[?timeout=SECONDS]", "sqlite:///keys.db",
        "API keys in a file on this machine; sessions stay in the process", sessions=False,
    ),
)
"""Every store URL scheme, in the order the texts list them."""

_BY_NAME = {scheme.name: scheme for scheme in SCHEMES}

REDIS_SCHEMES = tuple(s.name for s in SCHEMES if s.name not in ("memory", "sqlite"))
"""The schemes of Redis stores."""

ACCEPTED = "a store URL or object (every form: asyncapy run --help)"
"""What a ``store`` setting accepts, in an error message: short, the reason and its
example say the rest (:func:`check`)."""


def scheme_of(url: str) -> Optional[Scheme]:
    """The :class:`Scheme` of ``url`` (case-insensitive), or ``None``."""
    name, separator, _ = url.partition("://")
    return _BY_NAME.get(name.lower()) if separator else None


def listing(*, sessions: Optional[bool] = None) -> str:
    """The schemes as a list (``memory://, redis://, ... or sqlite://``); ``sessions=True``
    only those that hold sessions."""
    names = [s.prefix for s in SCHEMES if sessions is None or s.sessions == sessions]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def grammar(*, names: Optional[Sequence[str]] = None, separator: str = "; ") -> str:
    """Every form (or those of ``names``) with what it names, for ``--help`` and the docs."""
    forms = [f"{s.form} ({s.note})" for s in SCHEMES if names is None or s.name in names]
    tail = (
        f"TLS OPTIONS: {TLS_OPTIONS[1:]}; PORT from 1 to 65535, DB from 0 (16 databases by default); "
        "/ ? # @ % , in a user name or password percent-encoded"
    )
    return separator.join(forms + [tail])


URL_FORMS = grammar(names=REDIS_SCHEMES)
"""The URLs of Redis stores (what :func:`asyncapy.adapters.redis_urls.connect`
accepts), for ``--help``."""


def example(url: str = "") -> str:
    """One good URL: of ``url``'s scheme if it has a known one, else a ``redis://`` URL."""
    scheme = scheme_of(url)
    return (scheme or _BY_NAME["redis"]).example


def check(url: str) -> Scheme:
    """The :class:`Scheme` of ``url``, checked by its adapter's parser; else
    ``ValueError`` saying what is wrong and giving one good URL, never quoting ``url``."""
    scheme = scheme_of(url)
    if scheme is None:
        what = "no SCHEME:// at its start" if "://" not in url else "an unknown scheme"
        raise ValueError(f"{what}; known: {', '.join(s.name for s in SCHEMES)}; e.g. {example()}")
    try:
        if scheme.name == "sqlite":
            from .sqlite import parse_url

            parse_url(url)
        elif scheme.name != "memory":
            from .redis_urls import check_url

            check_url(url)
    except ValueError as exc:
        raise ValueError(f"{exc}; e.g. {scheme.example}") from None
    return scheme
