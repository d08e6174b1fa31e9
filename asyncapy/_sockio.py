"""Plain-TCP reads and writes with as few system calls and scheduling rounds as they need.

``trio.SocketStream`` is correct and general, and on a small-packet server its cost
per call shows: ``receive_some`` first tries ``recv`` (which, on a connection whose
client waits for each reply, fails with ``EAGAIN`` and raises), then waits for
readability, then calls ``recv`` again; ``send_all`` writes and then always yields to
the scheduler, even when the kernel took every byte at once. Per request that is two
scheduling rounds, one failed system call and one exception, which for a 50-byte
request cost more than decoding and dispatching it.

Here, for a plain ``trio.SocketStream`` on a POSIX system (TLS streams and in-memory
test streams keep the stream methods):

* :func:`receive` yields first (one scheduling round per read, as trio's own), then
  reads; only if nothing has arrived does it wait for readability. Under load the next
  request is usually there by then, and the wait (an epoll registration, a wake-up)
  is skipped. Every read is a checkpoint.
* :func:`send` writes at once; only when the kernel cannot take everything does it wait
  for writability and go on. A write that completes does not yield: fairness is the
  caller's rule (:class:`asyncapy.core.Channel` yields before every
  :data:`~asyncapy.core.WRITES_PER_YIELD`-th such write in a row with no read between,
  counted across a server's sessions by :class:`asyncapy.core.Pacer`).

Both look the descriptor up on the socket right before each system call, with no
``await`` in between: once trio closes the socket, ``fileno()`` is -1, so a descriptor
number the kernel has since given to another connection is never touched. A socket
closed while a task waits on it wakes that task (trio's ``notify_closing``) with
``ClosedResourceError``. ``OSError`` becomes what ``SocketStream`` raises:
``ClosedResourceError`` for a closed socket, ``BrokenResourceError`` for the rest.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, Optional

import trio
from trio.lowlevel import wait_readable, wait_writable

__all__ = ["raw_socket_of", "fileno_source", "receive", "read_now", "receive_waiting", "send", "write_now", "write_rest"]

_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def raw_socket_of(stream: trio.abc.Stream) -> Optional[trio.socket.SocketType]:
    """The trio socket of ``stream`` if it is a plain ``trio.SocketStream`` on POSIX
    (where ``os.read``/``os.write`` work on sockets), else None: use the stream."""
    if os.name != "posix" or type(stream) is not trio.SocketStream:
        return None
    return stream.socket


def fileno_source(sock: trio.socket.SocketType) -> Any:
    """What to ask for ``sock``'s descriptor before each system call: the standard
    library socket inside trio's (its ``fileno()`` is what trio's forwards to, one
    Python-level call less per system call, and it reads -1 just the same once trio
    has closed the socket), or ``sock`` itself if it has none. Every function here
    takes either."""
    inner = getattr(sock, "_sock", None)
    return inner if isinstance(inner, socket.socket) else sock


def _stream_error(exc: OSError) -> Exception:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def receive(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` (``b""`` at end of stream): yield to the scheduler
    first, then read if bytes are there, and wait for readability only if not. A
    checkpoint, always.

    Yielding first is what makes a read cheap under load: while the other ready
    sessions run, this connection's next request usually arrives, and the read then
    takes it without the epoll registration and wake-up a wait costs. On an idle
    server the read finds nothing, and the wait follows. (The server's session loop
    makes the same three steps itself, :func:`read_now` and :func:`receive_waiting`
    after its own checkpoint, to act on what the first read found.)
    """
    await trio.lowlevel.checkpoint()
    data = read_now(sock, max_bytes)
    if data is None:
        data = await receive_waiting(sock, max_bytes)
    return data


def read_now(sock: trio.socket.SocketType, max_bytes: int) -> Optional[bytes]:
    """Read at most ``max_bytes`` if any have arrived (``b""`` at end of stream), or
    return None at once if none have. Never yields."""
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc


async def receive_waiting(sock: trio.socket.SocketType, max_bytes: int) -> bytes:
    """Wait until ``sock`` is readable, then read at most ``max_bytes`` (``b""`` at
    end of stream); for after :func:`read_now` found nothing."""
    while True:
        await wait_readable(sock)
        data = read_now(sock, max_bytes)
        if data is not None:
            return data


def write_now(sock: trio.socket.SocketType, data: bytes) -> int:
    """Write what the kernel takes of ``data`` without waiting; return how many bytes
    that was (0 when it has no room). Never yields."""
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("this socket was already closed")
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _stream_error(exc) from exc


async def write_rest(
    sock: trio.socket.SocketType,
    data: bytes,
    sent: int,
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Write ``data[sent:]``, waiting for room as often as needed; ``progress(n)`` is
    called after each write the kernel took ``n`` bytes of."""
    remaining = memoryview(data)[sent:]
    while remaining:
        await wait_writable(sock)
        written = write_now(sock, remaining)
        remaining = remaining[written:]
        if progress is not None and written:
            progress(written)


async def send(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data``. Not a checkpoint when the kernel takes it at once.

    If cancelled (or failing) while waiting for room, part of ``data`` may be on the
    wire already; the caller must then write nothing more on this connection.
    (:class:`asyncapy.core.Channel` calls :func:`write_now` and :func:`write_rest`
    itself, which keeps this coroutine layer off a reply's path.)
    """
    sent = write_now(sock, data)
    if sent < len(data):
        await write_rest(sock, data, sent)
