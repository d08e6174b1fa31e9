"""What one packet may cost to decode, and what all packets may hold at once.

A payload's decoded form can be far bigger than its bytes: in ZiProto the byte
``0x90`` is an empty array, which Python holds as a 56-byte list plus the 8-byte
pointer of the array around it, so a 16 MiB packet of them becomes a gigabyte; in
JSON, ``[],`` grows twentyfold. And memory is not all: a payload costs time in
proportion to what it builds. So three limits, all applied by the pure core:

* :data:`MAX_ELEMENTS`: the elements one packet may decode to, whatever its size.
  An *element* is a value of the payload: the map itself, each key, each value,
  each array item, containers and scalars alike. A ZiProto payload is counted
  exactly, as it is decoded; a JSON payload by its structural bytes (``[``, ``{``,
  ``,`` and ``:``, plus one), an upper bound that needs no parsing. Past it, the
  packet is ``ERR_REQUEST_MALFORMED``, as for nesting beyond the depth limit.
* :class:`PacketMemory`: one budget, per server, for the bytes that packets above
  :data:`FREE_PACKET_SIZE` hold at once, from the moment their header is read (the
  buffer) until their handlers are done (the decoded form, estimated from its
  element count with :data:`ELEMENT_COST`, plus :data:`STRING_FACTOR` times the
  payload for strings). A packet the budget cannot hold is refused with
  ``ERR_PACKET_TOO_LARGE`` before it is buffered or decoded, never the process
  killed: the decoder is given only the elements that still fit.
* Map keys are scalars (see ``docs/protocol.md``): a container key would decode to a
  tuple, whose hash can be made to collide, and decoding would turn quadratic.

Packets up to :data:`FREE_PACKET_SIZE` take nothing from the budget, so an API of
small packets pays nothing for it: their decoded form is bounded by their size alone.
"""

from __future__ import annotations

__all__ = [
    "MAX_ELEMENTS",
    "FREE_PACKET_SIZE",
    "ELEMENT_COST",
    "STRING_FACTOR",
    "DEFAULT_PACKET_MEMORY",
    "SERVER_MAX_PACKET_SIZE",
    "PacketMemory",
]

MAX_ELEMENTS = 1 << 18
"""Most elements one packet may decode to (262,144), whatever ``max_packet_size`` is:
for the worst payloads, about 10 ms of decoding, as much again to encode an echo and
free it, and at most about 25 MiB. It bounds how long one packet holds the event loop
(a decoder in C holds the interpreter, so a thread would not help), so that a few
attackers cannot stall every other session for long."""

FREE_PACKET_SIZE = 16 * 1024
"""Packets whose Content-Length is at most this (16 KiB) take nothing from the
:class:`PacketMemory` budget: what they decode to is bounded by their size (at most
16,384 elements, about 1.5 MiB)."""

ELEMENT_COST = 96
"""Bytes charged per decoded element: at least what the worst element costs Python
(an empty dict in an array, 72 bytes; a two-byte string, 82)."""

STRING_FACTOR = 4
"""Bytes charged per payload byte for the strings it holds: a UTF-8 byte can become
up to four bytes of a Python string (ASCII in a string that also holds an emoji)."""

DEFAULT_PACKET_MEMORY = 256 * 1024 * 1024
"""The default budget of :class:`PacketMemory` (256 MiB): the server's
``max_packet_memory``."""

SERVER_MAX_PACKET_SIZE = 1024 * 1024
"""The server's default ``max_packet_size`` (1 MiB), for an API of small packets.
AsyncAPY 0.5 accepted 16 MiB (``DEFAULT_MAX_PACKET_SIZE`` of the framer, which the
bundled clients keep for replies); a server that needs it sets it."""


class PacketMemory:
    """The bytes that large packets may hold at once, across all sessions of a server.

    Pure accounting: :meth:`reserve` takes bytes if they fit, :meth:`release` gives
    them back. :class:`~domain.connection.Connection` reserves for a packet above
    :data:`FREE_PACKET_SIZE` when its header is read and when it is decoded, and
    releases when the server is done with it (or the session ends). Not thread-safe:
    one event loop uses it.
    """

    __slots__ = ("limit", "used", "peak", "refusals")

    def __init__(self, limit: int = DEFAULT_PACKET_MEMORY) -> None:
        if type(limit) is not int or limit < 0:
            raise ValueError(f"the packet memory budget must be an integer of at least 0, not {limit!r}")
        self.limit = limit
        """The budget, in bytes."""
        self.used = 0
        """Bytes reserved now."""
        self.peak = 0
        """The most bytes ever reserved at once."""
        self.refusals = 0
        """How many reservations did not fit."""

    @property
    def free(self) -> int:
        """Bytes that can still be reserved."""
        return self.limit - self.used

    def reserve(self, amount: int) -> bool:
        """Take ``amount`` bytes if they fit (True), else take nothing (False)."""
        used = self.used + amount
        if used > self.limit:
            self.refusals += 1
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def release(self, amount: int) -> None:
        """Give back ``amount`` bytes taken by :meth:`reserve`."""
        self.used -= amount

    def __repr__(self) -> str:
        return f"<PacketMemory {self.used}/{self.limit} bytes, peak {self.peak}>"
