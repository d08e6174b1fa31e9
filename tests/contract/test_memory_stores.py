"""The in-memory stores (adapters/memory.py) against the store contracts.

Each adapter is one small class: subclass the contract, provide a ``store`` fixture
that returns a fresh instance. A Redis adapter joins by adding two more such classes.
"""

import pytest

from asyncapy.adapters.memory import MemoryKeyStore, MemorySessionStore
from asyncapy.testing.contracts import KeyStoreContract, SessionStoreContract


class TestMemorySessionStore(SessionStoreContract):
    @pytest.fixture
    def store(self):
        return MemorySessionStore()


class TestMemoryKeyStore(KeyStoreContract):
    @pytest.fixture
    def store(self):
        return MemoryKeyStore()


# -- beyond the contract: what only the in-memory adapters promise -------------------
def test_memory_stores_run_without_an_event_loop():
    """Their coroutines never suspend, so synchronous code can drive them."""
    from asyncapy.domain.ports import SessionRecord, run_to_completion

    sessions = MemorySessionStore()
    record = SessionRecord("id-1", "198.51.100.1", 1.0)
    assert run_to_completion(sessions.admit(record, 1)) is True
    assert run_to_completion(sessions.admit(SessionRecord("id-2", "198.51.100.1", 2.0), 1)) is False
    assert run_to_completion(sessions.sessions("198.51.100.1")) == [record]

    keys = MemoryKeyStore()
    run_to_completion(keys.put("k", {"v": 1}))
    assert run_to_completion(keys.get("k")) == {"v": 1}
    assert len(keys) == 1


async def test_memory_session_store_forgets_addresses_without_sessions():
    """A long-running server sees many addresses: empty ones must not accumulate."""
    from asyncapy.domain.ports import SessionRecord

    store = MemorySessionStore()
    records = [SessionRecord(f"id-{n}", f"198.51.100.{n}", float(n)) for n in range(50)]
    for record in records:
        assert await store.admit(record, 1) is True
    assert repr(store) == "MemorySessionStore(50 sessions)"
    for record in records:
        await store.release(record)
    assert store._by_address == {}
    assert repr(store) == "MemorySessionStore(0 sessions)"
