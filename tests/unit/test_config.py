"""Server settings: constructor validation and the ``[AsyncAPY]`` INI section.

Every bad value must fail the same way, wherever it comes from: a
:class:`~asyncapy.config.ConfigError` (a ``ValueError``) whose message names the
setting, the value and what is accepted.
"""

import configparser
import logging
import re

import pytest

from asyncapy.config import SETTINGS, ConfigError, load_config
from asyncapy.server import Server

BAD_ARGUMENTS = [
    ("port", 70000),
    ("port", -1),
    ("port", "8081"),
    ("port", 80.0),
    ("header_size", 3),
    ("header_size", 4.0),
    ("header_size", True),
    ("byteorder", "middle"),
    ("byteorder", "BIG"),
    ("timeout", 0),
    ("timeout", -1),
    ("timeout", "x"),
    ("timeout", float("nan")),
    ("timeout", True),
    ("session_limit", -1),
    ("session_limit", 1.5),
    ("encoding", "xml"),
    ("encoding", None),
    ("buf", 0),
    ("logging_level", "LOUD"),
    ("logging_level", 51),
    ("logging_level", -1),
    ("addr", ""),
    ("addr", 127),
    ("max_packet_size", 1),
    ("shutdown_grace", -0.5),
]


def _assert_names(exc: ConfigError, key: str, value, accepted: str) -> None:
    message = str(exc)
    assert key in message
    assert repr(value) in message
    assert accepted in message
    assert (exc.key, exc.accepted) == (key, accepted)


@pytest.mark.parametrize(("key", "value"), BAD_ARGUMENTS, ids=lambda v: repr(v))
def test_bad_argument_is_a_config_error_naming_key_value_and_accepted(key, value):
    with pytest.raises(ConfigError) as caught:
        Server(**{key: value})
    assert isinstance(caught.value, ValueError)
    _assert_names(caught.value, key, value, SETTINGS[key].accepted)
    assert caught.value.value is value


def test_accepted_values_are_spelled_out():
    messages = {}
    for key, value in [("header_size", 3), ("byteorder", "middle"), ("encoding", "xml")]:
        with pytest.raises(ConfigError) as caught:
            Server(**{key: value})
        messages[key] = str(caught.value)
    assert "2, 4 or 8" in messages["header_size"]
    assert "'big' or 'little'" in messages["byteorder"]
    assert "'json' or 'ziproto'" in messages["encoding"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("port", 0, 0),
        ("port", 65535, 65535),
        ("header_size", 2, 2),
        ("header_size", 8, 8),
        ("byteorder", "little", "little"),
        ("timeout", 0.25, 0.25),
        ("session_limit", 0, 0),
        ("encoding", "ziproto", "ziproto"),
        ("buf", 1, 1),
        ("logging_level", "debug", logging.DEBUG),
        ("logging_level", "WARNING", logging.WARNING),
        ("logging_level", 0, 0),
    ],
)
def test_good_argument_is_kept(key, value, expected):
    assert getattr(Server(**{key: value}), key) == expected


def test_defaults_are_those_of_0_5():
    server = Server()
    assert (server.addr, server.port, server.buf) == ("127.0.0.1", 8081, 1024)
    assert (server.timeout, server.header_size, server.byteorder) == (60, 4, "big")
    assert (server.session_limit, server.logging_level, server.encoding) == (0, 20, "json")


def test_keyfile_without_certfile_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="keyfile.*certfile"):
        Server(keyfile=str(tmp_path / "key.pem"))
    with pytest.raises(ConfigError, match="cafile.*certfile"):
        Server(cafile=str(tmp_path / "ca.pem"))


def test_cfg_parser_of_the_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="cfg_parser"):
        Server(cfg_parser={"AsyncAPY": {"port": "1"}})


# -- INI files -----------------------------------------------------------------------
def _ini(tmp_path, body: str, name: str = "config.ini") -> str:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return str(path)


def test_section_keys_are_applied(tmp_path):
    path = _ini(
        tmp_path,
        "[AsyncAPY]\n"
        "addr = 0.0.0.0\n"
        "port = 1500\n"
        "header_size = 8\n"
        "byteorder = little\n"
        "timeout = 2.5\n"
        "encoding = ziproto\n"
        "session_limit = 3\n"
        "logging_level = 30\n",
    )
    server = Server(config=path)
    assert server.addr == "0.0.0.0"
    assert server.port == 1500
    assert server.header_size == 8
    assert server.byteorder == "little"
    assert server.timeout == 2.5
    assert server.encoding == "ziproto"
    assert server.session_limit == 3
    assert server.logging_level == 30
    assert type(server.port) is int and type(server.header_size) is int


@pytest.mark.parametrize(("text", "level"), [("10", 10), ("DEBUG", 10), ("error", 40), ("50", 50)])
def test_logging_level_as_int_or_name(tmp_path, text, level):
    path = _ini(tmp_path, f"[AsyncAPY]\nlogging_level = {text}\n")
    assert Server(config=path).logging_level == level


def test_logging_format_is_read_without_interpolation(tmp_path):
    fmt = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
    path = _ini(tmp_path, f"[AsyncAPY]\nconsole_format = {fmt}\ndatefmt = %H:%M:%S\n")
    server = Server(config=path)
    assert server.console_format == fmt
    assert server.datefmt == "%H:%M:%S"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert logging.Formatter(server.console_format).format(record).endswith("INFO] x: hello")


def test_config_overrides_constructor_arguments(tmp_path):
    path = _ini(tmp_path, "[AsyncAPY]\nport = 1500\ntimeout = 15\n")
    server = Server("10.0.0.1", 9999, timeout=5, config=path, session_limit=7)
    assert (server.port, server.timeout) == (1500, 15)
    assert (server.addr, server.session_limit) == ("10.0.0.1", 7)  # not in the file: kept


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = _ini(tmp_path, "[AsyncAPY]\nport = 1500\nprot = 1501\n")
    with pytest.raises(ConfigError) as caught:
        Server(config=path)
    assert caught.value.key == "prot"
    assert "prot" in str(caught.value) and "'1501'" in str(caught.value)
    assert "port" in caught.value.accepted


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("port", "70000", 70000),
        ("port", "eighty", "eighty"),
        ("header_size", "3", 3),
        ("byteorder", "middle", "middle"),
        ("timeout", "0", 0),
        ("timeout", "soon", "soon"),
        ("session_limit", "-1", -1),
        ("encoding", "xml", "xml"),
        ("buf", "0", 0),
        ("logging_level", "LOUD", "LOUD"),
    ],
)
def test_bad_value_in_file_names_key_value_accepted_and_file(tmp_path, key, text, value):
    path = _ini(tmp_path, f"[AsyncAPY]\n{key} = {text}\n")
    with pytest.raises(ConfigError) as caught:
        Server(config=path)
    _assert_names(caught.value, key, value, SETTINGS[key].accepted)
    assert path in str(caught.value)


def test_missing_section_is_an_error(tmp_path):
    path = _ini(tmp_path, "[Server]\nport = 1500\n")
    with pytest.raises(ConfigError, match=re.escape("[AsyncAPY]")) as caught:
        Server(config=path)
    assert path in str(caught.value)


def test_missing_file_is_an_error(tmp_path):
    path = str(tmp_path / "nowhere.ini")
    with pytest.raises(ConfigError, match="readable INI file") as caught:
        Server(config=path)
    assert path in str(caught.value)


def test_malformed_file_is_an_error(tmp_path):
    path = _ini(tmp_path, "port = 1500\n")  # no section header at all
    with pytest.raises(ConfigError, match="valid INI file"):
        Server(config=path)


def test_user_supplied_parser_already_read():
    parser = configparser.ConfigParser()
    parser.read_string("[AsyncAPY]\nport = 1600\nencoding = ziproto\n[other]\nx = 1\n")
    server = Server(cfg_parser=parser, port=1)
    assert (server.port, server.encoding) == (1600, "ziproto")


def test_user_supplied_parser_reads_the_file(tmp_path):
    path = _ini(tmp_path, "[AsyncAPY]\nport = 1700\n")
    parser = configparser.ConfigParser(interpolation=None)
    assert Server(config=path, cfg_parser=parser).port == 1700
    assert parser.get("AsyncAPY", "port") == "1700"


def test_user_parser_interpolation_failure_is_a_config_error():
    parser = configparser.ConfigParser()  # BasicInterpolation: %(message)s is a reference
    parser.read_string("[AsyncAPY]\nconsole_format = %(message)s\n")
    with pytest.raises(ConfigError) as caught:
        Server(cfg_parser=parser)
    assert caught.value.key == "console_format"
    assert "%(message)s" in str(caught.value) and "interpolation=None" in str(caught.value)


def test_default_section_keys_for_other_sections_are_ignored(tmp_path):
    path = _ini(tmp_path, "[DEFAULT]\ndb_url = x\n[AsyncAPY]\nport = 1500\n")
    assert Server(config=path).port == 1500


def test_keyfile_without_certfile_in_file_is_an_error(tmp_path):
    path = _ini(tmp_path, f"[AsyncAPY]\nkeyfile = {tmp_path / 'key.pem'}\n")
    with pytest.raises(ConfigError) as caught:
        Server(config=path)
    assert caught.value.key == "keyfile"
    assert "certfile" in str(caught.value)


def test_config_ini_of_0_5_loads(tmp_path):
    path = _ini(
        tmp_path,
        "# AsyncAPY - A fully fledged Python 3.6+ library to serve APIs asynchronously\n"
        "#\n"
        "# This file is part of AsyncAPY.\n"
        "\n"
        "[AsyncAPY]\n"
        "addr = 127.0.0.1\n"
        "port = 1500\n"
        "encoding = json\n"
        "header_size = 4\n"
        "byteorder = big\n"
        "buf = 1024\n"
        "logging_level = 10\n"
        "timeout = 15\n",
    )
    expected = dict(
        addr="127.0.0.1", port=1500, encoding="json", header_size=4,
        byteorder="big", buf=1024, logging_level=10, timeout=15,
    )
    assert load_config(path) == expected
    server = Server(config=path)
    assert {key: getattr(server, key) for key in expected} == expected


def test_load_config_method_rereads_the_file(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text("[AsyncAPY]\nport = 1500\n")
    server = Server(config=str(path))
    path.write_text("[AsyncAPY]\nport = 1501\n")
    server.load_config()
    assert server.port == 1501


@pytest.mark.parametrize("name", ["timeout", "shutdown_grace"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_durations_must_be_finite(name, value):
    with pytest.raises(ConfigError) as caught:
        Server(**{name: value})
    assert name in str(caught.value)


def test_infinite_timeout_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "inf.ini"
    path.write_text("[AsyncAPY]\ntimeout = 1e999\n")
    with pytest.raises(ConfigError, match="timeout"):
        Server(config=str(path))


# -- the settings of fair share ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [("handshake_timeout", 0), ("handshake_timeout", -1), ("handshake_timeout", "10"), ("handshake_limit", 0),
     ("handshake_limit", 1.5), ("insecure_trust_any_proxy", "yes")],
)
def test_fair_share_settings_are_validated(key, value):
    with pytest.raises(ConfigError, match=key):
        Server(port=0, **{key: value})


def test_trusted_proxies_covering_everyone_from_a_config_file_is_refused(tmp_path):
    config = tmp_path / "server.ini"
    config.write_text("[AsyncAPY]\nproxy_protocol = yes\ntrusted_proxies = 0.0.0.0/0\n")
    with pytest.raises(ConfigError, match="trusted_proxies.*cover every IPv4 address"):
        Server(port=0, config=str(config))
    config.write_text("[AsyncAPY]\nproxy_protocol = yes\ntrusted_proxies = 0.0.0.0/0\ninsecure_trust_any_proxy = yes\n")
    assert Server(port=0, config=str(config)).insecure_trust_any_proxy is True
