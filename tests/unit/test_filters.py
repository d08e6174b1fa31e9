"""The built-in filters: ``Filters.Ip``, ``Filters.Fields`` and ``Filters.APIFactory``.

Filters are checked against stand-in clients and standalone packets; a filter may
answer with an awaitable (the API-key lookup), so every check goes through
:func:`passes`, which awaits when it has to.
"""

import re
import threading
from inspect import isawaitable
from types import SimpleNamespace

import pytest

from asyncapy.core import Client, Packet
from asyncapy.filters import Filter, Filters
from asyncapy.util import APIKeyFactory


async def passes(flt, client, packet) -> bool:
    result = flt.check(client, packet)
    if isawaitable(result):
        result = await result
    assert type(result) is bool
    return result


def client(address: str) -> Client:
    """A real handler-side Client: it parses its address into ``.ip``."""
    return Client(address, server=None, stream=None, session=None, encoding="json")


def bare_client(address: str) -> SimpleNamespace:
    """A stand-in with only ``.address``, as a third-party caller might pass."""
    return SimpleNamespace(address=address)


PACKET = Packet({"k": "v"}, "json")


# -- Filters.Ip ----------------------------------------------------------------------
@pytest.mark.parametrize("make_client", [client, bare_client], ids=["Client", "bare"])
@pytest.mark.parametrize(
    ("entries", "address", "expected"),
    [
        ("10.1.2.3", "10.1.2.3", True),
        ("10.1.2.3", "10.1.2.4", False),
        (["10.1.2.3", "10.1.2.4"], "10.1.2.4", True),
        ("::1", "::1", True),
        ("::1", "0:0:0:0:0:0:0:1", True),
        ("2001:db8::1", "2001:DB8:0::1", True),
        ("::1", "127.0.0.1", False),
        ("10.0.0.0/8", "10.255.0.7", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("192.168.1.77/24", "192.168.1.200", True),  # host bits set: not strict
        ("2001:db8::/32", "2001:db8:ffff::5", True),
        ("2001:db8::/32", "2001:db9::5", False),
        ("10.1.2.3/32", "10.1.2.3", True),
        ("10.1.2.3", "::ffff:10.1.2.3", True),  # IPv4-mapped client, IPv4 entry
        ("10.0.0.0/8", "::ffff:10.9.9.9", True),
        ("::ffff:10.1.2.3", "10.1.2.3", True),  # IPv4-mapped entry
        ("::ffff:10.0.0.0/104", "10.9.9.9", True),  # IPv4-mapped network entry
        ("::ffff:10.0.0.0/104", "::ffff:10.9.9.9", True),
        ("::ffff:0:0/96", "::ffff:203.0.113.9", True),
        ("::ffff:0:0/96", "2001:db8::9", False),
        ("10.1.2.3", "not an address", False),
        ("0.0.0.0/0", "203.0.113.9", True),
        ("0.0.0.0/0", "2001:db8::9", False),
    ],
)
async def test_ip_matches(make_client, entries, address, expected):
    assert await passes(Filters.Ip(entries), make_client(address), PACKET) is expected


@pytest.mark.parametrize(
    "bad",
    ["999.1.1.1", "abc", "", "10.0.0.0/33", "10.1.2.3/8/1", 42, None, 4.2, ["10.0.0.1", "abc"], [None], b"10.0.0.1"],
    ids=repr,
)
def test_ip_rejects_garbage(bad):
    with pytest.raises(ValueError):
        Filters.Ip(bad)


def test_ip_lists_its_entries():
    flt = Filters.Ip(["10.1.2.3", "10.0.0.0/8", "::1", "::ffff:192.0.2.1", "::ffff:198.51.100.0/120"])
    assert flt.ips == frozenset({"10.1.2.3", "10.0.0.0/8", "::1", "192.0.2.1", "198.51.100.0/24"})
    flt.remove("::ffff:198.51.100.0/120")
    assert "198.51.100.0/24" not in flt.ips
    assert "10.0.0.0/8" in repr(flt)


async def test_ip_add_and_remove_at_runtime():
    flt = Filters.Ip("10.1.2.3")
    newcomer = client("192.0.2.5")
    assert await passes(flt, newcomer, PACKET) is False
    flt.add("192.0.2.0/24")
    assert await passes(flt, newcomer, PACKET) is True
    flt.remove("192.0.2.0/24")
    assert await passes(flt, newcomer, PACKET) is False
    flt.add("192.0.2.5")
    assert await passes(flt, newcomer, PACKET) is True
    flt.remove("192.0.2.5")
    assert await passes(flt, newcomer, PACKET) is False
    assert await passes(flt, client("10.1.2.3"), PACKET) is True
    with pytest.raises(KeyError):
        flt.remove("192.0.2.5")
    with pytest.raises(ValueError):
        flt.add("999.0.0.1")
    assert flt.ips == frozenset({"10.1.2.3"})


async def test_ip_assigning_ips_replaces_the_list():
    flt = Filters.Ip("10.1.2.3")
    flt.ips = ["2001:db8::/32", "198.51.100.1"]
    assert await passes(flt, client("10.1.2.3"), PACKET) is False
    assert await passes(flt, client("2001:db8::42"), PACKET) is True
    assert await passes(flt, client("198.51.100.1"), PACKET) is True
    flt.ips = "10.1.2.3"
    assert flt.ips == frozenset({"10.1.2.3"})


async def test_ip_failed_assignment_keeps_the_old_list():
    flt = Filters.Ip(["10.1.2.3"])
    with pytest.raises(ValueError):
        flt.ips = ["198.51.100.1", "garbage"]
    assert flt.ips == frozenset({"10.1.2.3"})
    assert await passes(flt, client("198.51.100.1"), PACKET) is False


@pytest.mark.parametrize(
    ("address", "expected"), [("10.0.0.1", True), ("10.0.0.2", True), ("10.0.0.3", False)]
)
async def test_ip_composition(address, expected):
    either = Filters.Ip("10.0.0.1") | Filters.Ip("10.0.0.2")
    assert isinstance(either, Filter)
    assert await passes(either, client(address), PACKET) is expected
    assert await passes(~either, client(address), PACKET) is (not expected)
    both = Filters.Ip("10.0.0.0/8") & ~Filters.Ip("10.0.0.3")
    assert await passes(both, client(address), PACKET) is expected


async def test_ip_negation():
    flt = ~Filters.Ip("10.0.0.1")
    assert await passes(flt, client("10.0.0.1"), PACKET) is False
    assert await passes(flt, client("10.0.0.9"), PACKET) is True


# -- Filters.Fields ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "payload", "expected"),
    [
        ({"a": None}, {"a": 1}, True),
        ({"a": None}, {"a": None}, True),
        ({"a": None, "b": None}, {"b": [1], "a": {"x": 1}}, True),
        ({"a": None}, {"a": 1, "b": 2}, False),  # an extra field
        ({"a": None, "b": None}, {"a": 1}, False),  # a missing field
        ({"a": None, "b": None}, {"a": 1, "c": 2}, False),  # same count, other key
        ({}, {}, True),
        ({}, {"a": 1}, False),
        ({"n": r"\d+"}, {"n": "123"}, True),
        ({"n": r"\d+"}, {"n": 123}, True),  # matched against str(value)
        ({"n": r"\d+"}, {"n": "abc"}, False),
        ({"n": r"\d+"}, {"n": "12abc"}, True),  # re.match: anchored at the start only
        ({"n": r"\d+$"}, {"n": "12abc"}, False),
        ({"n": r"\d+"}, {"n": "x12"}, False),
        ({"flag": "True"}, {"flag": True}, True),
        ({"v": "None"}, {"v": None}, True),
        ({"cmd": "get|set", "key": None}, {"cmd": "set", "key": "k"}, True),
        ({"cmd": "get|set", "key": None}, {"cmd": "del", "key": "k"}, False),
    ],
)
async def test_fields(fields, payload, expected):
    flt = Filters.Fields(**fields)
    assert await passes(flt, bare_client("10.0.0.1"), Packet(payload, "json")) is expected


def test_fields_compile_each_pattern_once(monkeypatch):
    calls = []
    real = re._compile

    def counting(pattern, flags):
        calls.append(pattern)
        return real(pattern, flags)

    monkeypatch.setattr(re, "_compile", counting)
    flt = Filters.Fields(n=r"\d+", word="[a-z]+", any=None)
    assert sorted(map(str, calls)) == sorted([r"\d+", "[a-z]+"])
    calls.clear()
    packet = Packet({"n": "42", "word": "abc", "any": 0}, "json")
    for _ in range(100):
        assert flt.check(None, packet) is True
    assert calls == []


def test_fields_keep_their_patterns():
    flt = Filters.Fields(n=r"\d+", any=None)
    assert flt.fields == {"n": r"\d+", "any": None}
    assert "n" in repr(flt)


def test_fields_accept_a_compiled_pattern():
    flt = Filters.Fields(n=re.compile(r"\d+"))
    assert flt.check(None, Packet({"n": "7"}, "json")) is True
    assert flt.check(None, Packet({"n": "x"}, "json")) is False


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x"])
def test_fields_bad_pattern_raises_re_error(pattern):
    with pytest.raises(re.error):
        Filters.Fields(n=pattern)


def test_fields_pattern_of_the_wrong_type_is_an_error():
    with pytest.raises(TypeError):
        Filters.Fields(n=42)


# -- Filters.APIFactory --------------------------------------------------------------
async def test_api_factory_valid_and_revoked_keys():
    factory = APIKeyFactory()
    key = factory.issue({"user": "alice"})
    flt = Filters.APIFactory(factory, "api_key")
    someone = bare_client("10.0.0.1")
    assert await passes(flt, someone, Packet({"api_key": key}, "json")) is True
    assert await passes(flt, someone, Packet({"api_key": key + "x"}, "json")) is False
    assert await passes(flt, someone, Packet({"api_key": factory.new_key()}, "json")) is False
    factory.revoke(key)
    assert await passes(flt, someone, Packet({"api_key": key}, "json")) is False


async def test_api_factory_reissued_key():
    factory = APIKeyFactory()
    old = factory.issue()
    new = factory.reissue(old)
    flt = Filters.APIFactory(factory, "api_key")
    assert await passes(flt, None, Packet({"api_key": old}, "json")) is False
    assert await passes(flt, None, Packet({"api_key": new}, "json")) is True


@pytest.mark.parametrize("value", [None, 42, ["key"], {"key": 1}, True, 1.5])
async def test_api_factory_non_string_field_fails(value):
    factory = APIKeyFactory()
    flt = Filters.APIFactory(factory, "api_key")
    assert await passes(flt, None, Packet({"api_key": value}, "json")) is False


async def test_api_factory_missing_field_fails():
    factory = APIKeyFactory()
    key = factory.issue()
    flt = Filters.APIFactory(factory, "api_key")
    assert await passes(flt, None, Packet({"apikey": key}, "json")) is False
    assert await passes(flt, None, Packet({}, "json")) is False


async def test_api_factory_composes_with_sync_filters():
    factory = APIKeyFactory()
    key = factory.issue()
    flt = Filters.Ip("10.0.0.0/8") & Filters.APIFactory(factory, "api_key")
    packet = Packet({"api_key": key}, "json")
    assert await passes(flt, client("10.0.0.1"), packet) is True
    assert await passes(flt, client("192.0.2.1"), packet) is False
    assert await passes(~flt, client("10.0.0.1"), packet) is False


def test_api_factory_argument_checks():
    with pytest.raises(TypeError):
        Filters.APIFactory({"a-key"}, "api_key")
    with pytest.raises(TypeError):
        Filters.APIFactory(APIKeyFactory(), 42)


class SetBackedFactory(APIKeyFactory):
    """The 0.5 way to plug in a database: override ``__contains__`` only."""

    def __init__(self, keys):
        super().__init__()
        self.valid = set(keys)
        self.threads = []

    def __contains__(self, key):
        self.threads.append(threading.current_thread())
        return key in self.valid


async def test_api_factory_with_a_subclass_overriding_only_contains():
    factory = SetBackedFactory({"legacy-key-0123456789"})
    flt = Filters.APIFactory(factory, "token")
    assert await passes(flt, None, Packet({"token": "legacy-key-0123456789"}, "json")) is True
    assert await passes(flt, None, Packet({"token": "unknown-key-0123456789"}, "json")) is False
    assert len(factory.threads) == 2
    for thread in factory.threads:
        assert thread is not threading.main_thread()
    assert threading.current_thread() is threading.main_thread()


async def test_api_factory_subclass_is_not_consulted_for_non_strings():
    factory = SetBackedFactory({"legacy-key-0123456789"})
    flt = Filters.APIFactory(factory, "token")
    assert await passes(flt, None, Packet({"token": 5}, "json")) is False
    assert factory.threads == []
