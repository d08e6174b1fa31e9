"""Settings of a :class:`~asyncapy.server.Server`: validation and INI loading.

One table, :data:`SETTINGS`, describes every setting once: its default, how to read
it from an INI string, and what values it accepts. The constructor's arguments and the
``[AsyncAPY]`` section of a config file go through the same checks, so a bad value
always fails the same way: :class:`ConfigError` naming the key, the value, and what
is accepted.
"""

from __future__ import annotations

import configparser
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import attrs

from asyncapy.adapters import store_urls
from asyncapy.domain.limits import DEFAULT_PACKET_MEMORY, SERVER_MAX_PACKET_SIZE
from asyncapy.domain.proxy import TrustedProxies
from asyncapy.domain.ratelimit import RATE_FORMS, Rate, parse_rate
from asyncapy.domain.redaction import MASK, looks_secret, redact, redact_url
from asyncapy.domain.throttle import DEFAULT_KEY_FAILURE_BURST, DEFAULT_KEY_FAILURE_LIMIT

__all__ = [
    "ConfigError",
    "Setting",
    "SETTINGS",
    "Settings",
    "SECTION",
    "validate",
    "make_settings",
    "load_config",
    "check_proxy_settings",
]

SECTION = "AsyncAPY"
"""The INI section the server reads."""


URL_SETTINGS = frozenset({"store"})
"""Settings whose values are URLs: shown through
:func:`~asyncapy.domain.redaction.redact_url`, which takes all that stands before the
last ``@`` for credentials, however broken the rest is."""


class ConfigError(ValueError):
    """A setting has a wrong type or value; the message says which, and what is accepted.

    The value is shown (and kept in :attr:`value`) with its credentials masked by
    :func:`~asyncapy.domain.redaction.redact`: a store URL's password never reaches the
    message, a log or the terminal, even when the URL is too broken to parse or sits
    under a misspelt key. A setting whose name says it is a secret (``password``...) is
    not shown at all.

    :param reason: what is wrong, when ``accepted`` alone does not say (``the port is
        not a number``); never a quote of the value.
    """

    def __init__(self, key: str, value: Any, accepted: str, source: str = "", *, reason: str = "") -> None:
        where = f" in {source}" if source else ""
        if looks_secret(str(key)):
            value = MASK
        elif isinstance(value, str):
            value = redact_url(value) if key in URL_SETTINGS else redact(value)
        shown = redact(repr(value))  # an object's repr may quote a URL too
        because = f" ({reason})" if reason else ""
        super().__init__(f"invalid {key}{where}: {shown}{because}; accepted: {accepted}")
        self.key = key
        self.value = value
        self.accepted = accepted
        self.reason = reason


class _Refused(ValueError):
    """A checker's refusal that says why; its message never quotes the value."""


@attrs.frozen
class Setting:
    """One setting: default, checker (value -> value, or ``ValueError``), INI reader."""

    name: str
    default: Any
    accepted: str
    check: Callable[[Any], Any]
    parse: Callable[[str], Any]


# -- checkers: return the normalised value or raise ValueError/TypeError -------------
def _integer(low: int, high: Optional[int] = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or value < low or (high is not None and value > high):
            raise ValueError(value)
        return value

    return check


def _number(low: float, inclusive: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(value)
        if value < low or (not inclusive and value == low):
            raise ValueError(value)
        number: float = value  # an int or a float, as given (checked above)
        return number

    return check


def _optional_number(low: float, inclusive: bool) -> Callable[[Any], Optional[float]]:
    number = _number(low, inclusive)

    def check(value: Any) -> Optional[float]:
        return None if value is None else number(value)

    return check


def _optional_port(value: Any) -> Optional[int]:
    return None if value is None else _integer(0, 65535)(value)


def _choice(*choices: Any) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        # Same type too: 4.0 == 4 and True == 1, but a float header size is no size.
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            raise ValueError(value)
        return value

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(value)
    return value


def _optional_path(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(value)
    return os.fspath(value)


def _store_url(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(value)
    try:
        store_urls.check(value)  # the one table of URL schemes, with their parsers
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    return value


_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
"""The level names a setting accepts, and their numbers."""


def _logging_level(value: Any) -> int:
    if isinstance(value, str) and value.upper() in _LEVELS:
        return _LEVELS[value.upper()]
    if type(value) is int and 0 <= value <= 50:
        return value
    raise ValueError(value)


def _boolean(value: Any) -> bool:
    if type(value) is not bool:  # 1 and "yes" are no booleans; a file's "yes" is read as one
        raise ValueError(value)
    return value


def _trusted_proxies(value: Any) -> TrustedProxies:
    if isinstance(value, TrustedProxies):
        return value
    if not isinstance(value, (str, list, tuple, set, frozenset)):
        raise ValueError(value)
    try:
        return TrustedProxies(value)
    except ValueError as exc:  # it names the bad entry: an address is no secret
        entry = exc.args[0] if exc.args else value
        raise _Refused(f"{entry!r} is no IP address or CIDR network without host bits") from None


def _optional_rate(value: Any) -> Optional[Rate]:
    if value is None or isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    try:
        return parse_rate(value)
    except ValueError as exc:  # the parser's text quotes the value; ConfigError shows it
        text = str(exc)
        if "allows nothing" in text:
            raise _Refused("a rate allows at least 1 request per period") from None
        if "faster than" in text:
            raise _Refused(text[text.index("faster than"):]) from None
        raise ValueError(value) from None


# -- INI readers: str -> raw value, then the checker above ---------------------------
def _read_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def _read_number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _read_optional_number(text: str) -> Any:
    return _read_number(text) if text else None


def _read_level(text: str) -> Any:
    return _read_int(text) if text.strip().lstrip("-").isdigit() else text


def _read_text(text: str) -> str:
    return text


def _read_optional(text: str) -> Optional[str]:
    return text or None


def _read_optional_int(text: str) -> Any:
    return _read_int(text) if text else None


def _read_boolean(text: str) -> Any:
    return configparser.ConfigParser.BOOLEAN_STATES.get(text.lower(), text)


SETTINGS: Mapping[str, Setting] = {
    s.name: s
    for s in (
        Setting("addr", "127.0.0.1", "a non-empty host name or IP address", _text, _read_text),
        Setting("port", 8081, "an integer from 0 to 65535", _integer(0, 65535), _read_int),
        Setting("buf", 1024, "an integer of at least 1 (bytes per read)", _integer(1), _read_int),
        Setting(
            "logging_level",
            logging.INFO,
            "an integer from 0 to 50 or one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
            _logging_level,
            _read_level,
        ),
        Setting(
            "console_format",
            "[%(levelname)s] %(asctime)s %(message)s",
            "a non-empty logging format string",
            _text,
            _read_text,
        ),
        Setting("datefmt", "%d/%m/%Y %H:%M:%S %p", "a non-empty strftime format", _text, _read_text),
        Setting("timeout", 60, "a number of seconds greater than 0", _number(0, False), _read_number),
        Setting("header_size", 4, "2, 4 or 8", _choice(2, 4, 8), _read_int),
        Setting("byteorder", "big", "'big' or 'little'", _choice("big", "little"), _read_text),
        Setting("session_limit", 0, "an integer of at least 0 (0 = no limit)", _integer(0), _read_int),
        Setting(
            "max_packet_size",
            SERVER_MAX_PACKET_SIZE,
            "an integer of at least 2 (bytes of Content-Length)",
            _integer(2),
            _read_int,
        ),
        Setting(
            "max_packet_memory",
            DEFAULT_PACKET_MEMORY,
            "an integer of at least 0 (bytes that packets above 16 KiB may hold at once)",
            _integer(0),
            _read_int,
        ),
        Setting("encoding", "json", "'json' or 'ziproto'", _choice("json", "ziproto"), _read_text),
        Setting("certfile", None, "a path to a PEM certificate chain, or nothing", _optional_path, _read_optional),
        Setting("keyfile", None, "a path to a PEM private key, or nothing", _optional_path, _read_optional),
        Setting("cafile", None, "a path to PEM CA certificates, or nothing", _optional_path, _read_optional),
        Setting(
            "store",
            None,
            store_urls.ACCEPTED,
            lambda value: _store_url(value),
            _read_optional,
        ),
        Setting(
            "session_lease",
            30.0,
            "a number of seconds of at least 1",
            _number(1, True),
            _read_number,
        ),
        Setting(
            "shutdown_grace",
            10.0,
            "a number of seconds of at least 0",
            _number(0, True),
            _read_number,
        ),
        Setting(
            "max_connections",
            10_000,
            "an integer of at least 1",
            _integer(1),
            _read_int,
        ),
        Setting(
            "handler_timeout",
            None,
            "a number of seconds greater than 0, or nothing (no deadline)",
            _optional_number(0, False),
            _read_optional_number,
        ),
        Setting(
            "max_protocol_errors",
            100,
            "an integer of at least 0 (0 = never close for them)",
            _integer(0),
            _read_int,
        ),
        Setting(
            "store_timeout",
            5.0,
            "a number of seconds greater than 0",
            _number(0, False),
            _read_number,
        ),
        Setting(
            "session_limit_ipv6_prefix",
            64,
            "an integer from 0 to 128 (bits of an IPv6 address that name one client)",
            _integer(0, 128),
            _read_int,
        ),
        Setting(
            "log_format",
            "text",
            "'text' (console_format) or 'json' (one JSON object a line)",
            _choice("text", "json"),
            _read_text,
        ),
        Setting(
            "metrics_port",
            None,
            "an integer from 0 to 65535 (0: any free port), or nothing (no metrics endpoint)",
            _optional_port,
            _read_optional_int,
        ),
        Setting(
            "metrics_host",
            "127.0.0.1",
            "a non-empty host name or IP address",
            _text,
            _read_text,
        ),
        Setting(
            "proxy_protocol",
            False,
            "True or False (in a config file also yes/no, on/off, 1/0): whether every "
            "connection starts with a PROXY protocol header (v1 or v2) from a trusted proxy",
            _boolean,
            _read_boolean,
        ),
        Setting(
            "insecure_trust_any_proxy",
            False,
            "True or False (in a config file also yes/no, on/off, 1/0): whether "
            "trusted_proxies may cover every address (any peer may then forge its address)",
            _boolean,
            _read_boolean,
        ),
        Setting(
            "handshake_timeout",
            10.0,
            "a number of seconds greater than 0 (capped by timeout)",
            _number(0, False),
            _read_number,
        ),
        Setting(
            "large_packet_timeout",
            30.0,
            "a number of seconds greater than 0 (capped by timeout)",
            _number(0, False),
            _read_number,
        ),
        Setting(
            "handshake_limit",
            16,
            "an integer of at least 1 (TLS handshakes one client may have in progress "
            "at once when session_limit is 0)",
            _integer(1),
            _read_int,
        ),
        Setting(
            "trusted_proxies",
            TrustedProxies(),
            "IP addresses and CIDR networks, IPv4 or IPv6 (e.g. 10.0.0.5, 10.0.0.0/8, "
            "fd00::/8), as a list or one string separated by commas; a network without "
            "host bits set; no host names",
            _trusted_proxies,
            _read_text,
        ),
        # Fair share per client (docs/guide-rate-limits.md). Validated here; the serving
        # layer applies them.
        Setting(
            "rate_limit",
            None,
            f"nothing (no limit) or a rate per client address: {RATE_FORMS}",
            _optional_rate,
            _read_optional,
        ),
        Setting(
            "rate_burst",
            0,
            "an integer of at least 0 (requests allowed at once above rate_limit)",
            _integer(0),
            _read_int,
        ),
        Setting(
            "key_failure_limit",
            parse_rate(DEFAULT_KEY_FAILURE_LIMIT),
            f"nothing (no throttle) or the failed API-key checks an address may make: {RATE_FORMS.replace('100/s', '10/s')}",
            _optional_rate,
            _read_optional,
        ),
        Setting(
            "key_failure_burst",
            DEFAULT_KEY_FAILURE_BURST,
            "an integer of at least 0 (failed API-key checks allowed at once above key_failure_limit)",
            _integer(0),
            _read_int,
        ),
        Setting(
            "reactor",
            True,
            "True or False (in a config file also yes/no, on/off, 1/0): whether plain-TCP "
            "sessions are served by one reactor task over epoll where it exists (Linux), or "
            "each by a task of its own",
            _boolean,
            _read_boolean,
        ),
    )
}
"""Every setting, by name: the constructor's parameters and the INI keys alike."""


def _shown(name: str) -> Callable[[Any], str]:
    """How :class:`Settings`' repr shows setting ``name``'s value: URLs without their
    credentials."""
    if name in URL_SETTINGS:
        return lambda value: repr(redact_url(value)) if isinstance(value, str) else repr(value)
    return repr


if TYPE_CHECKING:
    # What attrs.make_class below builds from SETTINGS, spelled out for type checkers,
    # which cannot run it: each attribute's type is what its checker returns.
    # tests/unit/test_typing_declarations.py holds the names equal to SETTINGS'.
    @attrs.frozen
    class Settings:
        addr: str
        port: int
        buf: int
        logging_level: int
        console_format: str
        datefmt: str
        timeout: float
        header_size: int
        byteorder: str
        session_limit: int
        max_packet_size: int
        max_packet_memory: int
        encoding: str
        certfile: Optional[str]
        keyfile: Optional[str]
        cafile: Optional[str]
        store: Optional[str]
        session_lease: float
        shutdown_grace: float
        max_connections: int
        handler_timeout: Optional[float]
        max_protocol_errors: int
        store_timeout: float
        session_limit_ipv6_prefix: int
        log_format: str
        metrics_port: Optional[int]
        metrics_host: str
        proxy_protocol: bool
        insecure_trust_any_proxy: bool
        handshake_timeout: float
        large_packet_timeout: float
        handshake_limit: int
        trusted_proxies: TrustedProxies
        rate_limit: Optional[Rate]
        rate_burst: int
        key_failure_limit: Optional[Rate]
        key_failure_burst: int
        reactor: bool

else:
    Settings = attrs.make_class(
        "Settings",
        {name: attrs.field(default=setting.default, repr=_shown(name)) for name, setting in SETTINGS.items()},
        frozen=True,
        slots=True,
        eq=True,
    )
Settings.__module__ = __name__
Settings.__doc__ = """A server's settings, validated, as one frozen object: one attribute per
entry of :data:`SETTINGS` (``settings.timeout``, ``settings.session_limit``...).

Made once by :func:`make_settings` from the constructor's arguments and a config file,
and handed to every part of the server that reads settings; a change (assigning
``server.timeout``, :meth:`~asyncapy.server.Server.load_config`) makes a new one. Its
repr never shows a store URL's password."""


def make_settings(values: Mapping[str, Any] = {}, source: str = "", base: Optional[Settings] = None) -> Settings:
    """A :class:`Settings` with ``values`` validated (:class:`ConfigError` naming the
    first bad one and ``source``), the rest from ``base`` (a :class:`Settings`) or
    the defaults."""
    checked = {name: validate(name, value, source) for name, value in values.items()}
    if base is None:
        return Settings(**checked)
    return attrs.evolve(base, **checked)


def validate(name: str, value: Any, source: str = "") -> Any:
    """``value`` checked (and normalised) for setting ``name``; :class:`ConfigError` if bad."""
    setting = SETTINGS[name]
    try:
        return setting.check(value)
    except _Refused as exc:
        raise ConfigError(name, value, setting.accepted, source, reason=str(exc)) from None
    except (ValueError, TypeError):
        raise ConfigError(name, value, setting.accepted, source) from None


def _ini_problem(exc: configparser.Error) -> str:
    """What is wrong with an INI file, by line number, never quoting a line: the file
    may be something else (a ``.env`` file given as ``--config``) full of secrets."""
    lineno = getattr(exc, "lineno", None)
    line = f" (line {lineno})" if lineno else ""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno} comes before any [section] header"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"section [{redact(exc.section)}] appears twice{line}"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"key {redact(exc.option)!r} appears twice in [{redact(exc.section)}]{line}"
    if isinstance(exc, configparser.ParsingError):
        numbers = ", ".join(str(number) for number, _ in exc.errors)
        return f"cannot parse line {numbers}"
    return type(exc).__name__


def _interpolation_problem(exc: configparser.Error) -> str:
    """Why interpolation failed, without configparser's message, which quotes the value."""
    if isinstance(exc, configparser.InterpolationMissingOptionError):
        return f"it refers to {redact(exc.reference)!r}, which is no option"
    if isinstance(exc, configparser.InterpolationDepthError):
        return "references nested too deeply"
    if isinstance(exc, configparser.InterpolationSyntaxError):
        return "a % not followed by % or ("
    return type(exc).__name__


def check_proxy_settings(
    proxy_protocol: bool, trusted_proxies: TrustedProxies, source: str = "", *, trust_any: bool = False
) -> None:
    """:class:`ConfigError` if ``proxy_protocol`` is on without a trusted proxy, or with
    ``trusted_proxies`` covering every address of a family unless ``trust_any``
    (``insecure_trust_any_proxy``) says that is meant.

    The settings can come from different places (the constructor, a config file, the
    command line), so this is checked once they are merged. A PROXY header is believed
    only from a trusted proxy: with none, every connection would be refused; with every
    address trusted, any peer can claim any address (Traefik makes the same choice an
    explicit ``insecure`` one).
    """
    covered = trusted_proxies.covers_everything() if proxy_protocol else None
    if covered and not trust_any:
        raise ConfigError(
            "trusted_proxies",
            list(trusted_proxies),
            "the addresses of your proxies only: these entries cover every "
            f"{covered} address, so any peer could send a PROXY header and claim any "
            "client address. Name the load balancers' addresses or networks, or set "
            "insecure_trust_any_proxy if every peer really is a proxy",
            source,
        )
    if proxy_protocol and not trusted_proxies:
        raise ConfigError(
            "trusted_proxies",
            list(trusted_proxies),
            "at least one proxy's IP address or CIDR network, since proxy_protocol is on "
            "(a PROXY header is believed only from a trusted proxy, so with none every "
            "connection would be refused)",
            source,
        )


def _unknown_key(key: str) -> str:
    """What a config file may say instead of the unknown ``key``: the nearest setting
    name when one is close (``prot``: did you mean 'port'?), else every name."""
    import difflib

    close = difflib.get_close_matches(key, list(SETTINGS), n=1, cutoff=0.6)
    if close:
        return f"a setting name: did you mean {close[0]!r}? (every setting: docs/configuration.md)"
    return f"one of {', '.join(SETTINGS)}"


def load_config(
    path: Optional[str] = None,
    parser: Optional[configparser.ConfigParser] = None,
) -> dict[str, Any]:
    """Read and validate the ``[AsyncAPY]`` section; return ``{setting: value}``.

    ``parser`` is a user-supplied :class:`configparser.ConfigParser` (already loaded, or
    to be loaded from ``path``); by default a parser without interpolation is used, so
    logging formats such as ``%(message)s`` can be written as they are. Unknown keys
    are an error, not silently ignored.
    """
    if parser is None:
        parser = configparser.ConfigParser(interpolation=None)
    source = os.fspath(path) if path is not None else "the config parser"
    if path is not None:
        try:
            with open(path, encoding="utf-8") as file:
                parser.read_file(file)
        except OSError as exc:
            raise ConfigError("config", source, "a readable INI file") from exc
        except UnicodeDecodeError:
            raise ConfigError("config", source, "an INI file in UTF-8 text") from None
        except configparser.Error as exc:
            raise ConfigError("config", source, f"a valid INI file ({_ini_problem(exc)})") from None
    if not parser.has_section(SECTION):
        raise ConfigError("config", source, f"an INI file with an [{SECTION}] section")
    values: dict[str, Any] = {}
    for key in parser.options(SECTION):
        setting = SETTINGS.get(key)
        if setting is None and key in parser.defaults():
            continue  # inherited from [DEFAULT], meant for other sections
        if setting is None:
            raise ConfigError(key, parser.get(SECTION, key, raw=True), _unknown_key(key), source)
        try:
            raw = parser.get(SECTION, key).strip()
        except configparser.Error as exc:  # a user parser's interpolation failed
            raise ConfigError(
                key,
                parser.get(SECTION, key, raw=True),
                f"a value the config parser can read ({_interpolation_problem(exc)}); write "
                "%% for a literal %, or pass a parser made with interpolation=None",
                source,
            ) from None
        values[key] = validate(key, setting.parse(raw), source)
    return values
