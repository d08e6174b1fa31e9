"""Dispatcher and Handler: groups, first match per group, propagation, failures, closed clients."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.lowlevel

from asyncapy.domain.dispatch import Dispatcher, Handler, HandlerFailed
from asyncapy.domain.errors import ERR_INTERNAL, ERR_UNAVAILABLE, StopPropagation, StoreUnavailable
from asyncapy.domain.filtering import Filter

PACKET = {"foo": "bar"}


class FakeClient:
    """All dispatch needs of a client: a ``closed`` attribute."""

    def __init__(self) -> None:
        self.closed = False


class Pass(Filter):
    def __init__(self, value, log: list | None = None, name: str = "") -> None:
        self.value, self.log, self.name = value, log, name

    def check(self, client, packet):
        if self.log is not None:
            self.log.append(self.name)
        return self.value


class AsyncPass(Pass):
    async def check(self, client, packet):
        await trio.lowlevel.checkpoint()
        if self.log is not None:
            self.log.append(self.name)
        return self.value


class Raising(Filter):
    def __init__(self, exc: BaseException, asynchronous: bool = False) -> None:
        self.exc, self.asynchronous = exc, asynchronous

    def check(self, client, packet):
        if self.asynchronous:
            return self._later()
        raise self.exc

    async def _later(self):
        await trio.lowlevel.checkpoint()
        raise self.exc


def recorder(log: list, name: str, action=None):
    """An async handler that logs its name (and what it received), then does ``action``."""

    async def handler(client, packet):
        assert packet is PACKET
        await trio.lowlevel.checkpoint()
        log.append(name)
        if action is not None:
            action(client, packet)

    handler.__qualname__ = name
    return handler


def stop(client, packet):
    raise StopPropagation()


def close(client, packet):
    client.closed = True


def fail(client, packet):
    raise ValueError("handler bug")


def dispatcher_with(*entries) -> Dispatcher:
    """``entries`` are ``(group, Handler)`` pairs, registered in the given order."""
    dispatcher = Dispatcher()
    for group, handler in entries:
        assert dispatcher.register(handler, group) is handler
    return dispatcher


# -- Handler --------------------------------------------------------------------------
def test_handler_refuses_synchronous_callables():
    def sync(client, packet):
        return None

    def generator(client, packet):
        yield

    async def async_generator(client, packet):
        yield

    class SyncCallable:
        def __call__(self, client, packet):
            return None

    for function in (sync, generator, async_generator, lambda c, p: None, SyncCallable(), print):
        with pytest.raises(TypeError, match="async"):
            Handler(function)
    for not_callable in (None, 42, "handler"):
        with pytest.raises(TypeError):
            Handler(not_callable)


def test_handler_accepts_async_callables():
    async def handler(client, packet, extra=None):
        return None

    class AsyncCallable:
        async def __call__(self, client, packet):
            return None

    class Methods:
        async def method(self, client, packet):
            return None

    for function in (handler, functools.partial(handler, extra=1), AsyncCallable(), Methods().method):
        assert Handler(function).function is function


def test_handler_refuses_objects_that_are_not_filters():
    async def handler(client, packet):
        return None

    with pytest.raises(TypeError, match="not a filter"):
        Handler(handler, [Pass(True), lambda client, packet: True])
    first, second = Pass(True), AsyncPass(False)
    assert Handler(handler, [first, second]).filters == (first, second)
    assert Handler(handler, iter([first])).filters == (first,)
    assert Handler(handler).filters == () and Handler(handler, None).filters == ()
    assert Handler(handler).name.endswith("handler")


async def test_handler_check_and_call():
    log: list = []
    handler = Handler(recorder(log, "h"), [Pass(True), AsyncPass(True)])
    assert await handler.check(FakeClient(), PACKET) is True
    assert Handler(recorder(log, "h"), [Pass(False)]).check(FakeClient(), PACKET) is False
    await handler.call(FakeClient(), PACKET)
    assert log == ["h"]


@pytest.mark.parametrize("group", ["0", 1.0, None, True])
def test_group_must_be_an_integer(group):
    async def handler(client, packet):
        return None

    dispatcher = Dispatcher()
    with pytest.raises(TypeError, match="group"):
        dispatcher.register(Handler(handler), group)
    assert len(dispatcher) == 0


# -- groups and propagation -----------------------------------------------------------
async def test_groups_run_in_ascending_order_regardless_of_registration_order():
    log: list = []
    dispatcher = dispatcher_with(
        (1, Handler(recorder(log, "one"))),
        (-1, Handler(recorder(log, "minus-one"))),
        (0, Handler(recorder(log, "zero"))),
        (10, Handler(recorder(log, "ten"))),
        (-5, Handler(recorder(log, "minus-five"))),
    )
    assert [group for group, _ in dispatcher.groups] == [-5, -1, 0, 1, 10]
    assert len(dispatcher) == 5
    assert await dispatcher.dispatch(FakeClient(), PACKET) == 5
    assert log == ["minus-five", "minus-one", "zero", "one", "ten"]


async def test_only_the_first_matching_handler_of_a_group_runs():
    log: list = []
    filter_log: list = []
    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "refused"), [Pass(False, filter_log, "f1")])),
        (0, Handler(recorder(log, "first-match"), [Pass(True, filter_log, "f2")])),
        (0, Handler(recorder(log, "second-match"), [Pass(True, filter_log, "f3")])),
        (0, Handler(recorder(log, "no-filter"))),
    )
    assert await dispatcher.dispatch(FakeClient(), PACKET) == 1
    assert log == ["first-match"]
    assert filter_log == ["f1", "f2"]  # later handlers' filters are not even asked


async def test_propagation_across_groups_with_first_match_in_each():
    log: list = []
    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "0a"), [Pass(False)])),
        (0, Handler(recorder(log, "0b"))),
        (1, Handler(recorder(log, "1a"), [Pass(False)])),  # group 1 has no match
        (2, Handler(recorder(log, "2a"), [AsyncPass(True)])),
        (2, Handler(recorder(log, "2b"))),
    )
    assert await dispatcher.dispatch(FakeClient(), PACKET) == 2
    assert log == ["0b", "2a"]


async def test_no_matching_handler_calls_nothing():
    log: list = []
    dispatcher = dispatcher_with((0, Handler(recorder(log, "h"), [Pass(False)])))
    assert await dispatcher.dispatch(FakeClient(), PACKET) == 0
    assert await Dispatcher().dispatch(FakeClient(), PACKET) == 0
    assert log == []


async def test_each_packet_starts_again_from_the_lowest_group():
    log: list = []
    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "stopper", stop))),
        (1, Handler(recorder(log, "later"))),
    )
    client = FakeClient()
    assert await dispatcher.dispatch(client, PACKET) == 1
    assert await dispatcher.dispatch(client, PACKET) == 1
    assert log == ["stopper", "stopper"]


# -- StopPropagation ------------------------------------------------------------------
async def test_stop_propagation_stops_later_groups_and_is_not_an_error():
    log: list = []
    dispatcher = dispatcher_with(
        (1, Handler(recorder(log, "after"))),
        (0, Handler(recorder(log, "stopper", stop))),
        (-1, Handler(recorder(log, "before"))),
    )
    client = FakeClient()
    assert await dispatcher.dispatch(client, PACKET) == 2
    assert log == ["before", "stopper"]
    assert client.closed is False  # stopping propagation does not close the session


# -- failures -------------------------------------------------------------------------
async def test_a_raising_handler_is_handler_failed_and_no_later_group_runs():
    log: list = []
    failing = Handler(recorder(log, "failing", fail))
    dispatcher = dispatcher_with(
        (-1, Handler(recorder(log, "before"))),
        (0, failing),
        (0, Handler(recorder(log, "same-group"))),
        (1, Handler(recorder(log, "after"))),
    )
    with pytest.raises(HandlerFailed) as info:
        await dispatcher.dispatch(FakeClient(), PACKET)
    assert log == ["before", "failing"]
    error = info.value
    assert type(error.__cause__) is ValueError and str(error.__cause__) == "handler bug"
    assert error.handler is failing and error.group == 0
    assert "failing" in str(error) and "group 0" in str(error)


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_raising_filter_is_handler_failed_and_nothing_else_runs(asynchronous):
    log: list = []
    guarded = Handler(recorder(log, "guarded"), [Pass(True), Raising(LookupError("store down"), asynchronous)])
    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "zero"))),
        (3, guarded),
        (3, Handler(recorder(log, "same-group"))),
        (4, Handler(recorder(log, "after"))),
    )
    with pytest.raises(HandlerFailed) as info:
        await dispatcher.dispatch(FakeClient(), PACKET)
    assert log == ["zero"]
    assert type(info.value.__cause__) is LookupError
    assert info.value.handler is guarded and info.value.group == 3


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_store_out_of_reach_in_a_filter_is_err_unavailable_and_nothing_else_runs(asynchronous):
    """An API-key check that could not be made: "retry later", not "your key is bad"
    (the next handler of the group, unguarded, does not run either), not a bug."""
    log: list = []
    guarded = Handler(recorder(log, "guarded"), [Raising(StoreUnavailable("Redis is unreachable"), asynchronous)])
    dispatcher = dispatcher_with((0, guarded), (0, Handler(recorder(log, "fallback"))))
    with pytest.raises(HandlerFailed) as info:
        await dispatcher.dispatch(FakeClient(), PACKET)
    assert log == []
    failure = info.value
    assert failure.unavailable is True and failure.code == ERR_UNAVAILABLE
    assert str(failure) == "a filter of handler guarded (group 0) needed a store, which is unavailable: Redis is unreachable"


@pytest.mark.parametrize("sole", [True, False])
async def test_a_store_out_of_reach_in_a_handler_is_err_unavailable(sole):
    """``await client.get_sessions()`` (or ``keys.aget``) in a handler during an outage."""

    async def asks_the_store(client, packet):
        raise StoreUnavailable("Redis is unreachable")

    handler = Handler(asks_the_store)
    pairs = [(0, handler)] if sole else [(0, Handler(recorder([], "first"), [Pass(False)])), (0, handler)]
    dispatcher = dispatcher_with(*pairs)
    assert (dispatcher.sole is not None) is sole
    with pytest.raises(HandlerFailed) as info:
        await dispatcher.dispatch(FakeClient(), PACKET)
    assert info.value.code == ERR_UNAVAILABLE and info.value.unavailable
    assert str(info.value).startswith("handler ") and "Redis is unreachable" in str(info.value)


async def test_any_other_failure_is_err_internal():
    dispatcher = dispatcher_with((0, Handler(recorder([], "failing", fail))))
    with pytest.raises(HandlerFailed) as info:
        await dispatcher.dispatch(FakeClient(), PACKET)
    assert info.value.code == ERR_INTERNAL and not info.value.unavailable
    assert str(info.value).endswith("(group 0) raised")


async def test_stop_propagation_from_a_filter_still_stops_quietly():
    log: list = []
    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "stopped"), [Raising(StopPropagation())])),
        (1, Handler(recorder(log, "later"))),
    )
    assert await dispatcher.dispatch(FakeClient(), PACKET) == 0
    assert log == []


async def test_base_exceptions_are_not_wrapped():
    def interrupt(client, packet):
        raise KeyboardInterrupt

    dispatcher = dispatcher_with((0, Handler(recorder([], "h", interrupt))))
    with pytest.raises(KeyboardInterrupt):
        await dispatcher.dispatch(FakeClient(), PACKET)


async def test_cancellation_passes_through_dispatch():
    async def sleeper(client, packet):
        await trio.sleep_forever()

    dispatcher = dispatcher_with((0, Handler(sleeper)))
    with trio.move_on_after(0.01) as scope:
        await dispatcher.dispatch(FakeClient(), PACKET)
    assert scope.cancelled_caught


# -- filters in dispatch --------------------------------------------------------------
async def test_async_and_mixed_filters_are_awaited():
    log: list = []
    filter_log: list = []
    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "async-refused"), [AsyncPass(False, filter_log, "a1")])),
        (0, Handler(recorder(log, "mixed-refused"), [Pass(True, filter_log, "s1"), AsyncPass(0, filter_log, "a2")])),
        (0, Handler(recorder(log, "mixed"), [AsyncPass(True, filter_log, "a3"), Pass(True, filter_log, "s2")])),
        (1, Handler(recorder(log, "composed"), [(Pass(False) | AsyncPass(True)) & ~AsyncPass(False)])),
        (2, Handler(recorder(log, "negated"), [~AsyncPass(True)])),
    )
    assert await dispatcher.dispatch(FakeClient(), PACKET) == 2
    assert log == ["mixed", "composed"]
    assert filter_log == ["a1", "s1", "a2", "a3", "s2"]


async def test_filters_see_the_client_and_the_packet():
    seen: list = []

    class Spy(Filter):
        def check(self, client, packet):
            seen.append((client, packet))
            return True

    client = FakeClient()
    dispatcher = dispatcher_with((0, Handler(recorder([], "h"), [Spy()])))
    await dispatcher.dispatch(client, PACKET)
    assert seen == [(client, PACKET)]


# -- a closed client ------------------------------------------------------------------
async def test_a_handler_that_closes_the_client_stops_propagation():
    log: list = []
    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "closer", close))),
        (1, Handler(recorder(log, "after"))),
    )
    client = FakeClient()
    assert await dispatcher.dispatch(client, PACKET) == 1
    assert log == ["closer"] and client.closed


async def test_closed_is_read_after_every_group_even_without_a_match():
    log: list = []

    class ClosingFilter(Filter):
        def check(self, client, packet):
            client.closed = True  # e.g. a filter that decided to drop the client
            return False

    dispatcher = dispatcher_with(
        (0, Handler(recorder(log, "never"), [ClosingFilter()])),
        (1, Handler(recorder(log, "after"))),
    )
    assert await dispatcher.dispatch(FakeClient(), PACKET) == 0
    assert log == []



async def test_the_single_handler_fast_path_behaves_like_the_loops():
    """One group whose first handler has no filter: dispatched without the loops, but
    with the same outcomes (recorded handler, StopPropagation, HandlerFailed)."""
    calls = []

    async def only(client, packet):
        calls.append(packet)
        if packet == "stop":
            raise StopPropagation
        if packet == "boom":
            raise KeyError("boom")

    dispatcher = Dispatcher()
    handler = dispatcher.register(Handler(only), group=3)
    assert dispatcher.sole == (3, handler)
    client = FakeClient()
    assert await dispatcher.dispatch(client, "ok") == 1
    assert client.handler is handler
    assert await dispatcher.dispatch(client, "stop") == 1
    with pytest.raises(HandlerFailed) as failed:
        await dispatcher.dispatch(client, "boom")
    assert failed.value.group == 3 and isinstance(failed.value.__cause__, KeyError)
    assert calls == ["ok", "stop", "boom"]
    dispatcher.register(Handler(only), group=4)
    assert dispatcher.sole is None  # two groups: propagation needs the loops
