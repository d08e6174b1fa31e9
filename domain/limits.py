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

Fair shares of the budget
-------------------------
Reserving a packet's bytes from its header alone lets a header drain the budget: 53
connections each declaring a 1 MiB packet and sending nothing else held 256 MiB. So
the budget also knows *owners* (a client's address group, as ``session_limit`` counts
them) and a :attr:`PacketMemory.share`: no owner may hold more than that fraction of
the budget, whatever is free. And a :class:`~domain.connection.Connection` made with
``charge_on_arrival=True`` charges a packet's bytes as they arrive (five times each
byte received, as above), never its declared length alone: a header costs nothing
until its body comes, and a body that stalls holds only what it sent. An owner over
its share gets ``ERR_PACKET_TOO_LARGE`` for its own packet; other owners keep the
rest of the budget.
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
    "DEFAULT_OWNER_SHARE",
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


DEFAULT_OWNER_SHARE = 0.25
"""The fraction of the budget one owner may hold, suggested for servers that name
owners: a quarter of 256 MiB is 64 MiB, room for a dozen 1 MiB packets of one client at
once, and four greedy clients still leave other clients served. (:class:`PacketMemory`
itself defaults to 1.0, no share, for the callers that name no owner.)"""


class PacketMemory:
    """The bytes that large packets may hold at once, across all sessions of a server.

    Pure accounting: :meth:`reserve` takes bytes if they fit, :meth:`release` gives
    them back. :class:`~domain.connection.Connection` reserves for a packet above
    :data:`FREE_PACKET_SIZE` while it is received and when it is decoded, and
    releases when the server is done with it (or the session ends). Not thread-safe:
    one event loop uses it.

    :param limit: the budget, in bytes.
    :param share: the fraction of the budget (above 0, at most 1) one owner may hold
        (see :meth:`reserve`); 1.0, the default, caps no owner below the budget.
    """

    __slots__ = ("limit", "share", "used", "peak", "refusals", "owner_refusals", "_by_owner")

    def __init__(self, limit: int = DEFAULT_PACKET_MEMORY, *, share: float = 1.0) -> None:
        if type(limit) is not int or limit < 0:
            raise ValueError(f"the packet memory budget must be an integer of at least 0, not {limit!r}")
        if type(share) not in (int, float) or not 0 < share <= 1:
            raise ValueError(f"the packet memory share must be a number above 0 and at most 1, not {share!r}")
        self.limit: int = limit
        """The budget, in bytes."""
        self.share: float = float(share)
        """The fraction of :attr:`limit` one owner may hold."""
        self.used = 0
        """Bytes reserved now."""
        self.peak = 0
        """The most bytes ever reserved at once."""
        self.refusals = 0
        """How many reservations did not fit (an owner's share or the whole budget)."""
        self.owner_refusals = 0
        """Of those, how many did not fit their owner's share while the budget had room."""
        self._by_owner: dict[object, int] = {}

    @property
    def free(self) -> int:
        """Bytes that can still be reserved."""
        return self.limit - self.used

    @property
    def owner_limit(self) -> int:
        """The most bytes one owner may hold: ``share`` of the budget, rounded down."""
        return int(self.limit * self.share)

    def held_by(self, owner: object) -> int:
        """Bytes ``owner`` holds now."""
        return self._by_owner.get(owner, 0)

    def free_for(self, owner: object = None) -> int:
        """Bytes ``owner`` could still reserve (the whole budget's free bytes for None)."""
        free = self.limit - self.used
        if owner is None:
            return free
        return min(free, self.owner_limit - self._by_owner.get(owner, 0))

    def reserve(self, amount: int, owner: object = None) -> bool:
        """Take ``amount`` bytes if they fit (True), else take nothing (False).

        With an ``owner`` (any hashable: an address group), they must also fit that
        owner's share: what it holds plus ``amount`` at most :attr:`owner_limit`."""
        used = self.used + amount
        if used > self.limit:
            self.refusals += 1
            return False
        if owner is not None:
            held = self._by_owner.get(owner, 0) + amount
            if held > self.owner_limit:
                self.refusals += 1
                self.owner_refusals += 1
                return False
            self._by_owner[owner] = held
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def release(self, amount: int, owner: object = None) -> None:
        """Give back ``amount`` bytes taken by :meth:`reserve` (for the same ``owner``)."""
        self.used -= amount
        if owner is not None:
            held = self._by_owner.get(owner, 0) - amount
            if held > 0:
                self._by_owner[owner] = held
            else:
                self._by_owner.pop(owner, None)

    @property
    def owners(self) -> int:
        """How many owners hold bytes now."""
        return len(self._by_owner)

    def __repr__(self) -> str:
        return f"<PacketMemory {self.used}/{self.limit} bytes, peak {self.peak}, {len(self._by_owner)} owners>"
