"""Rate limits stored with an API key: a value, and how it travels inside the key's record.

A key issued with a limit (``APIKeyFactory.issue(metadata, rate_limit="100/s")``)
carries a :class:`KeyLimit` in its store record, beside the metadata the application
gave it. The record stays one JSON value, so every key store (memory, Redis, SQLite,
a store of the user's, the coherent cache in front of Redis) keeps the limit without
knowing of it, and every operation that is atomic for the record (a reissue's move,
a revocation) is atomic for the limit too. A key without a limit is stored exactly as
in 0.5: its metadata and nothing else.

A limited key's record is the map::

    {"asyncapy:rate_limit": {"rate": "100/s", "burst": 50}, "asyncapy:metadata": METADATA}

and those two names together are reserved: metadata that is a map of exactly these
two keys is read as such a record. :func:`wrap` and :func:`unwrap` are the only code
that knows the layout.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

from .ratelimit import Rate, check_burst, parse_rate

__all__ = ["KeyLimit", "key_limit", "wrap", "unwrap", "LIMIT_FIELD", "METADATA_FIELD"]

LIMIT_FIELD = "asyncapy:rate_limit"
"""The record's entry holding the limit."""
METADATA_FIELD = "asyncapy:metadata"
"""The record's entry holding the application's metadata."""


@attrs.frozen
class KeyLimit:
    """One API key's rate limit: ``rate`` with ``burst`` (see :mod:`domain.ratelimit`)."""

    rate: Rate
    """The steady rate."""
    burst: int = 0
    """Requests allowed at once above the rate."""

    def to_json(self) -> dict[str, Any]:
        """The limit as stored: ``{"rate": "100/s", "burst": 50}``."""
        return {"rate": str(self.rate), "burst": self.burst}

    @classmethod
    def from_json(cls, value: Any) -> "KeyLimit":
        """The limit a record holds; ``ValueError`` if it is not one (a record edited by
        hand), so that a broken limit is never silently dropped."""
        if type(value) is not dict or set(value) != {"rate", "burst"}:
            raise ValueError(f"an API key's stored rate limit is malformed: {value!r}")
        return cls(parse_rate(value["rate"], name="stored rate_limit"), check_burst(value["burst"], name="stored rate_burst"))

    def __str__(self) -> str:
        return f"{self.rate} burst {self.burst}"


def key_limit(rate_limit: object, rate_burst: object = 0) -> Optional[KeyLimit]:
    """The :class:`KeyLimit` of ``rate_limit`` (a rate or its text, ``"100/s"``; None:
    no limit) and ``rate_burst``; ``ValueError`` naming the bad one."""
    burst = check_burst(rate_burst, name="rate_burst")
    if rate_limit is None:
        return None
    return KeyLimit(parse_rate(rate_limit, name="rate_limit"), burst)


def wrap(metadata: Any, limit: Optional[KeyLimit]) -> Any:
    """The record to store for a key with ``metadata`` and ``limit`` (just the metadata
    when there is no limit, as in 0.5)."""
    if limit is None:
        return metadata
    return {LIMIT_FIELD: limit.to_json(), METADATA_FIELD: metadata}


def unwrap(record: Any) -> tuple[Any, Optional[KeyLimit]]:
    """``(metadata, limit)`` of a stored record (``limit`` None when it has none)."""
    if type(record) is dict and len(record) == 2 and LIMIT_FIELD in record and METADATA_FIELD in record:
        return record[METADATA_FIELD], KeyLimit.from_json(record[LIMIT_FIELD])
    return record, None
