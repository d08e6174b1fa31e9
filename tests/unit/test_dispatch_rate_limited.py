"""A filter or handler that finds a packet over a limit raises ``RateLimited``: dispatch
ends with ``ERR_RATE_LIMITED`` and its ``retry_after``, nothing else runs, and it is
told apart from an outage and from a bug."""

from __future__ import annotations

import pytest

from asyncapy.domain.dispatch import Handler, HandlerFailed
from asyncapy.domain.errors import ERR_INTERNAL, ERR_RATE_LIMITED, RateLimited, StoreUnavailable
from tests.unit.test_dispatch import FakeClient, Raising, dispatcher_with


@pytest.mark.parametrize("in_filter", [True, False])
async def test_rate_limited_is_err_rate_limited_with_retry_after(in_filter):
    ran: list = []

    async def handler(client, packet):
        if not in_filter:
            raise RateLimited(0.2501, "key_failures")
        ran.append("handler")

    async def fallback(client, packet):
        ran.append("fallback")

    guarded = Handler(handler, [Raising(RateLimited(0.2501, "key_failures"))] if in_filter else [])
    dispatcher = dispatcher_with((0, guarded), (0, Handler(fallback)), (1, Handler(fallback)))
    with pytest.raises(HandlerFailed) as info:
        await dispatcher.dispatch(FakeClient(), {"x": 1})
    failure = info.value
    assert ran == []
    assert failure.code == ERR_RATE_LIMITED and failure.rate_limited and not failure.unavailable
    assert failure.retry_after == 0.2501
    assert failure.payload == {"status": "failure", "error": ERR_RATE_LIMITED, "retry_after": 0.251}
    assert "over the key_failures rate limit; retry after 0.2501s" in str(failure)


@pytest.mark.parametrize("cause, code", [(StoreUnavailable("down"), "ERR_UNAVAILABLE"), (LookupError("bug"), ERR_INTERNAL)])
async def test_other_failures_keep_their_codes_and_a_plain_payload(cause, code):
    async def failing(client, packet):
        raise cause

    with pytest.raises(HandlerFailed) as info:
        await dispatcher_with((0, Handler(failing))).dispatch(FakeClient(), {"x": 1})
    assert info.value.code == code and not info.value.rate_limited
    assert info.value.payload == {"status": "failure", "error": code}


def test_rate_limited_defaults():
    plain = RateLimited()
    assert plain.retry_after == 0.0 and plain.limit == "" and str(plain) == "over a rate limit; retry after 0s"
