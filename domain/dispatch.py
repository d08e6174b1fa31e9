"""Dispatch: which handlers a packet reaches, in which order.

Handlers live in integer groups. Groups run in ascending order; inside a group the
handlers are tried in registration order and only the first whose filters all pass
is called. A packet that matched in one group goes on to the next (propagation)
unless the handler raised :class:`~domain.errors.StopPropagation`, or closed the
session. A handler or filter that raises ends the packet's dispatch with
:class:`HandlerFailed`, whose :attr:`~HandlerFailed.code` is the error the server
answers with: ``ERR_UNAVAILABLE`` when what raised was
:class:`~domain.errors.StoreUnavailable` (an API-key check, ``get_sessions()``... needed
a store that cannot be reached: "retry later"), ``ERR_RATE_LIMITED`` when it was
:class:`~domain.errors.RateLimited` (a filter found the packet over a limit),
``ERR_INTERNAL`` for anything else (a bug).
"""

from __future__ import annotations

import inspect
from inspect import isawaitable
from typing import Any, Awaitable, Callable, Iterable, Optional

from .errors import ERR_INTERNAL, ERR_RATE_LIMITED, ERR_UNAVAILABLE, RateLimited, StopPropagation, StoreUnavailable
from .filtering import CheckResult, SupportsCheck, evaluate
from .ratelimit import rate_limited_payload

__all__ = ["Handler", "HandlerFailed", "Dispatcher"]


class Handler:
    """An async function and the filters that guard it.

    ``check(client, packet)`` tells whether all filters pass (a bool, or an awaitable
    of one when a filter needs I/O); ``call(*args)`` awaits the function.
    """

    __slots__ = ("function", "filters")

    def __init__(
        self, function: Callable[..., Awaitable[Any]], filters: Optional[Iterable[SupportsCheck]] = None
    ) -> None:
        if not callable(function):
            raise TypeError(f"a handler must be an async function, not {function!r}")
        if not _is_async_callable(function):
            raise TypeError(
                f"handler {_name(function)} must be an async function "
                "(define it with 'async def'); blocking work belongs in "
                "server.run_sync_task()"
            )
        checks = tuple(filters or ())
        for flt in checks:
            if not callable(getattr(flt, "check", None)):
                raise TypeError(
                    f"{flt!r} is not a filter: filters need a check(client, packet) method"
                )
        self.function: Callable[..., Awaitable[Any]] = function
        self.filters: tuple[SupportsCheck, ...] = checks

    @property
    def name(self) -> str:
        """The function's qualified name, for logs."""
        return _name(self.function)

    def check(self, client: Any, packet: Any) -> CheckResult:
        """Whether every filter passes for this client/packet pair."""
        return evaluate(self.filters, client, packet)

    async def call(self, *args: Any) -> Any:
        """Await the handler function with ``args`` (normally ``client, packet``)."""
        return await self.function(*args)

    def __repr__(self) -> str:
        return f"Handler({self.name}, {list(self.filters)!r})"


def _is_async_callable(obj: Any) -> bool:
    while hasattr(obj, "func") and not inspect.isfunction(obj):  # functools.partial
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - the method itself: is it ``async def``?
    )


def _name(function: Any) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


class HandlerFailed(Exception):
    """A handler or one of its filters raised; ``__cause__`` is the original error.

    :attr:`code` is the error reply the packet gets (:attr:`payload` its whole
    payload), and :attr:`unavailable` says whether the cause was a store out of reach:
    an outage, which deserves one log line (the store adapter's message), not a
    traceback; :attr:`rate_limited` whether it was :class:`~domain.errors.RateLimited`,
    which is the client's doing and deserves no more than a count.
    """

    def __init__(self, handler: Handler, group: int, cause: BaseException, in_filter: bool = False):
        self.handler = handler
        self.group = group
        self.unavailable: bool = isinstance(cause, StoreUnavailable)
        self.rate_limited: bool = isinstance(cause, RateLimited)
        self.retry_after: float = cause.retry_after if isinstance(cause, RateLimited) else 0.0
        """Seconds until a packet would be allowed (``ERR_RATE_LIMITED`` only)."""
        if self.rate_limited:
            self.code = ERR_RATE_LIMITED
        else:
            self.code = ERR_UNAVAILABLE if self.unavailable else ERR_INTERNAL
        where = f"a filter of handler {handler.name}" if in_filter else f"handler {handler.name}"
        if self.rate_limited:
            message = f"{where} (group {group}) found the packet {cause}"
        elif self.unavailable:
            message = f"{where} (group {group}) needed a store, which is unavailable: {cause}"
        else:
            message = f"{where} (group {group}) raised"
        super().__init__(message)


    @property
    def payload(self) -> dict[str, Any]:
        """The reply's payload: ``{"status": "failure", "error": code}``, with
        ``"retry_after"`` (rounded up to the millisecond) for ``ERR_RATE_LIMITED``."""
        if self.rate_limited:
            return rate_limited_payload(self.retry_after)
        return {"status": "failure", "error": self.code}


class Dispatcher:
    """The registry of handlers by group, and the dispatch loop over it."""

    __slots__ = ("_groups", "_ordered", "sole")

    def __init__(self) -> None:
        self._groups: dict[int, list[Handler]] = {}
        self._ordered: tuple[tuple[int, tuple[Handler, ...]], ...] = ()
        self.sole: Optional[tuple[int, Handler]] = None
        """``(group, handler)`` when every packet reaches exactly that one handler
        (one group, whose first handler has no filter), else None: then
        :meth:`dispatch` calls it without its group and filter loops."""

    def register(self, handler: Handler, group: int = 0) -> Handler:
        """Add ``handler`` at the end of ``group``."""
        if type(group) is not int:
            raise TypeError(f"group must be an integer, not {group!r}")
        self._groups.setdefault(group, []).append(handler)
        self._ordered = tuple(
            (number, tuple(handlers)) for number, handlers in sorted(self._groups.items())
        )
        only = self._ordered[0] if len(self._ordered) == 1 else None
        self.sole = (only[0], only[1][0]) if only and not only[1][0].filters else None
        return handler

    @property
    def groups(self) -> tuple[tuple[int, tuple[Handler, ...]], ...]:
        """``((group, handlers), ...)`` in dispatch order."""
        return self._ordered

    def __len__(self) -> int:
        return sum(len(handlers) for handlers in self._groups.values())

    async def dispatch(self, client: Any, packet: Any) -> int:
        """Run ``packet`` through the groups; return how many handlers were called.

        ``client.closed`` is read after each handler: a session closed by a handler
        receives nothing more. ``client.handler`` is set to each handler before it is
        called, so that whoever interrupts one (a deadline) can name it. Raises
        :class:`HandlerFailed` if a handler or filter raised anything but
        ``StopPropagation``.
        """
        sole = self.sole
        if sole is not None:  # one group, one unfiltered first handler: the loops, sooner
            client.handler = sole[1]
            try:
                await sole[1].function(client, packet)
            except StopPropagation:
                pass
            except Exception as exc:
                raise HandlerFailed(sole[1], sole[0], exc) from exc
            return 1
        called = 0
        for group, handlers in self._ordered:
            for handler in handlers:
                try:
                    passed = evaluate(handler.filters, client, packet)
                    if passed is not True and passed is not False and isawaitable(passed):
                        passed = await passed
                except StopPropagation:
                    return called
                except Exception as exc:
                    raise HandlerFailed(handler, group, exc, in_filter=True) from exc
                if not passed:
                    continue
                try:
                    called += 1
                    client.handler = handler
                    await handler.function(client, packet)
                except StopPropagation:
                    return called
                except Exception as exc:
                    raise HandlerFailed(handler, group, exc) from exc
                break
            if client.closed:
                break
        return called
