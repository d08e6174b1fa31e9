"""In-process stores: the embedded default, for a single server process.

Their coroutines never suspend, so every operation is atomic with respect to other
tasks of the same event loop, and they can be driven from synchronous code too
(:func:`asyncapy.domain.ports.run_to_completion`). Keys are kept in clear: the store lives and
dies with the process's memory.
"""

from __future__ import annotations

import copy
from typing import Any

from asyncapy.domain.ports import KeyStore, SessionRecord, SessionStore

__all__ = ["MemorySessionStore", "MemoryKeyStore"]


class MemorySessionStore(SessionStore):
    """Live sessions of this process, by address."""

    def __init__(self) -> None:
        self._by_address: dict[str, dict[str, SessionRecord]] = {}

    async def admit(self, record: SessionRecord, limit: int) -> bool:
        live = self._by_address.setdefault(record.address, {})
        if limit and len(live) >= limit:
            return False
        live[record.session_id] = record
        return True

    async def release(self, record: SessionRecord) -> None:
        live = self._by_address.get(record.address)
        if live is not None:
            live.pop(record.session_id, None)
            if not live:
                del self._by_address[record.address]

    async def sessions(self, address: str) -> list[SessionRecord]:
        return list(self._by_address.get(address, {}).values())

    def __repr__(self) -> str:
        return f"MemorySessionStore({sum(map(len, self._by_address.values()))} sessions)"


class MemoryKeyStore(KeyStore):
    """API keys in a dict. Metadata is copied in and out, as a shared store would."""

    def __init__(self) -> None:
        self._keys: dict[str, Any] = {}

    async def put(self, key: str, metadata: Any) -> None:
        self._keys[key] = copy.deepcopy(metadata)

    async def get(self, key: str) -> Any:
        return copy.deepcopy(self._keys[key])

    async def delete(self, key: str) -> None:
        del self._keys[key]

    async def contains(self, key: str) -> bool:
        return type(key) is str and key in self._keys

    async def replace(self, old_key: str, new_key: str) -> None:
        self._keys[new_key] = self._keys.pop(old_key)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"MemoryKeyStore({len(self._keys)} keys)"
