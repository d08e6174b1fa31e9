"""``APIKeyFactory``: issuing, looking up, reissuing, updating and revoking keys.

The synchronous methods are the 0.5 API and work from plain code; the ``a``-prefixed
twins are what the server awaits. Both must agree, and every method that takes a key
raises ``KeyError`` for a key that does not exist.
"""

import re
import string

import pytest

from asyncapy.adapters.memory import MemoryKeyStore
from asyncapy.util import KEY_ALPHABET, APIKeyFactory, fingerprint

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_alphabet_is_url_safe_base64():
    assert sorted(KEY_ALPHABET) == sorted(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )


@pytest.mark.parametrize("size", [16, 32, 33, 64, 200])
def test_issue_returns_size_url_safe_characters(size):
    factory = APIKeyFactory(size=size)
    for _ in range(20):
        key = factory.issue()
        assert type(key) is str
        assert len(key) == size
        assert URL_SAFE.fullmatch(key), key


def test_keys_are_unique_and_use_the_whole_alphabet():
    factory = APIKeyFactory(size=32)
    keys = [factory.issue() for _ in range(2000)]
    assert len(set(keys)) == len(keys)
    assert set("".join(keys)) == set(KEY_ALPHABET)  # 64000 draws miss a symbol ~never
    assert len(factory.store) == 2000


def test_no_key_starts_with_a_dash_so_none_looks_like_an_option():
    """``asyncapy keys get KEY`` must work for every key issued: one that began with
    "-" would be taken for an option (a 1-in-64 chance per key if drawn like the rest)."""
    factory = APIKeyFactory(size=16)
    firsts = {factory.new_key()[0] for _ in range(4000)}
    assert "-" not in firsts
    assert firsts == set(string.ascii_letters + string.digits)  # 4000 draws miss one ~never


def test_default_size_is_32():
    assert len(APIKeyFactory().issue()) == 32
    assert APIKeyFactory().size == 32


@pytest.mark.parametrize("size", [15, 0, -32, 32.0, "32", None, True])
def test_size_is_validated(size):
    with pytest.raises(ValueError, match="size"):
        APIKeyFactory(size=size)


@pytest.mark.parametrize("store", [{}, 42, "ftp://keys.example", "redis-no-scheme"])
def test_store_is_validated(store):
    with pytest.raises(ValueError, match="store.*accepted"):
        APIKeyFactory(store=store)


def test_memory_url_gives_a_private_memory_store():
    first, second = APIKeyFactory(store="memory://"), APIKeyFactory(store="memory://")
    key = first.issue()
    assert isinstance(first.store, MemoryKeyStore)
    assert key in first and key not in second


def test_issue_get_and_contains():
    factory = APIKeyFactory(size=32)
    key = factory.issue({"user": "alice", "scopes": ["read"]})
    assert key in factory
    assert factory.get(key) == {"user": "alice", "scopes": ["read"]}
    assert factory.new_key() not in factory


def test_metadata_defaults_to_none():
    factory = APIKeyFactory()
    key = factory.issue()
    assert key in factory
    assert factory.get(key) is None


def test_metadata_is_copied():
    factory = APIKeyFactory()
    metadata = {"scopes": ["read"]}
    key = factory.issue(metadata)
    metadata["scopes"].append("admin")
    factory.get(key)["scopes"].append("root")
    assert factory.get(key) == {"scopes": ["read"]}


def test_revoke():
    factory = APIKeyFactory()
    key = factory.issue({"n": 1})
    other = factory.issue({"n": 2})
    factory.revoke(key)
    assert key not in factory
    with pytest.raises(KeyError):
        factory.get(key)
    assert other in factory and factory.get(other) == {"n": 2}


def test_reissue_replaces_the_key_and_keeps_metadata():
    factory = APIKeyFactory(size=40)
    old = factory.issue({"user": "bob"})
    new = factory.reissue(old)
    assert new != old
    assert len(new) == 40 and URL_SAFE.fullmatch(new)
    assert old not in factory
    assert new in factory
    assert factory.get(new) == {"user": "bob"}
    with pytest.raises(KeyError):
        factory.get(old)
    with pytest.raises(KeyError):
        factory.reissue(old)


def test_update_keeps_the_key():
    factory = APIKeyFactory()
    key = factory.issue({"v": 1})
    assert factory.update(key, {"v": 2}) is None
    assert key in factory
    assert factory.get(key) == {"v": 2}
    factory.update(key, None)
    assert factory.get(key) is None
    assert len(factory.store) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda f, k: f.get(k),
        lambda f, k: f.revoke(k),
        lambda f, k: f.reissue(k),
        lambda f, k: f.update(k, {"v": 1}),
    ],
    ids=["get", "revoke", "reissue", "update"],
)
def test_missing_key_is_a_key_error_everywhere(call):
    factory = APIKeyFactory()
    survivor = factory.issue({"keep": True})
    missing = factory.new_key()
    with pytest.raises(KeyError):
        call(factory, missing)
    assert missing not in factory
    assert len(factory.store) == 1 and factory.get(survivor) == {"keep": True}


@pytest.mark.parametrize("key", [None, 42, b"key", ["key"]], ids=repr)
def test_contains_of_a_non_string_is_false(key):
    factory = APIKeyFactory()
    factory.issue()
    assert (key in factory) is False


def test_a_shared_store_is_used():
    store = MemoryKeyStore()
    first, second = APIKeyFactory(store=store), APIKeyFactory(store=store)
    key = first.issue({"from": "first"})
    assert key in second and second.get(key) == {"from": "first"}
    second.revoke(key)
    assert key not in first


def test_0_5_private_key_dict_still_reachable():
    factory = APIKeyFactory()
    key = factory.issue({"n": 1})
    assert factory._keys == {key: {"n": 1}}


# -- the async twins, under trio -----------------------------------------------------
async def test_async_twins():
    factory = APIKeyFactory(size=24)
    key = await factory.aissue({"user": "carol"})
    assert len(key) == 24 and URL_SAFE.fullmatch(key)
    assert await factory.acontains(key) is True
    assert await factory.aget(key) == {"user": "carol"}
    await factory.aupdate(key, {"user": "dave"})
    assert await factory.aget(key) == {"user": "dave"}
    new = await factory.areissue(key)
    assert await factory.acontains(key) is False
    assert await factory.aget(new) == {"user": "dave"}
    await factory.arevoke(new)
    assert await factory.acontains(new) is False
    assert len(factory.store) == 0


async def test_async_twins_default_metadata_and_non_strings():
    factory = APIKeyFactory()
    key = await factory.aissue()
    assert await factory.aget(key) is None
    assert await factory.acontains(None) is False
    assert await factory.acontains(42) is False


async def test_async_twins_raise_key_error_for_missing_keys():
    factory = APIKeyFactory()
    missing = factory.new_key()
    calls = [
        lambda: factory.aget(missing),
        lambda: factory.arevoke(missing),
        lambda: factory.areissue(missing),
        lambda: factory.aupdate(missing, 1),
    ]
    for call in calls:
        with pytest.raises(KeyError):
            await call()
    assert len(factory.store) == 0


async def test_sync_and_async_apis_agree_inside_trio():
    factory = APIKeyFactory()
    key = factory.issue({"n": 1})
    assert await factory.acontains(key) is True
    other = await factory.aissue({"n": 2})
    assert other in factory and factory.get(other) == {"n": 2}


# -- fingerprints --------------------------------------------------------------------
def test_fingerprint_never_reveals_the_key():
    factory = APIKeyFactory(size=16)
    prints = set()
    for _ in range(500):
        key = factory.issue()
        tag = fingerprint(key)
        assert tag != key
        assert key not in tag
        assert tag[:8] not in key  # no recognisable piece of the key either
        assert tag == fingerprint(key)  # stable, so logs can be correlated
        assert re.fullmatch(r"[0-9a-f]{12}", tag)
        prints.add(tag)
    assert len(prints) == 500


def test_fingerprint_of_odd_input_does_not_raise():
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint("\ud800 lone surrogate"))
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint(None))


def test_a_05_subclass_may_assign_its_key_dict():
    class Legacy(APIKeyFactory):
        def __init__(self):
            super().__init__()
            self._keys = {"fixed-key": {"user": "legacy"}}

    factory = Legacy()
    assert "fixed-key" in factory
    assert factory.get("fixed-key") == {"user": "legacy"}
