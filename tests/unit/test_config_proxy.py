"""The PROXY protocol settings, ``proxy_protocol`` and ``trusted_proxies``: as
constructor arguments, config-file keys and ``asyncapy run`` flags, each validated the
same way, and the rule that joins them (on without a trusted proxy is an error, however
the two were given)."""

from __future__ import annotations

import textwrap

import pytest

from asyncapy import __main__ as cli
from asyncapy.config import SETTINGS, ConfigError, load_config
from asyncapy.domain.proxy import TrustedProxies
from asyncapy.server import Server


def test_off_and_trusting_no_one_by_default():
    server = Server()
    assert server.proxy_protocol is False
    assert server.trusted_proxies == TrustedProxies() and len(server.trusted_proxies) == 0


def test_constructor_arguments_are_kept_normalised():
    server = Server(proxy_protocol=True, trusted_proxies=["10.0.0.5", "fd00::/8", "::ffff:10.1.0.0/112"])
    assert server.proxy_protocol is True
    assert list(server.trusted_proxies) == ["10.0.0.5", "fd00::/8", "10.1.0.0/16"]
    assert "10.1.2.3" in server.trusted_proxies and "10.2.0.1" not in server.trusted_proxies
    assert list(Server(trusted_proxies="127.0.0.1, ::1").trusted_proxies) == ["127.0.0.1", "::1"]
    assert list(Server(trusted_proxies=("127.0.0.0/8",)).trusted_proxies) == ["127.0.0.0/8"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("proxy_protocol", 1),
        ("proxy_protocol", "yes"),
        ("proxy_protocol", None),
        ("trusted_proxies", "10.0.0.5/8"),
        ("trusted_proxies", ["10.0.0.256"]),
        ("trusted_proxies", ["proxy.internal"]),
        ("trusted_proxies", ["10.0.0.0/33"]),
        ("trusted_proxies", ["fe80::1%eth0"]),
        ("trusted_proxies", [10]),
        ("trusted_proxies", 10),
        ("trusted_proxies", b"10.0.0.5"),
        ("trusted_proxies", None),
    ],
    ids=repr,
)
def test_a_bad_value_names_the_setting_and_the_accepted_forms(key, value):
    with pytest.raises(ConfigError) as caught:
        Server(**{key: value})
    message = str(caught.value)
    assert message.startswith(f"invalid {key}: {value!r}")
    assert f"; accepted: {SETTINGS[key].accepted}" in message
    assert caught.value.accepted == SETTINGS[key].accepted
    if key == "trusted_proxies":
        assert "CIDR networks" in message and "IPv4 or IPv6" in message and "no host names" in message


def test_the_bad_entry_of_a_list_is_named():
    with pytest.raises(ConfigError) as caught:
        Server(trusted_proxies=["10.0.0.1", "fd00::/8", "lb.internal", "10.0.0.2"])
    assert "('lb.internal' is no IP address or CIDR network without host bits)" in str(caught.value)


def test_on_without_a_trusted_proxy_says_so():
    for trusted in ((), [], "", " , "):
        with pytest.raises(ConfigError) as caught:
            Server(proxy_protocol=True, trusted_proxies=trusted)
        assert caught.value.key == "trusted_proxies"
        assert "proxy_protocol is on" in str(caught.value)
        assert "at least one proxy's IP address or CIDR network" in str(caught.value)
    Server(proxy_protocol=False)  # a trusted list without the protocol is fine, and none too
    Server(trusted_proxies="10.0.0.5")


def _ini(tmp_path, body: str):
    path = tmp_path / "asyncapy.ini"
    path.write_text("[AsyncAPY]\n" + textwrap.dedent(body))
    return str(path)


@pytest.mark.parametrize("text, value", [("yes", True), ("true", True), ("On", True), ("1", True), ("no", False), ("0", False)])
def test_config_file_keys(tmp_path, text, value):
    path = _ini(tmp_path, f"proxy_protocol = {text}\ntrusted_proxies = 10.0.0.5, 10.1.0.0/16\n    fd00::/8\n")
    assert load_config(path) == {"proxy_protocol": value, "trusted_proxies": TrustedProxies("10.0.0.5 10.1.0.0/16 fd00::/8")}
    server = Server(config=path)
    assert server.proxy_protocol is value and list(server.trusted_proxies) == ["10.0.0.5", "10.1.0.0/16", "fd00::/8"]


@pytest.mark.parametrize("body, key", [("proxy_protocol = maybe\n", "proxy_protocol"), ("trusted_proxies = 10.0.0.1, lb.local\n", "trusted_proxies")])
def test_a_bad_config_file_value_names_key_and_file(tmp_path, body, key):
    path = _ini(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        Server(config=path)
    assert caught.value.key == key and path in str(caught.value) and SETTINGS[key].accepted in str(caught.value)


def test_the_rule_holds_across_the_constructor_and_the_file(tmp_path):
    with pytest.raises(ConfigError, match="proxy_protocol is on"):
        Server(config=_ini(tmp_path, "proxy_protocol = yes\n"))
    server = Server(config=_ini(tmp_path, "proxy_protocol = yes\n"), trusted_proxies="10.0.0.5")
    assert server.proxy_protocol and "10.0.0.5" in server.trusted_proxies
    server = Server(config=_ini(tmp_path, "trusted_proxies = 10.0.0.5\n"), proxy_protocol=True)
    assert server.proxy_protocol
    # Server.load_config() (re-reading the file) keeps to it too.
    path = _ini(tmp_path, "port = 9000\n")
    server = Server(config=path)
    _ini(tmp_path, "proxy_protocol = on\n")
    with pytest.raises(ConfigError, match="proxy_protocol is on"):
        server.load_config()


# -- asyncapy run --proxy-protocol --trusted-proxies ---------------------------------------------
@pytest.fixture
def app_spec(tmp_path, monkeypatch):
    """A fresh app module for each test (the flags are applied to the app object)."""
    name = f"proxy_app_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("from asyncapy import Server\napp = Server(timeout=10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:app"


def _configure(*argv: str) -> Server:
    return cli._configure(cli._build_parser().parse_args(["run", *argv]))


def test_flags_turn_it_on(app_spec):
    app = _configure(app_spec, "--proxy-protocol", "--trusted-proxies", "10.0.0.5,10.1.0.0/16,fd00::/8")
    assert app.proxy_protocol is True
    assert list(app.trusted_proxies) == ["10.0.0.5", "10.1.0.0/16", "fd00::/8"]


def test_flags_win_over_the_config_file(app_spec, tmp_path):
    path = _ini(tmp_path, "proxy_protocol = yes\ntrusted_proxies = 10.0.0.5\n")
    app = _configure(app_spec, "--config", path, "--trusted-proxies", "10.9.9.9")
    assert app.proxy_protocol is True and list(app.trusted_proxies) == ["10.9.9.9"]
    app = _configure(app_spec, "--config", path, "--no-proxy-protocol")
    assert app.proxy_protocol is False


def test_workers_get_the_same_flags(app_spec):
    args = cli._build_parser().parse_args(["run", app_spec, "--workers", "2", "--proxy-protocol", "--trusted-proxies", "10.0.0.5"])
    forwarded = cli._worker_args(args)
    assert forwarded[forwarded.index("--trusted-proxies") + 1] == "10.0.0.5" and "--proxy-protocol" in forwarded
    worker = cli._build_parser().parse_args(["_worker", *forwarded, "--listen-fds", "3", "--control-fd", "4"])
    assert (worker.proxy_protocol, worker.trusted_proxies) == (True, "10.0.0.5")
    off = cli._build_parser().parse_args(["run", app_spec, "--no-proxy-protocol"])
    assert "--no-proxy-protocol" in cli._worker_args(off)
    assert not {"--proxy-protocol", "--no-proxy-protocol"} & set(cli._worker_args(cli._build_parser().parse_args(["run", app_spec])))


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--proxy-protocol"], "invalid trusted_proxies in the app, --config and the flags: []; accepted: at least one"),
        (["--proxy-protocol", "--trusted-proxies", ""], "proxy_protocol is on"),
        (["--trusted-proxies", "10.0.0.0/33"], "invalid trusted_proxies in --trusted-proxies: '10.0.0.0/33' ('10.0.0.0/33' is no IP address"),
        (["--trusted-proxies", "lb.internal"], "no host names"),
    ],
)
def test_bad_flags_are_one_line_and_status_2(app_spec, capsys, flags, expected):
    assert cli.main(["run", app_spec, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asyncapy: ") and expected in err and err.count("\n") == 1
