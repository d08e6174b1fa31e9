"""One store call in flight, and how its replies or its failure reach the waiting task.

Both transports of the batching front (the worker thread of
:mod:`asyncapy.adapters.redis_batching`, the trio transport of
:mod:`asyncapy.adapters.redis_trio_link`) answer calls by the same rules, kept here
once: each call gets its own replies or its own error (a script Redis forgot goes to
be loaded again), a failure fails the calls not answered whole, and any error of
redis-py becomes :class:`~asyncapy.domain.errors.StoreUnavailable` for the caller.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import redis
import trio

from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.ports import BLOCKING
from asyncapy.domain.redaction import redact

logger: logging.Logger = logging.getLogger("asyncapy.redis")

# Any error of redis-py means the store did not do what was asked: not only a lost
# connection or a timeout, but a Redis still loading its data, a read-only replica
# after a failover, OOM, a failed AUTH... The callers treat them all alike: refuse
# the session (ERR_UNAVAILABLE), fail the key check closed, retry the renewal later.
_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


def _offload() -> bool:
    """Whether a call should go to a worker thread: inside a trio run, unless a
    synchronous caller drives the coroutine (:data:`asyncapy.domain.ports.BLOCKING`)."""
    if BLOCKING.get():
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class _Call:
    """Commands to send back to back, their replies (or an error), and who waits."""

    __slots__ = ("commands", "key", "replies", "error", "task", "token", "asking", "posted", "retry_until")

    def __init__(self, commands: Sequence[tuple], key: Optional[str] = None) -> None:
        self.commands = commands
        self.key = key
        """A Redis key the commands touch: which Cluster node they go to (all of a
        call's keys share one hash slot)."""
        self.replies: list = []
        self.error: Optional[BaseException] = None
        self.task: Any = None
        self.token: Any = None
        self.retry_until = 0.0
        """With a Cluster: until when a call answered ``TRYAGAIN`` is sent again."""
        self.posted = False
        """Sent without a waiter (a release): its failure is only logged."""
        self.asking: Optional[tuple[str, int]] = None
        """With a Cluster: the node an ``ASK`` reply sent this call to (the slot is
        being migrated there); the call goes there once, after ``ASKING``."""

    def result(self) -> list:
        error = self.error
        if error is None:
            return self.replies
        # redis-py's messages name the host and port, not the password; redact() all
        # the same, since the message goes to logs and the terminal.
        if isinstance(error, redis.ResponseError):
            raise StoreUnavailable(f"Redis refused the command: {redact(str(error))}") from error
        if isinstance(error, _FAILURES):
            raise StoreUnavailable(f"Redis is unreachable: {redact(str(error))}") from error
        raise error


_posted_failing = False


def _report_posted(calls: list[_Call]) -> None:
    """Log the failure of a posted call (nobody waits for it), once per outage: a
    release lost with Redis, whose lease ends the session there anyway."""
    global _posted_failing
    for call in calls:
        if not call.posted:
            continue
        if call.error is None:
            _posted_failing = False
        elif not _posted_failing:
            _posted_failing = True
            logger.warning(
                "Could not release a session in Redis (its lease ends it there): %s", redact(str(call.error))
            )


def _wake(calls: list[_Call]) -> None:
    """In the trio thread: resume the tasks waiting for ``calls`` (a task waiting for
    several calls is named by the first of them only)."""
    for call in calls:
        if call.task is not None:
            trio.lowlevel.reschedule(call.task)


def _answer(call: _Call, reply: Any, reload: list[_Call]) -> None:
    """Give ``call`` the next of its replies: a value, or the :class:`redis.ResponseError`
    Redis answered in its place (a script it no longer knows goes to ``reload``)."""
    if isinstance(reply, redis.ResponseError):
        if isinstance(reply, redis.exceptions.NoScriptError) and len(call.commands) == 1:
            reload.append(call)  # Redis restarted: its script cache is empty
        elif call.error is None:
            call.error = reply
    else:
        call.replies.append(reply)


def _fail(batch: list[_Call], exc: BaseException) -> None:
    """``exc`` for every call of ``batch`` not answered whole."""
    for call in batch:
        if call.error is None and len(call.replies) < len(call.commands):
            call.error = exc


def _lost(call: _Call) -> bool:
    """Whether ``call`` failed to reach Redis (not refused by it)."""
    return isinstance(call.error, _FAILURES) and not isinstance(call.error, redis.ResponseError)
