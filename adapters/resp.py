"""RESP, the Redis protocol, for the trio transport of :mod:`asyncapy.adapters.redis_trio_link`.

redis-py connects and authenticates (its handshake, its URL options); the batches of
store calls are then written and read on that socket by the trio thread itself, with
these two pieces: :func:`pack`, the commands of a batch as one ``bytes``, and
:class:`Replies`, which splits what the socket delivered into replies. Both do what
redis-py's own packer and parsers do, reply for reply (the same Python types, the
same exception classes for error replies), in a fraction of their time: the packer is
one ``join`` over the arguments, the parser slices one buffer. Both RESP2 and RESP3
replies are read (redis-py 8 asks for RESP3 by default); a RESP3 push message is not a
reply and is skipped (the store's connection subscribes to nothing).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import redis
from redis._parsers import BaseParser

__all__ = ["pack", "Replies", "INCOMPLETE"]


def pack(commands: Sequence[Sequence[Any]], encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``commands`` as RESP arrays of bulk strings, back to back: what redis-py's
    ``pack_commands`` writes for them. Strings are encoded with ``encoding``; integers
    and floats written in decimal (``repr``); anything else (``None``, a bool...) is a
    :class:`redis.DataError`, as in redis-py."""
    parts: list[bytes] = []
    append = parts.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is str:
                arg = arg.encode(encoding, errors)
            elif kind is int:
                arg = b"%d" % arg
            elif kind is float:
                arg = repr(arg).encode()
            elif kind is not bytes:
                if isinstance(arg, (bytes, bytearray, memoryview)):
                    arg = bytes(arg)
                else:
                    raise redis.DataError(
                        f"Invalid input of type: {kind.__name__!r}. Convert to a bytes, string, int or float first."
                    )
            append(b"$%d\r\n" % len(arg))
            append(arg)
            append(b"\r\n")
    return b"".join(parts)


INCOMPLETE: Any = object()
"""What :meth:`Replies.next` returns while the buffer holds no whole reply."""


class _Incomplete(Exception):
    pass


class Replies:
    """Replies parsed out of the bytes read from a Redis socket, in order.

    Feed it what ``recv`` returned (:meth:`feed`); :meth:`next` returns the next whole
    reply or :data:`INCOMPLETE`. Replies are as redis-py's parsers return them:
    ``int``, ``bytes`` (simple and bulk strings; ``str`` with ``decode_responses``),
    ``None`` (nil), ``list``; with RESP3 also ``bool``, ``float``, ``dict`` and ``set``;
    an error reply is its :class:`redis.ResponseError`
    instance, returned, not raised (inside an array too); an error reply that redis-py
    counts as a connection error (``LOADING``, an authentication failure) is raised.

    A reply that is not whole yet is parsed again from its start when more bytes come;
    replies of store calls are small, so this costs less than keeping a parser's state.
    """

    __slots__ = ("_buffer", "_position", "_decode")

    def __init__(self, decode: Callable[[bytes], Any] | None = None) -> None:
        self._buffer = b""
        self._position = 0
        self._decode = decode

    def feed(self, data: bytes) -> None:
        """Append bytes read from the socket."""
        if self._position:
            self._buffer = self._buffer[self._position :] + data
            self._position = 0
        else:
            self._buffer += data

    def pending(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._buffer) - self._position

    def next(self) -> Any:
        """The next whole reply, or :data:`INCOMPLETE`."""
        try:
            reply, self._position = self._parse(self._buffer, self._position)
        except _Incomplete:
            return INCOMPLETE
        except ValueError:  # a length or a number that is not one: not Redis speaking
            raise redis.InvalidResponse("Protocol Error: a malformed reply") from None
        return reply

    def _parse(self, buffer: bytes, position: int) -> tuple[Any, int]:
        end = buffer.find(b"\r\n", position)
        if end < 0:
            raise _Incomplete
        kind = buffer[position]
        line = buffer[position + 1 : end]
        position = end + 2
        if kind == 58:  # ':' integer
            return int(line), position
        if kind == 36:  # '$' bulk string
            length = int(line)
            if length < 0:
                return None, position
            stop = position + length
            if len(buffer) < stop + 2:
                raise _Incomplete
            value = buffer[position:stop]
            return (self._decode(value) if self._decode else value), stop + 2
        if kind == 42:  # '*' array
            count = int(line)
            if count < 0:
                return None, position
            items = []
            for _ in range(count):
                item, position = self._parse(buffer, position)
                items.append(item)
            return items, position
        if kind == 43:  # '+' simple string
            return (self._decode(line) if self._decode else line), position
        if kind == 45:  # '-' error
            return self._error(line), position
        # RESP3 (redis-py's default protocol since 8.0, asked for by its HELLO 3)
        if kind == 95:  # '_' null
            return None, position
        if kind == 35:  # '#' boolean
            return line == b"t", position
        if kind == 44:  # ',' double
            return float(line), position
        if kind == 40:  # '(' big number
            return int(line), position
        if kind in (61, 33):  # '=' verbatim string ("txt:" first), '!' blob error
            length = int(line)
            stop = position + length
            if len(buffer) < stop + 2:
                raise _Incomplete
            value = buffer[position:stop]
            if kind == 33:
                return self._error(value), stop + 2
            value = value[4:]
            return (self._decode(value) if self._decode else value), stop + 2
        if kind in (37, 126):  # '%' map, '~' set
            count = int(line)
            items = []
            for _ in range(count * 2 if kind == 37 else count):
                item, position = self._parse(buffer, position)
                items.append(item)
            if kind == 37:
                return dict(zip(items[::2], items[1::2])), position
            try:
                return set(items), position
            except TypeError:  # unhashable members: redis-py gives a list
                return items, position
        if kind in (62, 124):  # '>' push, '|' attributes: not a reply; the reply follows
            count = int(line)
            for _ in range(count * 2 if kind == 124 else count):
                _, position = self._parse(buffer, position)
            return self._parse(buffer, position)
        raise redis.InvalidResponse(f"Protocol Error: {bytes([kind])!r}, {line[:40]!r}")

    @staticmethod
    def _error(text: bytes) -> Exception:
        error = BaseParser.parse_error(text.decode("utf-8", "replace"))
        if isinstance(error, redis.ConnectionError):
            raise error
        return error
