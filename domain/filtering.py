"""Filters: predicates on ``(client, packet)`` that guard handlers.

A filter's :meth:`Filter.check` returns a bool, or an awaitable of one when the
answer needs I/O (an API-key lookup in a shared store). Whoever evaluates filters
uses :func:`evaluate`, which awaits only when it has to, so purely synchronous filter
chains cost no coroutine switch. Filters compose with ``&``, ``|`` and ``~``, with
short-circuit evaluation left to right.
"""

from __future__ import annotations

from inspect import isawaitable
from typing import Any, Awaitable, Protocol, Union

__all__ = ["Filter", "SupportsCheck", "evaluate", "All", "Any_", "Not"]

CheckResult = Union[bool, Awaitable[bool]]
"""What ``check`` returns: a bool, or an awaitable of one when the answer needs I/O."""


class SupportsCheck(Protocol):
    """What guards a handler: anything with ``check(client, packet)`` (a
    :class:`Filter` subclass, or an object of its own that has the method)."""

    def check(self, client: Any, packet: Any) -> CheckResult:
        """Whether ``client``/``packet`` may reach the guarded handler."""
        ...


class Filter:
    """The base of every filter.

    Subclass it and implement ``check(client, packet)``, returning ``True`` to let the
    pair through. ``check`` may be ``async def`` (or return an awaitable) when it needs
    I/O; it must not block the event loop. Combine filters with ``a & b``, ``a | b`` and
    ``~a``.
    """

    def check(self, client: Any, packet: Any) -> CheckResult:
        """Whether ``client``/``packet`` may reach the guarded handler.

        The base filter has no opinion and lets everything through.
        """
        return True

    def __and__(self, other: SupportsCheck) -> "All":
        return All(self, _require_filter(other))

    def __or__(self, other: SupportsCheck) -> "Any_":
        return Any_(self, _require_filter(other))

    def __invert__(self) -> "Not":
        return Not(self)


def _require_filter(obj: Any) -> SupportsCheck:
    if not hasattr(obj, "check"):
        raise TypeError(f"filters combine only with filters, not {obj!r}")
    checked: SupportsCheck = obj
    return checked


async def _finish_all(pending: Awaitable[bool], rest: tuple[SupportsCheck, ...], client: Any, packet: Any) -> bool:
    if not await pending:
        return False
    for flt in rest:
        result = flt.check(client, packet)
        if isawaitable(result):
            result = await result
        if not result:
            return False
    return True


def evaluate(filters: tuple[SupportsCheck, ...], client: Any, packet: Any) -> CheckResult:
    """All of ``filters`` pass (left to right, stopping at the first that fails).

    Returns a plain bool when every filter answered synchronously, else an awaitable.
    """
    for index, flt in enumerate(filters):
        result = flt.check(client, packet)
        if isawaitable(result):
            return _finish_all(result, filters[index + 1 :], client, packet)
        if not result:
            return False
    return True


class All(Filter):
    """``a & b``: passes when every operand passes."""

    def __init__(self, *filters: SupportsCheck) -> None:
        self.filters = filters

    def check(self, client: Any, packet: Any) -> CheckResult:
        return evaluate(self.filters, client, packet)

    def __repr__(self) -> str:
        return "(" + " & ".join(map(repr, self.filters)) + ")"


async def _finish_any(pending: Awaitable[bool], rest: tuple[SupportsCheck, ...], client: Any, packet: Any) -> bool:
    if await pending:
        return True
    for flt in rest:
        result = flt.check(client, packet)
        if isawaitable(result):
            result = await result
        if result:
            return True
    return False


class Any_(Filter):
    """``a | b``: passes when at least one operand passes."""

    def __init__(self, *filters: SupportsCheck) -> None:
        self.filters = filters

    def check(self, client: Any, packet: Any) -> CheckResult:
        filters = self.filters
        for index, flt in enumerate(filters):
            result = flt.check(client, packet)
            if isawaitable(result):
                return _finish_any(result, filters[index + 1 :], client, packet)
            if result:
                return True
        return False

    def __repr__(self) -> str:
        return "(" + " | ".join(map(repr, self.filters)) + ")"


async def _negate(pending: Awaitable[bool]) -> bool:
    return not await pending


class Not(Filter):
    """``~a``: passes when its operand fails."""

    def __init__(self, inner: SupportsCheck) -> None:
        self.inner = inner

    def check(self, client: Any, packet: Any) -> CheckResult:
        result = self.inner.check(client, packet)
        if isawaitable(result):
            return _negate(result)
        return not result

    def __repr__(self) -> str:
        return f"~{self.inner!r}"
