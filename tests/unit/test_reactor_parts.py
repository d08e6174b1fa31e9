"""The reactor's parts that need no socket: resuming a coroutine stepped by hand (what a
handler that suspends goes through), and the ``reactor`` setting.

The reactor itself is tested against real sockets in ``tests/e2e/test_reactor.py`` and
over both serving paths in every module of ``BOTH_PATHS`` (``tests/e2e/conftest.py``)."""

from __future__ import annotations

import contextvars

import pytest
import trio

from asyncapy.config import ConfigError, make_settings
from asyncapy.reactor import _resume
from asyncapy.server import Server

MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="none")


async def stepped(coro, context: contextvars.Context):
    """What the reactor does with a handler's coroutine: one step by hand, then, if it
    suspended, the rest through :func:`_resume`."""
    try:
        trap = context.run(coro.send, None)
    except StopIteration as done:
        return ("inline", done.value)
    return ("resumed", await _resume(coro, trap, context))


async def test_a_coroutine_that_never_suspends_completes_inline():
    async def handler():
        return 42

    assert await stepped(handler(), contextvars.copy_context()) == ("inline", 42)


async def test_a_suspended_coroutine_goes_on_in_this_task_and_in_its_context():
    context = contextvars.copy_context()
    context.run(MARK.set, "session")
    seen = []

    async def handler():
        seen.append((MARK.get(), trio.lowlevel.current_task()))
        await trio.sleep(0.01)
        seen.append((MARK.get(), trio.lowlevel.current_task()))
        return "done"

    assert await stepped(handler(), context) == ("resumed", "done")
    task = trio.lowlevel.current_task()
    assert seen == [("session", task), ("session", task)]
    assert MARK.get() == "none"  # the caller's own context is untouched


async def test_a_cancellation_reaches_the_suspended_coroutine_and_its_cleanup_runs():
    cleaned = []

    async def handler():
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(True)

    with trio.move_on_after(0.01) as scope:
        await stepped(handler(), contextvars.copy_context())
    assert scope.cancelled_caught and cleaned == [True]


async def test_a_cancel_scope_opened_inline_works_once_resumed():
    """A handler's own deadline (handler_timeout's move_on_after) entered before the
    first suspension, in the stepping task, ends it after the suspension."""

    async def handler():
        with trio.move_on_after(0.01) as deadline:
            await trio.sleep(5)
        return deadline.cancelled_caught

    assert await stepped(handler(), contextvars.copy_context()) == ("resumed", True)


async def test_an_exception_after_the_suspension_comes_out_of_resume():
    async def handler():
        await trio.lowlevel.checkpoint()
        raise ValueError("in the handler")

    with pytest.raises(ValueError, match="in the handler"):
        await stepped(handler(), contextvars.copy_context())


def test_the_reactor_setting_is_on_by_default_and_checked():
    assert make_settings().reactor is True
    assert make_settings({"reactor": False}).reactor is False
    with pytest.raises(ConfigError, match="reactor"):
        make_settings({"reactor": "sometimes"})
    server = Server(reactor=False)
    assert server.reactor is False
    with pytest.raises(ConfigError, match="reactor"):
        server.reactor = "maybe"  # type: ignore[assignment]
