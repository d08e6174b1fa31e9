"""The reactor: one trio wake-up serves every plain-TCP session that has bytes ready.

With a task per session, every request costs at least one trio task switch: the
session's task is woken for its read, runs, and parks again. Here one task (the
reactor) waits on a private ``epoll`` set holding every idle plain-TCP session's
socket (with :func:`trio.lowlevel.wait_readable` on the set's own descriptor, so trio
keeps scheduling everything else), and when it wakes, reads, decodes, dispatches and
replies for every connection that is ready, in one pass. The sessions' own tasks stay
parked meanwhile (:meth:`Reactor.serve`), each until its session ends; what decides
each step is the unchanged :class:`~asyncapy.session_protocol.SessionProtocol`. A
session's own task answers its first requests itself (:data:`JOIN_AFTER`), as on the
other path, and only then joins the set: a connection that makes one request and
closes costs the reactor nothing.

**A pass.** The sockets are in the set edge-triggered (see :meth:`Reactor._register`),
so a turn reads a session until its socket is empty. During a pass of several
sessions their replies are deferred and written together at its end (the reactor's
own :class:`~asyncapy.transport.Pacer`), so a client waiting on many connections is
woken once per pass. Between passes, while sessions keep being ready, the reactor
only looks at its set again (trio's scheduler gets a round every
:data:`SESSIONS_PER_YIELD` sessions); before it waits on trio's side, it looks, gives
the other tasks one round, and looks again, which under a light load often finds the
next request and spares a sleep and a wake-up.

**Handlers that wait.** A handler runs inline, in the reactor's task, and most
complete without ever suspending (an echo, a computation, a reply the kernel takes at
once): they cost no task at all. One that does suspend (it awaits I/O, sleeps, takes
a lock, or a reply fills the socket's send buffer) cannot be moved to another task (its
cancel scopes belong to the task it started in), so the *reactor's role* moves
instead: before the suspension reaches trio, a new reactor task is started, which goes
on with the pass where it stood, and the old task stays with the handler as that
session's worker until the session's buffered packets are handled, then ends. While
it does, no pass serves the session: its later packets wait, so replies stay in
order, and a session whose replies the kernel cannot take reads nothing more until
they are written (the backpressure of the other path).

A session whose handlers suspend in :data:`LEAVE_AFTER` turns in a row (one that
awaits a database on every request, say) leaves the reactor for good, and its own
task serves it as on the other path: for it, a hand-off per request would cost more
than the reactor saves.

**Fairness.** One pass reads each ready connection until a packet is complete or its
socket is empty (at most :data:`READ_PER_PASS`), handles at most
:data:`PACKETS_PER_PASS` of its pipelined packets, and leaves the rest for the next
pass; after every :data:`SESSIONS_PER_YIELD`
sessions served, the reactor lets trio run its other tasks (accepting, admissions,
the reaper). A handler that blocks without awaiting blocks the reactor as it blocked
the process before: ``handler_timeout`` and its log line see it the same way.

**Ends.** The session's end is decided here (the client closed, a handler closed it,
an error, the server stopping) and handed to the session's task, which closes and
releases the session as on the other path (:meth:`Sessions.serve
<asyncapy.sessions.Sessions.serve>`). A cancellation of that task (the idle reaper,
the shutdown's drain) takes the session out of the reactor's view at once; its socket
leaves the set as it is closed.

**Which sessions.** Plain TCP on Linux (``select.epoll``), PROXY-protocol ones
included (their header is read before the session starts), while the ``reactor``
setting is on (the default). TLS sessions keep a task each: their bytes must pass
through the ``ssl`` object of a ``trio.SSLStream``, whose reads and writes are
coroutines that can suspend mid-record, so a TLS session has no cheap "read what is
there" step to run inline. The test client's in-memory streams have no socket, and
keep a task too.
"""

from __future__ import annotations

import contextvars
import functools
import os
import select
import time
import types
from typing import TYPE_CHECKING, Any, Coroutine, Generator, Optional

import outcome
import trio
from trio.lowlevel import current_task, reschedule, wait_readable, wait_task_rescheduled

from asyncapy.domain.connection import NEED_DATA, Request

from .transport import Pacer, read_now

if TYPE_CHECKING:  # pragma: no cover
    from .session_protocol import SessionProtocol

__all__ = [
    "Reactor", "available", "PACKETS_PER_PASS", "SESSIONS_PER_YIELD", "READ_PER_PASS", "JOIN_AFTER", "LEAVE_AFTER",
]


PACKETS_PER_PASS = 32
"""Pipelined packets of one connection handled in one pass, at most; the rest wait for
the next pass, after every other ready connection has had its turn."""

SESSIONS_PER_YIELD = 64
"""Sessions served in a row before the reactor lets trio run its other tasks once."""

JOIN_AFTER = 2
"""Turns in which a session's own task answers packets before the session joins the
reactor's set (see :meth:`Reactor.serve`)."""

LEAVE_AFTER = 2
"""Turns in a row whose handler suspended (and so cost a hand-off) after which a
session leaves the reactor for good, served by its own task from then on (see
:meth:`Reactor.serve`): a handler that awaits I/O on every request gains nothing from
the reactor, and a hand-off per request costs more than a task's own wake-up."""

_LEAVE = object()

_EOF = object()
"""What :meth:`Reactor._read` gives for the end of the stream."""
"""What a session's task is woken with when its session leaves the reactor."""

READ_PER_PASS = 64 * 1024
"""Bytes read from one connection in one pass, at most, while its packet is
incomplete (a read that fills ``buf`` is followed by another at once, up to this)."""

_EPOLLIN = getattr(select, "EPOLLIN", 1)
_EPOLLET = getattr(select, "EPOLLET", 1 << 31)
_EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_HANGUP = _EPOLLRDHUP | getattr(select, "EPOLLHUP", 0x10) | getattr(select, "EPOLLERR", 0x8)
_EVENTS = _EPOLLIN | _EPOLLRDHUP | _EPOLLET


def available() -> bool:
    """True where the reactor can run: ``select.epoll`` and ``os.eventfd`` exist (Linux)."""
    return hasattr(select, "epoll") and hasattr(os, "eventfd")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], trap: Any, context: contextvars.Context) -> Generator[Any, Any, Any]:
    """Go on with ``coro``, stepped by hand until it yielded ``trap``, in the calling
    task: each trap goes to trio as if ``coro`` had been awaited from the start, and
    what trio sends back (or throws in) goes to ``coro``, run in ``context``."""
    while True:
        try:
            value = yield trap
        except BaseException as exc:
            try:
                trap = context.run(coro.throw, exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                trap = context.run(coro.send, value)
            except StopIteration as done:
                return done.value


class _PassPacer(Pacer):
    """The reactor's pacer: replies deferred during a pass wait for its end, when the
    reactor writes them all (``flush()``); one deferred while the reactor waits for
    its set (a task other than the reactor replied on a session whose channel still
    defers) wakes it, and is written by its next pass."""

    __slots__ = ("reactor",)

    def __init__(self, reactor: "Reactor") -> None:
        super().__init__()
        self.reactor = reactor

    def defer(self, channel: Any) -> None:
        self.deferred.append(channel)
        reactor = self.reactor
        if reactor._sleeping:
            reactor._wake()


class Reactor:
    """One server's reactor: the epoll set of its idle plain-TCP sessions and the task
    that serves them (see the module's docstring).

    :meth:`run` is started beside the sessions (:meth:`Sessions.run_services
    <asyncapy.sessions.Sessions.run_services>`); a session joins with :meth:`serve`
    from its own task, which returns why the session ended.
    """

    def __init__(self) -> None:
        self.running = False
        """True while :meth:`run` runs: only then may a session join."""
        self._epoll: Optional[Any] = None
        self._sessions: dict[int, "SessionProtocol"] = {}
        """Sessions in the epoll set, by descriptor."""
        self._task: Optional[trio.lowlevel.Task] = None
        """The task that is the reactor now (None while the role passes to a new one)."""
        self._nursery: Optional[trio.Nursery] = None
        self._todo: list["SessionProtocol"] = []
        """This pass's ready sessions; :attr:`_at` is the next one to serve."""
        self._at = 0
        self._backlog: list["SessionProtocol"] = []
        """Sessions with packets left over for the next pass (:data:`PACKETS_PER_PASS`)."""
        self._wakeup = -1
        """An eventfd in the epoll set: a worker that leaves packets for the next pass
        while the reactor waits for the set writes to it, or the reactor would wait
        for bytes that are already read."""
        self._sleeping = False
        """True while the reactor waits for the epoll set."""
        self._now: Any = None
        """The run's clock's ``current_time`` (trio's clock, as ``trio.current_time``)."""
        self._clock: Any = None
        self._offset = 0.0
        self.pacer: Pacer = _PassPacer(self)
        """The reactor's sessions' replies during a pass of several sessions: deferred,
        and written together (``pacer.flush()``) when the pass ends, or before the
        reactor lets other tasks run. A client waiting on many connections is then
        woken once per pass rather than once per reply, which costs the server less
        system time too (see :class:`~asyncapy.transport.Pacer`)."""
        self._batch = False
        """True during a pass of more than one session (its replies are deferred)."""
        self._answered = False
        """True once the current pass has handled a packet."""
        self.passes = 0
        """Passes made (for tests and curiosity)."""
        self.handoffs = 0
        """Times a handler suspended in the reactor's task and the role moved on."""
        self.left = 0
        """Sessions that left the reactor for their own task (see :data:`LEAVE_AFTER`)."""

    # -- the reactor's life -------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the sessions that join, until cancelled (a server that serves again
        runs it again: nothing of the run before is kept). A second call while one
        runs (two test clients of one server) has nothing to do: it waits to be
        cancelled."""
        if self.running:
            task_status.started()
            await trio.sleep_forever()
        self.running = True  # at once: a second call in the same round sees it
        self._todo, self._at, self._backlog, self._sessions = [], 0, [], {}
        epoll = self._epoll = select.epoll()
        clock = trio.lowlevel.current_clock()
        self._now = clock.current_time
        # trio's own clock is ``offset + perf_counter()``: read it so, a method call
        # less per request; any other clock (a test's MockClock) through its method.
        if type(clock).__name__ == "SystemClock" and type(clock).__module__.startswith("trio."):
            self._clock, self._offset = time.perf_counter, float(clock.offset)  # type: ignore[attr-defined]
        else:
            self._clock, self._offset = clock.current_time, 0.0
        wakeup = self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        epoll.register(wakeup, _EPOLLIN)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.pacer.lend(nursery)
                task_status.started()
                await self._loop()
        finally:
            self.running = False
            self._nursery = None
            self.pacer.lend(None)
            self.pacer.flush()
            for protocol in list(self._sessions.values()):  # a failure, not a cancellation
                self._end(protocol, outcome.Value("internal error"))
            epoll.close()
            os.close(wakeup)

    async def _loop(self) -> None:
        """Make passes until the role moves to another task (a handler suspended in
        this one), then return."""
        me = current_task()
        self._task = me
        served = 0
        while True:
            todo = self._todo
            while self._at < len(todo):
                protocol = todo[self._at]
                self._at += 1
                if protocol.reactor_ended:
                    continue
                protocol.reactor_active = True
                answered_before = protocol.state.last_active
                channel = protocol.channel
                if channel.deferring is not self._batch:  # the call only on a change
                    channel.defer(self._batch)  # written with the pass's other replies, when it ends
                try:
                    reason = await self._turn(protocol)
                except Exception as exc:  # what the other path's task would raise: same handling
                    protocol.reactor_active = False
                    self._end(protocol, outcome.Error(exc))
                    reason = None
                except BaseException:
                    protocol.reactor_active = False
                    self._end(protocol, outcome.Value("cancelled"))
                    raise
                protocol.reactor_active = False
                worker = self._task is not me
                self._after_turn(protocol, reason, worker, answered_before)
                if worker:
                    return  # this task stayed with a handler; another is the reactor now
                served += 1
                if served >= SESSIONS_PER_YIELD:
                    served = 0
                    self.pacer.flush()
                    await trio.lowlevel.checkpoint()
            self.pacer.flush()  # the pass's replies
            if await self._next_pass():
                served = 0

    def _after_turn(self, protocol: "SessionProtocol", reason: Optional[str], worker: bool, before: float) -> None:
        """What follows a session's turn: its end (``reason``), or its place for the next
        one. A turn that suspended (``worker``: this task stayed with its handler) counts
        towards :data:`LEAVE_AFTER`; one that answered packets (``state.last_active``
        moved from ``before``) without suspending starts that count again."""
        if reason is not None:
            self._end(protocol, outcome.Value(reason))
            return
        if protocol.reactor_ended:
            return
        if worker:
            protocol.reactor_suspended += 1
            if protocol.reactor_suspended >= LEAVE_AFTER:
                self._let_go(protocol)
                return
            if not protocol.reactor_queued:
                # Bytes that arrived meanwhile were reported to passes that left the
                # session alone; the next one reads.
                self._leave(protocol)
        elif protocol.reactor_suspended and protocol.state.last_active != before:
            protocol.reactor_suspended = 0
        protocol.state.waiting = not protocol.reactor_queued

    async def _next_pass(self) -> bool:
        """Make the next pass's list of sessions: those left over from the last one, and
        those the set reports ready. True if the reactor waited on trio's side (a round
        or a sleep) to find them.

        While something is ready, the reactor does not wait on trio's side at all (a
        checkpoint every :data:`SESSIONS_PER_YIELD` sessions lets the other tasks run).
        Before it waits: a look (under load, the next requests are there by now), then,
        if none is, one scheduling round for the other tasks and a second look. A client
        that waits for each reply has often sent the next request by then, and a
        reactor that finds it spares a sleep and a wake-up, which cost more than the
        round. (Only after a pass that answered something: one that only saw clients
        leave has nobody to wait for.)"""
        epoll = self._epoll
        assert epoll is not None
        backlog, self._backlog = self._backlog, []
        waited = False
        events = epoll.poll(0)
        if not events and not backlog and self._answered:
            waited = True
            await trio.lowlevel.checkpoint()
            backlog, self._backlog = self._backlog, []
            events = epoll.poll(0)
        if not events and not backlog:
            waited = True
            self.pacer.flush()  # deferred by other tasks during the round
            self._sleeping = True
            try:
                await wait_readable(epoll.fileno())
            finally:
                self._sleeping = False
            backlog, self._backlog = self._backlog, []  # left by a worker meanwhile (see _leave)
            self.pacer.flush()  # replies deferred meanwhile (see _PassPacer)
            events = epoll.poll(0)
        self.passes += 1
        sessions = self._sessions
        todo = [protocol for protocol in backlog if not protocol.reactor_ended]
        for fd, mask in events:
            ready = sessions.get(fd)
            if ready is not None:
                if mask & _HANGUP:
                    ready.reactor_hangup = True  # the end of stream waits behind the bytes
                if not (ready.reactor_queued or ready.reactor_active):
                    todo.append(ready)
            elif fd == self._wakeup:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        self._todo = todo
        self._at = 0
        self._batch = len(todo) > 1
        self._answered = False
        return waited

    # -- one session: joining, serving, ending ---------------------------------------------
    async def serve(self, protocol: "SessionProtocol") -> Optional[str]:
        """Serve ``protocol``'s session from the reactor; return why it ended (or raise
        what ended it), or None if its task was cancelled. Called by the session's own
        task, which serves its first turns itself (:data:`JOIN_AFTER`), then waits here
        (or, if the session leaves the reactor, serves it to its end: :meth:`_let_go`);
        its cancellation (the reaper's, the shutdown's) takes the session out at once."""
        channel = protocol.channel
        assert channel.socket is not None and self._epoll is not None
        protocol.reactor_fd = channel.socket.fileno()
        protocol.reactor_context = contextvars.copy_context()
        protocol.reactor_task = None  # set only while it waits for the end, below
        protocol.reactor_ended = False
        channel.on_close = functools.partial(self._closing, protocol)
        protocol.reactor_pacer = channel.pacer
        protocol.reactor_suspended = 0
        channel.pacer = self.pacer
        # The first turns in this task, as on the other path, until two of them have
        # answered packets: a connection that makes one request and closes (as every
        # AsyncAPY 0.5 client does) never wakes the reactor's task; one that goes on
        # joins the set then (the set reports at once what has arrived since). A
        # handler that suspends in these turns simply suspends this task.
        state = protocol.state
        answered = 0
        while answered < JOIN_AFTER:
            # One round before each of these reads, as the other path's reads take:
            # the client's next bytes (its request after the connect, its close after
            # the reply) are there by then more often than not, and a wait for them
            # (a registration, a wake-up) is spared.
            await trio.lowlevel.checkpoint()
            before = state.last_active  # moves when a turn handles a packet
            protocol.reactor_active = True
            try:
                reason = await self._turn(protocol)
            finally:
                protocol.reactor_active = False
            if reason is not None:
                protocol.reactor_ended = True
                return reason
            handled = state.last_active != before
            answered += handled
            if protocol.reactor_queued:
                break  # packets left for the reactor's next pass
            if not handled and answered < JOIN_AFTER:  # nothing there, or part of a packet
                state.waiting = True
                await wait_readable(channel.socket)  # the reaper and the shutdown cancel it
                state.waiting = False
        self._register(protocol)
        protocol.state.waiting = not protocol.reactor_queued
        protocol.reactor_task = current_task()
        result = await wait_task_rescheduled(functools.partial(self._abort, protocol))
        if result is _LEAVE:
            return await protocol.serve_in_task()  # see _let_go
        return str(result)

    def _abort(self, protocol: "SessionProtocol", raise_cancel: Any) -> trio.lowlevel.Abort:
        """The session's task is cancelled: the session leaves the set (a handler of it
        running in a worker goes on; the task closes the session, which stops it)."""
        protocol.reactor_ended = True
        protocol.reactor_task = None
        self._forget(protocol)
        return trio.lowlevel.Abort.SUCCEEDED

    def _closing(self, protocol: "SessionProtocol") -> None:
        """The session's channel is being closed: by a handler of another session, while
        this one waits for its end (then ended now), or by its own task or a turn
        serving it (which see the channel closed themselves)."""
        self._forget(protocol)
        if protocol.reactor_task is not None and not protocol.reactor_active:
            self._end(protocol, outcome.Value("closed by a handler"))

    def _end(self, protocol: "SessionProtocol", result: Any) -> None:
        """End the session with ``result`` (an ``outcome``: the reason, or the error)
        and wake its task if it waits for the end (:meth:`serve`), once."""
        if protocol.reactor_ended:
            return
        protocol.reactor_ended = True
        self._forget(protocol)
        task = protocol.reactor_task
        protocol.reactor_task = None
        if task is not None:
            reschedule(task, result)

    def _register(self, protocol: "SessionProtocol") -> None:
        """Put the session's socket in the set, edge-triggered: the set reports a
        socket when bytes arrive, not for as long as some are unread. Level-triggered,
        a socket just read stays on the set's ready list until the next look, and
        the set's own descriptor, which trio watches, wakes the reactor once more
        for nothing after nearly every request. So a turn reads until the socket is
        empty (a short read, or once the client has closed its side, the end of
        stream) or leaves the session for the next pass (:meth:`_leave`); a socket
        added with bytes waiting is reported at once."""
        fd = protocol.reactor_fd
        if self._epoll is None or protocol.reactor_registered:
            return
        try:
            if fd < 0:
                raise OSError("closed")
            self._epoll.register(fd, _EVENTS)
        except OSError as exc:  # closed under it: the session ends as "connection lost"
            raise trio.ClosedResourceError(f"the connection is gone: {exc}") from exc
        self._sessions[fd] = protocol
        protocol.reactor_registered = True

    def _forget(self, protocol: "SessionProtocol") -> None:
        """Take the session out of the reactor's view for good: it is ending, and its
        socket is about to be closed, which takes it out of the epoll set by itself (a
        system call per session spared). Until then, what the set reports for it is
        not looked at."""
        if not protocol.reactor_registered:
            return
        protocol.reactor_registered = False
        fd = protocol.reactor_fd
        if self._sessions.get(fd) is protocol:
            del self._sessions[fd]

    def _let_go(self, protocol: "SessionProtocol") -> None:
        """The session leaves the reactor (its handlers keep suspending: see
        :data:`LEAVE_AFTER`): out of the set now (its socket stays open), its channel
        as the other path has it, and its task woken to serve it from here on."""
        self._forget(protocol)
        if self._epoll is not None and protocol.reactor_fd >= 0:
            try:
                self._epoll.unregister(protocol.reactor_fd)
            except OSError:  # closed meanwhile: its own task finds out
                pass
        channel = protocol.channel
        channel.on_close = None
        channel.pacer = protocol.reactor_pacer
        if channel.deferring:
            channel.defer(False)
        self.left += 1
        self._end(protocol, outcome.Value(_LEAVE))

    def _leave(self, protocol: "SessionProtocol") -> None:
        """Serve ``protocol`` again in the next pass, reading or not: packets are left
        in its buffer past :data:`PACKETS_PER_PASS`, or bytes perhaps in its socket
        (waking the reactor if a worker does this while it waits for the epoll set)."""
        protocol.reactor_queued = True
        self._backlog.append(protocol)
        if self._sleeping:
            self._wake()

    def _wake(self) -> None:
        """Wake the reactor from its wait for the set (once: it is awake until it waits
        again)."""
        self._sleeping = False
        os.eventfd_write(self._wakeup, 1)

    def _hand_off(self, protocol: "SessionProtocol") -> None:
        """A handler of ``protocol`` is about to suspend. In the reactor's own task, the
        role moves to a new task (which goes on with this pass). The session stays in
        the set, but no pass serves it while this task does (``reactor_active``): what
        arrives meanwhile is read by the pass after this task is done with it."""
        if self._task is not current_task() or self._nursery is None:
            return  # a worker already
        self.handoffs += 1
        self._task = None
        if protocol.channel.deferring:
            protocol.channel.defer(False)  # a worker writes at once: no pass to wait for
        self._nursery.start_soon(self._loop)

    def _read(self, protocol: "SessionProtocol") -> tuple[Any, bool]:
        """Read what the session's socket holds, feeding its framer, until a packet is
        complete, the socket is empty, or :data:`READ_PER_PASS` is read: ``(event,
        drained)``, the first event (a ``Request``, a ``ProtocolError``, ``NEED_DATA``,
        or :data:`_EOF` at the end of stream) and whether the last read found the
        socket empty (then a new edge will say when more arrives: see
        :meth:`_register`). Never suspends."""
        connection = protocol.connection
        framer = connection.framer
        fd: Any = protocol.channel.fd
        buf, meter = protocol.buf, protocol.meter
        taken = 0
        while True:
            number = fd.fileno()  # -1 once closed: see asyncapy.transport
            try:
                data: Optional[bytes] = os.read(number, buf) if number >= 0 else read_now(fd, buf)
            except BlockingIOError:
                data = None
            except OSError:
                data = read_now(fd, buf)  # the same error, as a stream error
            if data is None:
                return NEED_DATA, True
            if not data:
                return _EOF, False
            size = len(data)
            meter.received += size
            framer.receive_data(data)
            event = connection.next_event()
            # A short read took all there was, unless the client has closed its side:
            # then the end of stream is still to be read, with no edge to come.
            drained = size < buf and not protocol.reactor_hangup
            taken += size
            if event is not NEED_DATA or drained or taken >= READ_PER_PASS:
                return event, drained

    async def _drive(self, protocol: "SessionProtocol", coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` (a step of ``protocol``'s session) inline, in its context: stepped
        by hand, so that if it suspends, the reactor's role moves on first
        (:meth:`_hand_off`) and this task goes on with it (:func:`_resume`)."""
        context = protocol.reactor_context
        try:
            trap = context.run(coro.send, None)
        except StopIteration as done:
            return done.value
        self._hand_off(protocol)
        return await _resume(coro, trap, context)

    async def _turn(self, protocol: "SessionProtocol") -> Optional[str]:
        """One session's turn in a pass: read what is there (unless packets are left from
        the last pass), handle the complete packets (at most :data:`PACKETS_PER_PASS`),
        write what was held; None, or why the session ends. The reactor's hot path:
        what :meth:`SessionProtocol.receive_data` and :meth:`~SessionProtocol.handled`
        do is done here on locals, as in the other path's loop."""
        connection = protocol.connection
        framer = connection.framer
        state = protocol.state
        channel = protocol.channel
        clock, now = self._clock, self._now
        # ``drained``: the last read found the socket empty, so a new edge will say when
        # more arrives (see _register). Else, the session is left for the next pass.
        drained = False
        event: Any = NEED_DATA  # a Request, a ProtocolError, or NEED_DATA
        if protocol.reactor_queued:
            protocol.reactor_queued = False
            event = connection.next_event()
        if event is NEED_DATA:
            event, drained = self._read(protocol)
            if event is _EOF:
                return "client closed the connection"
            if event is NEED_DATA:
                if not state.large_since and connection.receiving_large:
                    state.large_since = now()  # its body has large_packet_timeout
                if not drained:
                    self._leave(protocol)
                return None
        state.waiting = False
        self._answered = True
        context = protocol.reactor_context
        pacer = channel.pacer
        left = PACKETS_PER_PASS
        leave = False
        while True:
            more = framer.complete_buffered()
            if more or channel.holding:  # the call only on a change
                channel.hold(more)
            pacer.unyielded = 0  # this request's read counts as one
            if type(event) is Request:
                coro = protocol.handle_request(event)
            else:
                coro = protocol.handle_protocol_error(event)
            # _drive(), inline: a coroutine call less per request.
            try:
                trap = context.run(coro.send, None)
            except StopIteration as done:
                reason = done.value
            else:
                self._hand_off(protocol)
                reason = await _resume(coro, trap, context)
            if reason is not None:
                return str(reason)
            state.last_active = clock() + self._offset  # trio's clock, one call less
            if state.large_since:
                state.large_since = 0.0
            if connection.held:
                connection.release()
            if protocol.reactor_ended:
                return None
            if not more:
                leave = not drained  # to read what may be left in the socket
                break
            left -= 1
            if not left:
                leave = True  # the rest of its packets, after the others' turn
                break
            event = connection.next_event()
        if channel.holding:
            await self._drive(protocol, channel.flush())
        if channel.closed:
            return "closed by a handler"
        if protocol.stopping.is_set():
            return "server shutting down"
        if leave:  # only now: the flush above may have suspended, and the turn is not over until here
            self._leave(protocol)
        return None
