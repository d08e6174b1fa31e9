"""The contract suites have teeth: deliberately broken stores fail them.

Each mutant below breaks one rule of a port; the contract test guarding that rule is
called directly against it and must fail. A last test runs the contracts the way a
user would, in a fresh pytest session without ``trio_mode``, with both a synchronous
and an ``async`` ``store`` fixture.
"""

import copy

import pytest
import trio
import trio.lowlevel

from asyncapy.adapters.memory import MemoryKeyStore, MemorySessionStore
from asyncapy.testing.contracts import KeyStoreContract, SessionStoreContract

pytest_plugins = ["pytester"]


# -- session-store mutants -----------------------------------------------------------
class ReadThenWriteSessionStore(MemorySessionStore):
    """Counts, yields to the scheduler, then inserts: the race the port forbids."""

    async def admit(self, record, limit):
        live = await self.sessions(record.address)
        await trio.lowlevel.checkpoint()
        if limit and len(live) >= limit:
            return False
        return await super().admit(record, 0)


class ZeroMeansZeroSessionStore(MemorySessionStore):
    async def admit(self, record, limit):
        if limit == 0:
            return False
        return await super().admit(record, limit)


class GlobalLimitSessionStore(MemorySessionStore):
    """Counts every address together instead of per address."""

    async def admit(self, record, limit):
        total = sum(map(len, self._by_address.values()))
        if limit and total >= limit:
            return False
        return await super().admit(record, 0)


class StrictReleaseSessionStore(MemorySessionStore):
    async def release(self, record):
        if record not in await self.sessions(record.address):
            raise KeyError(record.session_id)
        await super().release(record)


class LossySessionStore(MemorySessionStore):
    """Drops the server id and rounds the date."""

    async def sessions(self, address):
        return [
            type(r)(r.session_id, r.address, round(r.date)) for r in await super().sessions(address)
        ]


class NewestFirstSessionStore(MemorySessionStore):
    async def sessions(self, address):
        return list(reversed(await super().sessions(address)))


class CappedSessionStore(MemorySessionStore):
    """Lists at most 8,000 sessions: what a Lua script that unpack()s every id at once
    does (Redis refuses past about 8,000), short of failing outright."""

    async def sessions(self, address):
        return (await super().sessions(address))[:8000]


SESSION_MUTANTS = [
    (ReadThenWriteSessionStore, "test_concurrent_admissions_admit_exactly_the_limit", {"tasks": 20, "limit": 5}),
    (ZeroMeansZeroSessionStore, "test_limit_zero_means_unlimited", {}),
    (GlobalLimitSessionStore, "test_limit_is_per_address", {}),
    (StrictReleaseSessionStore, "test_releasing_an_unknown_session_is_not_an_error", {}),
    (LossySessionStore, "test_sessions_preserve_records", {}),
    (NewestFirstSessionStore, "test_sessions_are_listed_oldest_first", {}),
    (CappedSessionStore, "test_sessions_lists_any_number_of_sessions", {}),
]


@pytest.mark.parametrize(("mutant", "test_name", "params"), SESSION_MUTANTS, ids=lambda v: getattr(v, "__name__", None))
async def test_session_contract_rejects(mutant, test_name, params):
    contract = SessionStoreContract()
    with pytest.raises((AssertionError, KeyError)):
        await getattr(contract, test_name)(store=mutant(), **params)
    # ... while the same test passes against the real adapter.
    await getattr(contract, test_name)(store=MemorySessionStore(), **params)


# -- key-store mutants ---------------------------------------------------------------
class AliasingKeyStore(MemoryKeyStore):
    async def get(self, key):
        return self._keys[key]


class TrustingKeyStore(MemoryKeyStore):
    async def put(self, key, metadata):
        self._keys[key] = metadata


class CopyingReplaceKeyStore(MemoryKeyStore):
    """Forgets to remove the old key."""

    async def replace(self, old_key, new_key):
        self._keys[new_key] = copy.deepcopy(self._keys[old_key])


class UpsertKeyStore(MemoryKeyStore):
    async def update(self, key, metadata):
        await self.put(key, metadata)


class QuietDeleteKeyStore(MemoryKeyStore):
    async def delete(self, key):
        self._keys.pop(key, None)


class NaiveContainsKeyStore(MemoryKeyStore):
    async def contains(self, key):
        return key in self._keys


class StringifyingKeyStore(MemoryKeyStore):
    """Keeps metadata as its str(): round trips only strings."""

    async def put(self, key, metadata):
        self._keys[key] = str(metadata)


KEY_MUTANTS = [
    (AliasingKeyStore, "test_returned_metadata_is_a_copy", {}),
    (TrustingKeyStore, "test_stored_metadata_is_a_copy", {}),
    (CopyingReplaceKeyStore, "test_replace_moves_metadata", {}),
    (UpsertKeyStore, "test_update_missing_raises_and_creates_nothing", {}),
    (QuietDeleteKeyStore, "test_delete_missing_raises_key_error", {}),
    (NaiveContainsKeyStore, "test_contains_of_a_non_string_is_false", {"key": ["key-1"]}),
    (StringifyingKeyStore, "test_metadata_round_trips", {"metadata": None}),
]


@pytest.mark.parametrize(("mutant", "test_name", "params"), KEY_MUTANTS, ids=lambda v: getattr(v, "__name__", None))
async def test_key_contract_rejects(mutant, test_name, params):
    contract = KeyStoreContract()
    with pytest.raises((AssertionError, pytest.fail.Exception, TypeError)):
        await getattr(contract, test_name)(store=mutant(), **params)
    await getattr(contract, test_name)(store=MemoryKeyStore(), **params)


# -- the contracts as a user runs them -----------------------------------------------
USER_TEST_FILE = '''
import pytest
from asyncapy.adapters.memory import MemoryKeyStore, MemorySessionStore
from asyncapy.testing.contracts import KeyStoreContract, SessionStoreContract

class TestSyncFixtureSessions(SessionStoreContract):
    @pytest.fixture
    def store(self):
        return MemorySessionStore()

class TestAsyncFixtureKeys(KeyStoreContract):
    @pytest.fixture
    async def store(self):
        store = MemoryKeyStore()
        yield store
        await store.aclose()
'''


def test_contracts_run_for_a_user_without_trio_mode(pytester):
    pytester.makepyfile(test_user_adapter=USER_TEST_FILE)
    pytester.makeini("[pytest]\n")  # no trio_mode: the contracts mark themselves
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    counts = result.parseoutcomes()
    expected = _collected(SessionStoreContract) + _collected(KeyStoreContract)
    assert counts == {"passed": expected}, result.stdout.str()


def _collected(contract) -> int:
    """How many tests a subclass of ``contract`` collects (parametrisations included)."""
    total = 0
    for name in dir(contract):
        if name.startswith("test_"):
            marks = getattr(getattr(contract, name), "pytestmark", [])
            size = 1
            for mark in marks:
                if mark.name == "parametrize":
                    size *= len(mark.args[1])
            total += size
    return total


BROKEN_USER_STORE = '''
import pytest
from asyncapy.adapters.memory import MemoryKeyStore
from asyncapy.testing.contracts import KeyStoreContract

class StampingStore(MemoryKeyStore):
    """Adds a field of its own to the metadata it moves."""

    async def replace(self, old_key, new_key):
        metadata = await self.get(old_key)
        await self.delete(old_key)
        await self.put(new_key, {**metadata, "moved": True})

class TestStamping(KeyStoreContract):
    @pytest.fixture
    def store(self):
        return StampingStore()
'''


def test_a_contract_failure_shows_the_values_that_differ(pytester):
    """In a user's own pytest run (a fresh process, as theirs is), the contracts'
    asserts are rewritten like a test file's: the failure names the values, not a bare
    ``AssertionError`` inside an ``ExceptionGroup``."""
    pytester.makepyfile(test_broken_adapter=BROKEN_USER_STORE)
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess(
        "-q", "-p", "no:cacheprovider", "-k", "test_replace_moves_metadata"
    )
    output = result.stdout.str()
    assert result.ret == 1, output
    assert "1 failed" in output, output
    # pytest's rewritten assert: both values, and what differs between them.
    assert "AssertionError: assert {'owner': 'al" in output, output
    assert "Left contains 1 more item:" in output and "{'moved': True}" in output, output
