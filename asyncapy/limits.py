"""Fair share while serving: the rate limits and the failed-key-check throttle, as the
sessions of one server apply them.

The decisions are the pure core's (:mod:`asyncapy.domain.ratelimit`,
:mod:`asyncapy.domain.throttle`); where a limit's state lives is the
:class:`~asyncapy.domain.ports.RateLimiter` port's (in memory, or in Redis so that every
process sharing the store shares the limit). This room says when each is asked:

* **per address**: every packet, before its handlers, when ``rate_limit`` is set
  (:meth:`Limits.packet`, from :class:`~asyncapy.session_protocol.SessionProtocol`);
* **per API key**: every packet whose key a ``Filters.APIFactory`` accepted, when the
  key was issued with a limit (:meth:`Limits.charge_key`);
* **failed key checks**: before a key is looked up, an address that has failed too
  many checks is refused without a store call (:meth:`Limits.before_key_check`,
  :meth:`Limits.key_check_failed`).

A packet over a limit is answered ``ERR_RATE_LIMITED`` with ``retry_after``; its
session goes on. A limiter that cannot be reached lets packets through (fail open,
one warning a second): an outage of the limits' store must not become an outage of
the API, and the session store's own checks still hold.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Optional

from asyncapy.domain.addresses import session_group
from asyncapy.domain.errors import RateLimited, StoreUnavailable
from asyncapy.domain.ports import RateLimiter
from asyncapy.domain.throttle import KeyFailureThrottle

from .logs import LimitedLog
from .metrics import NULL_RECORDER, Recorder

__all__ = ["Limits"]

logger: logging.Logger = logging.getLogger("asyncapy.server")


def _now_us() -> int:
    return time.monotonic_ns() // 1000


class Limits:
    """The limits of one server's sessions.

    :param settings: the server's :class:`~asyncapy.config.Settings` (``rate_limit``,
        ``rate_burst``, ``key_failure_limit``, ``key_failure_burst``,
        ``session_limit_ipv6_prefix``).
    :param limiter: where the per-address and per-key limits' state lives.
    :param recorder: where ``asyncapy_rate_limited_total`` is counted.
    """

    __slots__ = ("rate", "burst", "prefix", "limiter", "recorder", "throttle", "outage_log", "failure_log")

    def __init__(self, settings: Any, limiter: RateLimiter, recorder: Recorder = NULL_RECORDER) -> None:
        self.rate: Any = settings.rate_limit
        """The per-address rate (a :class:`~asyncapy.domain.ratelimit.Rate`), or None."""
        self.burst: int = settings.rate_burst
        self.prefix: int = settings.session_limit_ipv6_prefix
        self.limiter: RateLimiter = limiter
        self.recorder: Recorder = recorder
        self.throttle: Optional[KeyFailureThrottle] = None
        """The failed-key-check throttle, or None when ``key_failure_limit`` is off."""
        if settings.key_failure_limit is not None:
            self.throttle = KeyFailureThrottle(settings.key_failure_limit, settings.key_failure_burst)
        self.outage_log: LimitedLog = LimitedLog(logger, "limiter failures alike", 1, 1.0)
        self.failure_log: LimitedLog = LimitedLog(logger, "failed API key checks", 1, 1.0)

    # -- per address --------------------------------------------------------------------------
    async def packet(self, group: str) -> Optional[float]:
        """Charge one packet to the address group ``group``: None if it may be served
        (or there is no per-address limit), else the seconds after which one would be."""
        if self.rate is None:
            return None
        try:
            decision = await self.limiter.acquire("address:" + group, self.rate, self.burst)
        except StoreUnavailable as exc:
            self.outage_log.warning("Rate limits not applied (the limiter is unavailable): %s", exc)
            return None
        if decision.allowed:
            return None
        self.recorder.rate_limited("address")
        return decision.retry_after

    # -- API keys -----------------------------------------------------------------------------
    def before_key_check(self, address: str) -> None:
        """Raise :class:`~asyncapy.domain.errors.RateLimited` (no store call then) if
        ``address``'s group has failed too many key checks lately."""
        throttle = self.throttle
        if throttle is None:
            return
        decision = throttle.check(session_group(address, self.prefix), _now_us())
        if not decision.allowed:
            self.recorder.rate_limited("key_failures")
            raise RateLimited(decision.retry_after, "key_failures")

    def key_check_failed(self, address: str, fingerprint: str) -> None:
        """Count a key check from ``address`` that found no such key (logged at most
        once a second, the key by its ``fingerprint`` only)."""
        if self.throttle is not None:
            self.throttle.failed(session_group(address, self.prefix), _now_us())
        self.failure_log.log(logging.INFO, "Failed API key check from %s (key %s)", address, fingerprint)

    async def charge_key(self, factory: Any, key: str) -> None:
        """Charge one packet to ``key``'s own limit, if it was issued with one; raise
        :class:`~asyncapy.domain.errors.RateLimited` when it is over it. The limiter
        sees a digest of the key, never the key."""
        try:
            limit = await factory.arate_limit(key)
        except KeyError:  # accepted by a 0.5 subclass's own __contains__, not in the store
            return
        if limit is None:
            return
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        try:
            decision = await self.limiter.acquire("key:" + digest, limit.rate, limit.burst)
        except StoreUnavailable as exc:
            self.outage_log.warning("Rate limits not applied (the limiter is unavailable): %s", exc)
            return
        if not decision.allowed:
            self.recorder.rate_limited("key")
            raise RateLimited(decision.retry_after, "key")
