"""Redis URLs: which ones a store accepts, and the redis-py client each one gives.

A store URL is a setting people type (``store=``, ``ASYNCAPY_STORE``, ``asyncapy keys
--store``), so it is checked before anything connects, and a wrong one is refused with
the part that is wrong, never quoting the URL, which may hold a password
(:func:`check_url`). redis-py reads some broken URLs silently and wrongly, and has no
URL form at all for Sentinel or Cluster (several hosts are not a URL's authority):
:func:`_parse_multi` is ours.

:func:`connect` turns a checked URL into the client the stores are given: a redis-py
client over a bounded, health-checked pool for one node (``redis://``, ``rediss://``,
``unix://``), the Sentinel master of now (``redis+sentinel://``), or a
:class:`~asyncapy.adapters.redis_cluster.ClusterClient` (``redis+cluster://``). It
lives apart from the stores because the composition root and the CLI check URLs
without ever building a store.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any, Optional

import redis

from asyncapy.domain.redaction import redact

from .redis_cluster import ClusterClient

__all__ = ["check_url", "connect", "wait_replicas"]

DB_MAX = 2**31 - 1
"""The highest database number a URL may name (Redis's own bound on ``databases``)."""

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "rediss+sentinel", "rediss+cluster")
"""The URL schemes this parser reads: the Redis rows of the one table of store URLs,
:data:`asyncapy.adapters.store_urls.SCHEMES`, which describes them (their forms, the
docs' table, every message) and calls :func:`check_url` for them; a test holds the two
to the same names, so that the table depends on this parser and not the other way."""

SENTINELS = ("redis+sentinel", "rediss+sentinel")
CLUSTERS = ("redis+cluster", "rediss+cluster")
MULTI = SENTINELS + CLUSTERS

TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
"""The TLS options (query parameters) of ``rediss+sentinel://`` and ``rediss+cluster://``;
``rediss://`` takes them too, with the rest of redis-py's own."""

_CERT_REQS = ("required", "optional", "none")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

SENTINEL_PORT = 26379
CLUSTER_PORT = 6379

_DIGITS = re.compile(r"[0-9]+")


def _database(text: str, where: str) -> int:
    if not _DIGITS.fullmatch(text) or int(text) > DB_MAX:
        raise ValueError(f"the database in {where} is not an integer from 0 to {DB_MAX}")
    return int(text)


class _Multi:
    """The parts of a ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    __slots__ = ("scheme", "username", "password", "hosts", "service", "db", "wait_replicas", "tls")

    def __init__(self) -> None:
        self.scheme = ""
        self.username: Optional[str] = None
        self.password: Optional[str] = None
        self.hosts: list[tuple[str, int]] = []
        self.service = ""
        self.db = 0
        self.wait_replicas = 0
        self.tls: Optional[dict] = None
        """redis-py's TLS arguments (``ssl=True``, ``ssl_ca_certs``...) for a ``rediss+``
        URL, else ``None``."""


def _tls_options(query: dict) -> dict:
    """redis-py's TLS arguments from a URL's query (``{name: [values]}``), checked: a
    file that does not exist is refused now, not at the first connection; ``ValueError``
    naming the option, never quoting a value."""
    options: dict[str, Any] = {"ssl": True}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in query:
            path = query[name][0]
            if not path or not os.path.isfile(path):
                raise ValueError(f"{name} names no readable file")
            options[name] = path
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ValueError("ssl_keyfile without ssl_certfile (the client certificate)")
    if "ssl_cert_reqs" in query:
        reqs = query["ssl_cert_reqs"][0].lower()
        if reqs not in _CERT_REQS:
            raise ValueError("ssl_cert_reqs is not required, optional or none")
        options["ssl_cert_reqs"] = reqs
    if "ssl_check_hostname" in query:
        flag = _BOOLEANS.get(query["ssl_check_hostname"][0].lower())
        if flag is None:
            raise ValueError("ssl_check_hostname is not true or false")
        options["ssl_check_hostname"] = flag
    return options


def _parse_multi(url: str) -> _Multi:
    """Split a Sentinel or Cluster URL (``redis+`` or ``rediss+``), or say (``ValueError``, never quoting the URL,
    which may hold a password) which part is wrong. redis-py has no URL form for
    either: several hosts are not a URL's authority, so this parser is ours."""
    parts = _Multi()
    scheme, _, rest = url.partition("://")
    parts.scheme = scheme.lower()
    if "#" in rest:
        raise ValueError("a '#' in the URL: percent-encode it (%23) in a password")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    if "@" in path or "@" in query:
        raise ValueError("an '@' after the hosts: percent-encode / ? # @ in a user name or password")
    if at:
        user, colon, password = credentials.partition(":")
        parts.username = urllib.parse.unquote(user) or None
        parts.password = urllib.parse.unquote(password) if colon else None
        if parts.password is None and parts.username is not None:
            # redis://PASSWORD@host is redis-py's reading of a lone credential; the same here
            parts.password, parts.username = parts.username, None
    sentinel = parts.scheme in SENTINELS
    default = SENTINEL_PORT if sentinel else CLUSTER_PORT
    if not hosts:
        raise ValueError("no HOST[:PORT] before the path")
    for entry in hosts.split(","):
        if entry.startswith("["):  # [IPv6]:PORT
            host, bracket, port = entry[1:].partition("]")
            if not bracket or (port and not port.startswith(":")):
                raise ValueError("an IPv6 host not written [ADDRESS]:PORT")
            port = port[1:]
        else:
            host, _, port = entry.partition(":")
        if not host or any(c in host for c in " []"):
            raise ValueError("an empty or malformed host in the host list")
        if port == "":
            number = default
        elif _DIGITS.fullmatch(port) and 1 <= int(port) <= 65535:
            number = int(port)
        else:
            raise ValueError("a port that is not a number from 1 to 65535")
        parts.hosts.append((host, number))
    segments = [urllib.parse.unquote(segment) for segment in path.split("/")] if slash else []
    if sentinel:
        if not segments or not segments[0]:
            raise ValueError(f"the service name is missing: {parts.scheme}://HOSTS/SERVICE")
        parts.service = segments[0]
        if len(segments) > 2:
            raise ValueError("more than /SERVICE/DB after the hosts")
        if len(segments) == 2 and segments[1]:
            parts.db = _database(segments[1], "the path")
    elif segments not in ([], [""]):
        raise ValueError(f"a path in a {parts.scheme}:// URL: a cluster has database 0 only")
    options = urllib.parse.parse_qs(query, keep_blank_values=True) if query else {}
    tls = parts.scheme.startswith("rediss")
    for name, values in options.items():
        if name == "wait_replicas" and sentinel:
            if not _DIGITS.fullmatch(values[0]) or int(values[0]) > 100:
                raise ValueError("wait_replicas is not an integer from 0 to 100")
            parts.wait_replicas = int(values[0])
        elif name not in TLS_QUERY:
            raise ValueError(f"an unknown query parameter {name!r}")
        elif not tls:
            raise ValueError(f"a TLS option ({name}) in a {parts.scheme}:// URL: write {parts.scheme.replace('redis', 'rediss', 1)}://")
    if tls:
        parts.tls = _tls_options(options)
    return parts


def _check_parts(url: str) -> None:
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in SCHEMES:
        raise ValueError(f"the scheme is not one of {', '.join(SCHEMES)}")
    if scheme in MULTI:
        _parse_multi(url)
        return
    parts = urllib.parse.urlparse(url)
    if "#" in url:
        raise ValueError("a '#' in the URL: percent-encode it (%23) in a password")
    after_host = parts.query if scheme == "unix" else parts.path + parts.query
    if "@" in after_host:
        raise ValueError("an '@' after the host: percent-encode / ? # @ in a user name or password")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if "db" in query:
        _database(query["db"][0], "?db=")
    if scheme == "rediss":
        _tls_options(query)
    elif any(name.startswith("ssl") for name in query):
        raise ValueError(f"a TLS option in a {scheme}:// URL: write rediss://")
    if scheme == "unix":
        if parts.netloc.rpartition("@")[2]:
            raise ValueError("a host in a unix:// URL: the path follows a third slash, unix:///PATH")
        if not parts.path:
            raise ValueError("the socket path is missing: unix:///PATH")
        return
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    path = urllib.parse.unquote(parts.path)
    if path not in ("", "/"):
        _database(path[1:], "the path")


def _pool(url: str, max_connections: int = 16, timeout: float = 2.0) -> redis.BlockingConnectionPool:
    _check_parts(url)
    try:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=15,
            retry_on_timeout=False,
        )
    except ValueError as exc:  # its messages name a query parameter, never the URL
        raise ValueError(redact(str(exc))) from None
    try:  # a connection object (no socket yet) takes the query's parameters: or not
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        match = re.search(r"keyword argument '(\w+)'", str(exc))
        name = f" {match.group(1)!r}" if match else ""
        raise ValueError(f"an unknown query parameter{name}") from None
    return pool


def check_url(url: str) -> None:
    """Refuse (:class:`ValueError`) a Redis ``url`` that is not one of the forms of
    :data:`asyncapy.adapters.store_urls.URL_FORMS`.

    redis-py reads some broken URLs without complaint, and wrongly: a database that is
    not a number (``/abc``) silently becomes database 0, a negative one -1, a password
    with an unencoded ``/`` leaves part of itself in the path; and a query parameter
    it does not know fails only at the first command. All are refused here, before
    anything connects. The message says which part is wrong and never quotes the URL,
    which may hold a password.
    """
    if url.partition("://")[0].lower() in MULTI:
        _parse_multi(url)
    else:
        _pool(url)


def wait_replicas(url: str) -> int:
    """The ``wait_replicas`` of a Sentinel URL (0 for any other URL): how many replicas
    must confirm each API-key write (Redis ``WAIT``)."""
    if url.partition("://")[0].lower() not in SENTINELS:
        return 0
    return _parse_multi(url).wait_replicas


def connect(url: str, max_connections: int = 16, timeout: float = 2.0) -> Any:
    """A redis-py client for ``url`` with a bounded, health-checked connection pool.

    ``timeout`` bounds connecting and every command, so an unreachable Redis turns
    into :class:`StoreUnavailable` promptly instead of a hung thread. A ``url`` that
    :func:`check_url` refuses is a :class:`ValueError` (no connection is attempted).

    A ``redis+sentinel://`` URL gives a client of the service's master as the
    sentinels name it *now*: each new connection asks them (redis-py's
    ``Sentinel.master_for``), so after a failover the next connection goes to the new
    master. A ``redis+cluster://`` URL gives a :class:`ClusterClient`. Neither
    connects before its first command, like the others. Their ``rediss+`` forms speak
    TLS to every node (the sentinels, the master, each cluster node) with the URL's
    TLS options.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in CLUSTERS:
        parts = _parse_multi(url)
        return ClusterClient(
            parts.hosts, username=parts.username, password=parts.password,
            max_connections=max_connections, timeout=timeout, location=_location(parts),
            tls=parts.tls,
        )
    if scheme in SENTINELS:
        from redis.sentinel import Sentinel

        parts = _parse_multi(url)
        tls = parts.tls or {}
        sentinels = Sentinel(
            parts.hosts,
            # The sentinels themselves are asked without credentials (theirs are not
            # the data nodes'); the URL's user and password are the master's. TLS
            # (rediss+sentinel://) goes to both.
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, **tls},
        )
        client = sentinels.master_for(
            parts.service,
            db=parts.db,
            username=parts.username,
            password=parts.password,
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=15,
            retry_on_timeout=False,
            **tls,
        )
        client.asyncapy_location = _location(parts)
        return client
    return redis.Redis(connection_pool=_pool(url, max_connections, timeout))


def _location(parts: _Multi) -> str:
    """A Sentinel or Cluster URL rebuilt without its credentials, for logs."""
    hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parts.hosts)
    if parts.scheme in SENTINELS:
        return f"{parts.scheme}://{hosts}/{parts.service}/{parts.db}"
    return f"{parts.scheme}://{hosts}"
