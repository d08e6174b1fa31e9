"""The contract suites of the store ports: what every adapter must do, as pytest tests.

:class:`SessionStoreContract` and :class:`KeyStoreContract` are pytest base classes.
Subclass one in your own test file and give the subclass a fixture named ``store``
that returns (or yields) a **fresh, empty** adapter instance; every inherited
``test_*`` method then runs against it::

    import pytest
    from asyncapy.testing.contracts import KeyStoreContract

    from myproject.stores import PostgresKeyStore

    class TestPostgresKeyStore(KeyStoreContract):
        @pytest.fixture
        async def store(self):
            store = PostgresKeyStore(dsn=...)
            await store.clear()
            yield store
            await store.aclose()

The fixture may be synchronous or ``async``. The tests are coroutines marked
``pytest.mark.trio``, so they need ``pytest`` and ``pytest-trio`` (with or without
``trio_mode``). The base classes are not named ``Test...``, so importing them into a
test module does not run them a second time on their own.

Metadata values in the key-store contract are JSON-serialisable (dicts with string
keys, lists, strings, numbers, booleans, None), as :class:`~asyncapy.domain.ports.KeyStore`
requires; session records use documentation addresses (RFC 5737, RFC 3849).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
import trio
import trio.testing

from asyncapy.domain.keylimits import KeyLimit
from asyncapy.domain.keylimits import unwrap as unwrap_key_record
from asyncapy.domain.keylimits import wrap as wrap_key_record
from asyncapy.domain.ports import KeyStore, SessionRecord, SessionStore
from asyncapy.domain.ratelimit import Rate

__all__ = ["SessionStoreContract", "KeyStoreContract"]

ADDRESS = "203.0.113.7"
"""The client address most session tests use."""
OTHER_ADDRESS = "2001:db8::1"
"""A second, independent client address."""
BASE_DATE = 1_700_000_000.123456
"""Creation date of the first record a test makes; later records are later."""


def make_record(address: str = ADDRESS, n: int = 0, server_id: str = "server-a") -> SessionRecord:
    """A session record with a fresh UUID4, created ``n`` seconds after :data:`BASE_DATE`."""
    return SessionRecord(str(uuid.uuid4()), address, BASE_DATE + n, server_id)


def _ids(records: list[SessionRecord]) -> list[str]:
    return [record.session_id for record in records]


def _same_json(left: Any, right: Any) -> bool:
    """Equal, and of the same JSON types all the way down (``True`` is not ``1``)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(_same_json(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(_same_json, left, right))
    return bool(left == right)


@pytest.mark.trio
class SessionStoreContract:
    """The :class:`~asyncapy.domain.ports.SessionStore` contract.

    Subclass it and provide a ``store`` fixture returning a fresh, empty session store.
    """

    async def test_is_a_session_store(self, store: SessionStore) -> None:
        assert isinstance(store, SessionStore)

    async def test_admit_under_the_limit(self, store: SessionStore) -> None:
        record = make_record()
        assert await store.admit(record, 3) is True
        assert await store.sessions(ADDRESS) == [record]

    async def test_limit_zero_means_unlimited(self, store: SessionStore) -> None:
        records = [make_record(n=n) for n in range(50)]
        for record in records:
            assert await store.admit(record, 0) is True
        assert _ids(await store.sessions(ADDRESS)) == _ids(records)

    @pytest.mark.parametrize("limit", [1, 3])
    async def test_refuses_at_the_limit(self, store: SessionStore, limit: int) -> None:
        records = [make_record(n=n) for n in range(limit + 2)]
        results = [await store.admit(record, limit) for record in records]
        assert results == [True] * limit + [False] * 2
        assert _ids(await store.sessions(ADDRESS)) == _ids(records[:limit])

    async def test_limit_is_per_address(self, store: SessionStore) -> None:
        first = [make_record(ADDRESS, n) for n in range(2)]
        second = [make_record(OTHER_ADDRESS, n) for n in range(2)]
        for record in first:
            assert await store.admit(record, 2) is True
        assert await store.admit(make_record(ADDRESS, 9), 2) is False
        for record in second:
            assert await store.admit(record, 2) is True
        assert await store.admit(make_record(OTHER_ADDRESS, 9), 2) is False
        assert _ids(await store.sessions(ADDRESS)) == _ids(first)
        assert _ids(await store.sessions(OTHER_ADDRESS)) == _ids(second)

    async def test_limit_is_read_at_each_admission(self, store: SessionStore) -> None:
        for n in range(2):
            assert await store.admit(make_record(n=n), 0) is True
        assert await store.admit(make_record(n=2), 2) is False
        assert await store.admit(make_record(n=3), 3) is True
        assert len(await store.sessions(ADDRESS)) == 3

    async def test_release_frees_a_slot(self, store: SessionStore) -> None:
        first, second, third = (make_record(n=n) for n in range(3))
        assert await store.admit(first, 2) is True
        assert await store.admit(second, 2) is True
        assert await store.admit(third, 2) is False
        await store.release(first)
        assert _ids(await store.sessions(ADDRESS)) == [second.session_id]
        assert await store.admit(third, 2) is True
        assert await store.admit(make_record(n=4), 2) is False
        assert _ids(await store.sessions(ADDRESS)) == _ids([second, third])

    async def test_release_only_touches_its_own_session(self, store: SessionStore) -> None:
        mine, neighbour, elsewhere = make_record(n=0), make_record(n=1), make_record(OTHER_ADDRESS)
        for record in (mine, neighbour, elsewhere):
            assert await store.admit(record, 0) is True
        await store.release(mine)
        assert await store.sessions(ADDRESS) == [neighbour]
        assert await store.sessions(OTHER_ADDRESS) == [elsewhere]

    async def test_releasing_an_unknown_session_is_not_an_error(self, store: SessionStore) -> None:
        await store.release(make_record(OTHER_ADDRESS))  # an address never seen
        live = make_record()
        assert await store.admit(live, 1) is True
        await store.release(make_record())  # an unknown id at a live address
        assert await store.sessions(ADDRESS) == [live]
        await store.release(live)
        await store.release(live)  # twice
        assert await store.sessions(ADDRESS) == []

    async def test_sessions_of_an_unknown_address_is_empty(self, store: SessionStore) -> None:
        assert await store.sessions(ADDRESS) == []
        assert await store.admit(make_record(OTHER_ADDRESS), 0) is True
        assert await store.sessions(ADDRESS) == []

    async def test_sessions_preserve_records(self, store: SessionStore) -> None:
        records = [
            SessionRecord(str(uuid.uuid4()), ADDRESS, BASE_DATE, "host-1:4242:0badcafe"),
            SessionRecord(str(uuid.uuid4()), ADDRESS, BASE_DATE + 0.5),  # default server_id
            SessionRecord(str(uuid.uuid4()), ADDRESS, 1_700_000_123.987654, "другой-сервер"),
        ]
        for record in records:
            assert await store.admit(record, 0) is True
        listed = await store.sessions(ADDRESS)
        assert listed == records
        for got, expected in zip(listed, records):
            assert isinstance(got, SessionRecord)
            assert got.session_id == expected.session_id
            assert got.address == expected.address
            assert got.date == expected.date
            assert got.server_id == expected.server_id
        assert listed[1].server_id == ""

    async def test_sessions_are_listed_oldest_first(self, store: SessionStore) -> None:
        records = [make_record(n=n) for n in range(5)]
        for record in records:
            assert await store.admit(record, 0) is True
        listed = await store.sessions(ADDRESS)
        assert _ids(listed) == _ids(records)
        assert [record.date for record in listed] == sorted(record.date for record in listed)

    many_sessions = 10_000
    """How many sessions of one address :meth:`test_sessions_lists_any_number_of_sessions`
    admits: more than a Redis Lua script can ``unpack()`` at once (about 8,000). A
    subclass whose test backend admits slowly may lower it, at the cost of that check."""

    async def test_sessions_lists_any_number_of_sessions(self, store: SessionStore) -> None:
        records = [make_record(n=n) for n in range(self.many_sessions)]
        pending = iter(records)

        async def admit_some() -> None:  # a few at a time: round trips overlap
            for record in pending:
                assert await store.admit(record, 0) is True

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(admit_some)
        listed = await store.sessions(ADDRESS)
        assert _ids(listed) == _ids(records)
        assert await store.sessions(OTHER_ADDRESS) == []

    async def test_sessions_returns_a_new_list(self, store: SessionStore) -> None:
        record = make_record()
        assert await store.admit(record, 0) is True
        listed = await store.sessions(ADDRESS)
        listed.clear()
        assert await store.sessions(ADDRESS) == [record]

    async def test_readmission_after_release(self, store: SessionStore) -> None:
        record = make_record()
        assert await store.admit(record, 1) is True
        await store.release(record)
        assert await store.sessions(ADDRESS) == []
        assert await store.admit(record, 1) is True
        assert await store.sessions(ADDRESS) == [record]
        assert await store.admit(make_record(n=1), 1) is False

    async def test_releasing_everything_leaves_nothing(self, store: SessionStore) -> None:
        records = [make_record(n=n) for n in range(4)]
        for record in records:
            assert await store.admit(record, 4) is True
        for record in reversed(records):
            await store.release(record)
        assert await store.sessions(ADDRESS) == []
        again = [make_record(n=n) for n in range(4)]
        assert [await store.admit(record, 4) for record in again] == [True] * 4

    @pytest.mark.parametrize(("tasks", "limit"), [(20, 5), (12, 1)])
    async def test_concurrent_admissions_admit_exactly_the_limit(
        self, store: SessionStore, tasks: int, limit: int
    ) -> None:
        records = [make_record(n=n) for n in range(tasks)]
        results: dict[str, bool] = {}
        go = trio.Event()

        async def admit(record: SessionRecord) -> None:
            await go.wait()
            results[record.session_id] = await store.admit(record, limit)

        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(admit, record)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
        admitted = {sid for sid, ok in results.items() if ok}
        assert len(results) == tasks
        assert len(admitted) == limit
        assert set(_ids(await store.sessions(ADDRESS))) == admitted

    async def test_concurrent_unlimited_admissions_all_succeed(self, store: SessionStore) -> None:
        records = [make_record(n=n) for n in range(20)]
        results: list[bool] = []

        async def admit(record: SessionRecord) -> None:
            results.append(await store.admit(record, 0))

        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(admit, record)
        assert results == [True] * 20
        assert set(_ids(await store.sessions(ADDRESS))) == set(_ids(records))

    async def test_concurrent_release_and_admission_never_exceed_the_limit(
        self, store: SessionStore
    ) -> None:
        held = [make_record(n=n) for n in range(3)]
        for record in held:
            assert await store.admit(record, 3) is True
        newcomers = [make_record(n=10 + n) for n in range(10)]
        admitted: list[SessionRecord] = []

        async def admit(record: SessionRecord) -> None:
            if await store.admit(record, 3):
                admitted.append(record)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.release, held[0])
            for record in newcomers:
                nursery.start_soon(admit, record)
        assert len(admitted) <= 1
        assert set(_ids(await store.sessions(ADDRESS))) == set(_ids(held[1:] + admitted))

    async def test_aclose_is_idempotent(self, store: SessionStore) -> None:
        await store.aclose()
        await store.aclose()


JSON_VALUES = [
    None,
    True,
    False,
    0,
    -7,
    2**53,
    1.5,
    "",
    "plain text",
    "ünïcødé ✓ 🔑",
    [],
    [1, "two", None, False, 3.25],
    {},
    {"owner": "alice", "scopes": ["read", "write"]},
    {
        "user": {"id": 42, "name": "Bob", "active": True, "ratio": 0.25},
        "tags": [{"k": "v"}, [1, [2, [3]]], None],
        "empty": {"list": [], "dict": {}, "none": None},
    },
]
"""Metadata every key store must round-trip exactly."""


@pytest.mark.trio
class KeyStoreContract:
    """The :class:`~asyncapy.domain.ports.KeyStore` contract.

    Subclass it and provide a ``store`` fixture returning a fresh, empty key store.
    """

    async def test_is_a_key_store(self, store: KeyStore) -> None:
        assert isinstance(store, KeyStore)

    async def test_put_get_contains(self, store: KeyStore) -> None:
        assert await store.contains("key-1") is False
        await store.put("key-1", {"owner": "alice"})
        assert await store.contains("key-1") is True
        assert await store.get("key-1") == {"owner": "alice"}

    async def test_keys_are_independent(self, store: KeyStore) -> None:
        await store.put("key-1", {"n": 1})
        await store.put("key-2", {"n": 2})
        assert await store.get("key-1") == {"n": 1}
        assert await store.get("key-2") == {"n": 2}
        await store.delete("key-1")
        assert await store.contains("key-1") is False
        assert await store.get("key-2") == {"n": 2}

    async def test_put_replaces_metadata(self, store: KeyStore) -> None:
        await store.put("key-1", {"v": 1})
        await store.put("key-1", {"w": 2})
        assert await store.get("key-1") == {"w": 2}

    async def test_delete(self, store: KeyStore) -> None:
        await store.put("key-1", None)
        await store.delete("key-1")
        assert await store.contains("key-1") is False
        with pytest.raises(KeyError):
            await store.get("key-1")
        with pytest.raises(KeyError):
            await store.delete("key-1")

    async def test_get_missing_raises_key_error(self, store: KeyStore) -> None:
        with pytest.raises(KeyError):
            await store.get("missing")

    async def test_delete_missing_raises_key_error(self, store: KeyStore) -> None:
        await store.put("present", 1)
        with pytest.raises(KeyError):
            await store.delete("missing")
        assert await store.get("present") == 1

    async def test_update_missing_raises_and_creates_nothing(self, store: KeyStore) -> None:
        with pytest.raises(KeyError):
            await store.update("missing", {"v": 1})
        assert await store.contains("missing") is False

    async def test_replace_missing_raises_and_creates_nothing(self, store: KeyStore) -> None:
        with pytest.raises(KeyError):
            await store.replace("missing", "new-key")
        assert await store.contains("missing") is False
        assert await store.contains("new-key") is False

    @pytest.mark.parametrize("metadata", JSON_VALUES, ids=repr)
    async def test_metadata_round_trips(self, store: KeyStore, metadata: Any) -> None:
        await store.put("key-1", copy.deepcopy(metadata))
        got = await store.get("key-1")
        assert _same_json(got, metadata), f"{got!r} != {metadata!r}"

    async def test_metadata_none_is_not_a_missing_key(self, store: KeyStore) -> None:
        await store.put("key-1", None)
        assert await store.contains("key-1") is True
        assert await store.get("key-1") is None

    async def test_returned_metadata_is_a_copy(self, store: KeyStore) -> None:
        await store.put("key-1", {"scopes": ["read"], "user": {"id": 1}})
        got = await store.get("key-1")
        got["scopes"].append("admin")
        got["user"]["id"] = 666
        got["new"] = True
        assert await store.get("key-1") == {"scopes": ["read"], "user": {"id": 1}}

    async def test_stored_metadata_is_a_copy(self, store: KeyStore) -> None:
        metadata = {"scopes": ["read"]}
        await store.put("key-1", metadata)
        metadata["scopes"].append("admin")
        assert await store.get("key-1") == {"scopes": ["read"]}

    async def test_update_replaces_metadata_of_an_existing_key(self, store: KeyStore) -> None:
        await store.put("key-1", {"v": 1})
        await store.put("key-2", {"v": 2})
        await store.update("key-1", {"v": 10, "extra": [1]})
        assert await store.get("key-1") == {"v": 10, "extra": [1]}
        assert await store.get("key-2") == {"v": 2}
        await store.update("key-1", None)
        assert await store.contains("key-1") is True
        assert await store.get("key-1") is None

    async def test_replace_moves_metadata(self, store: KeyStore) -> None:
        await store.put("old-key", {"owner": "alice", "n": [1, 2]})
        await store.put("bystander", {"owner": "bob"})
        await store.replace("old-key", "new-key")
        assert await store.contains("old-key") is False
        with pytest.raises(KeyError):
            await store.get("old-key")
        assert await store.contains("new-key") is True
        assert await store.get("new-key") == {"owner": "alice", "n": [1, 2]}
        assert await store.get("bystander") == {"owner": "bob"}
        with pytest.raises(KeyError):
            await store.replace("old-key", "newer-key")

    async def test_replaced_key_can_be_replaced_again(self, store: KeyStore) -> None:
        await store.put("k1", {"v": 1})
        await store.replace("k1", "k2")
        await store.replace("k2", "k3")
        assert [await store.contains(k) for k in ("k1", "k2", "k3")] == [False, False, True]
        assert await store.get("k3") == {"v": 1}

    @pytest.mark.parametrize("key", [None, 42, 4.2, b"key-1", ["key-1"], ("key-1",), {"key-1": 1}], ids=repr)
    async def test_contains_of_a_non_string_is_false(self, store: KeyStore, key: Any) -> None:
        await store.put("key-1", 1)
        assert await store.contains(key) is False

    async def test_keys_are_exact_strings(self, store: KeyStore) -> None:
        await store.put("Key-1", 1)
        for near in ("key-1", "Key-1 ", " Key-1", "Key-", "Key-10", ""):
            assert await store.contains(near) is False
        assert await store.contains("Key-1") is True

    async def test_unicode_keys(self, store: KeyStore) -> None:
        key = "ключ-🔑-clé"
        await store.put(key, {"ok": True})
        assert await store.contains(key) is True
        assert await store.get(key) == {"ok": True}
        await store.delete(key)
        assert await store.contains(key) is False

    async def test_concurrent_puts_are_all_kept(self, store: KeyStore) -> None:
        keys = [f"key-{n}" for n in range(20)]
        async with trio.open_nursery() as nursery:
            for n, key in enumerate(keys):
                nursery.start_soon(store.put, key, {"n": n})
        for n, key in enumerate(keys):
            assert await store.get(key) == {"n": n}

    async def test_a_key_with_a_rate_limit_keeps_it_through_every_operation(self, store: KeyStore) -> None:
        """A key's rate limit travels inside its record (:mod:`asyncapy.domain.keylimits`):
        the store keeps it as any JSON value, and moves and deletes it with the key."""
        limit = KeyLimit(Rate(100, 1), 50)
        record = wrap_key_record({"owner": "alice"}, limit)
        await store.put("key-1", record)
        assert unwrap_key_record(await store.get("key-1")) == ({"owner": "alice"}, limit)
        await store.update("key-1", wrap_key_record(["plan", "pro"], limit))
        await store.replace("key-1", "key-2")
        assert await store.contains("key-1") is False
        assert unwrap_key_record(await store.get("key-2")) == (["plan", "pro"], limit)
        await store.delete("key-2")
        assert await store.contains("key-2") is False

    async def test_aclose_is_idempotent(self, store: KeyStore) -> None:
        await store.aclose()
        await store.aclose()
