"""A chat room: groups, propagation, and sending to *other* sessions.

What it shows:

- **group -1** sees every packet first: it logs it (the field names, never the text)
  and rejects a message longer than :data:`MAX_MESSAGE` characters with an error reply
  and ``packet.stop_propagation()``, so groups 0 and 1 never see it;
- **group 0** does the work: ``{"join": NAME}``, ``{"say": TEXT}``, ``{"leave": true}``
  and ``{"who": true}``. Joining, saying and leaving are broadcast to the *other*
  members, by sending on their sessions: ``await member.send(Packet(...,
  encoding=member.encoding))``, each in the encoding that member speaks;
- **group 1** acknowledges, with ``{"ok": true}``, every packet that reached it. A
  group-0 handler that answers by itself (``who``, or an error such as "join first")
  stops propagation; one that succeeds silently lets the packet go on to the ``ok``:
  propagation at work;
- a **registry of members** that survives members vanishing. When a member's session
  ends without ``leave`` (its client hung up, timed out, or was cut off), the server's
  ``session_ended`` hook drops it and tells the others ``{"left": NAME, "reason":
  "disconnected"}`` at once. A member can also vanish *during* a broadcast, before
  the hook runs: one whose session is closed (``member.closed``) is dropped before each
  broadcast, ``join`` and ``who``, and one whose send fails (``trio.BrokenResourceError``
  or ``trio.ClosedResourceError``) or takes longer than :data:`SEND_TIMEOUT` seconds
  (it stopped reading) is dropped during it, with the same message; whichever notices
  first announces it, once. Members are sent to concurrently, so one slow member
  delays nobody else.

What each member receives:

======================  =========================  ====================================
a member sends          it gets back               the other members get
======================  =========================  ====================================
``{"join": "alice"}``   ``{"ok": true}``           ``{"joined": "alice"}``
``{"say": "hi"}``       ``{"ok": true}``           ``{"from": "alice", "say": "hi"}``
``{"leave": true}``     ``{"ok": true}``           ``{"left": "alice", "reason": "left"}``
``{"who": true}``       ``{"members": [...]}``     nothing
a refused request       ``{"status": "failure",    nothing
                        "error": ...}``
======================  =========================  ====================================

Names are 1 to 20 letters, digits, ``_`` or ``-``, unique in the room. The room lives
in the memory of one process: serve it with one process (no ``--workers``).

Try it. Serve it (on 127.0.0.1:8081; ``python -m examples.chat 9000`` picks another
port)::

    python -m examples.chat
    # or: asyncapy run examples.chat:app

then open two Python shells. In the first::

    >>> from asyncapy.client import Client
    >>> bob = Client(tls=False); bob.connect("127.0.0.1", 8081)
    >>> bob.request({"join": "bob"})
    {'ok': True}

in the second::

    >>> from asyncapy.client import Client
    >>> alice = Client(tls=False); alice.connect("127.0.0.1", 8081)
    >>> alice.request({"join": "alice"})
    {'ok': True}
    >>> alice.request({"say": "hello, bob"})
    {'ok': True}
    >>> alice.request({"say": "x" * 1000})
    {'status': 'failure', 'error': 'message too long', 'limit': 500}

and back in the first, read what was broadcast to bob::

    >>> bob.receive()
    {'joined': 'alice'}
    >>> bob.receive()
    {'from': 'alice', 'say': 'hello, bob'}

A member's own requests and the broadcasts to it share its connection, so a reply may
come after broadcasts that arrived first: read until the reply you wait for.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Optional

import trio

from asyncapy import Client, Packet, Server
from asyncapy.filters import Filters

__all__ = ["ChatRoom", "make_app", "app", "MAX_MESSAGE", "SEND_TIMEOUT"]

logger = logging.getLogger("examples.chat")

MAX_MESSAGE = 500
"""The longest message accepted, in characters."""

SEND_TIMEOUT = 5.0
"""Seconds a broadcast waits for one member to take a message before dropping it."""

NAME = r"[A-Za-z0-9_-]{1,20}\Z"
"""What a member's name may look like."""

BAD_NAME = "a name is 1 to 20 letters, digits, '_' or '-'"

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class ChatRoom(Server):
    """A :class:`~asyncapy.Server` holding one chat room: who joined, on which session.

    :param settings: the :class:`~asyncapy.Server` parameters.
    """

    def __init__(self, **settings) -> None:
        """Build the server from ``settings``, with an empty room."""
        super().__init__(**settings)
        self.members: dict[str, Client] = {}
        """The members, by name: the :class:`~asyncapy.Client` of each one's session."""
        self.names: dict[uuid.UUID, str] = {}
        """The name each session joined as, by session id."""

    async def session_ended(self, client: Client, reason: str) -> None:
        """A session ended: if it was a member's (that did not ``leave``), drop it and
        tell the others."""
        name = self.name_of(client)
        if name is not None and self.remove(name, client):
            logger.info("%s disconnected (%s)", name, reason)
            await self.broadcast({"left": name, "reason": "disconnected"})

    def name_of(self, client: Client) -> Optional[str]:
        """The name ``client``'s session joined as, or None."""
        return self.names.get(client.session.session_id)

    def add(self, name: str, client: Client) -> None:
        """Register ``client``'s session as ``name``."""
        self.members[name] = client
        self.names[client.session.session_id] = name

    def remove(self, name: str, client: Client) -> bool:
        """Unregister ``name`` if ``client``'s session still holds it; whether it did.

        The identity check matters: by the time a failed send is noticed, ``name`` may
        belong to a new session that joined after the old one vanished.
        """
        if self.members.get(name) is not client:
            return False
        del self.members[name]
        self.names.pop(client.session.session_id, None)
        return True

    def prune(self) -> list[str]:
        """Drop the members whose session is closed; their names."""
        gone = [name for name, member in self.members.items() if member.closed]
        for name in gone:
            self.remove(name, self.members[name])
        return gone

    async def sweep(self) -> None:
        """Drop the members whose session is closed, and tell everyone left."""
        for name in self.prune():
            logger.info("%s disconnected", name)
            await self.broadcast({"left": name, "reason": "disconnected"})

    async def broadcast(self, message: dict, sender: Optional[Client] = None) -> None:
        """Send ``message`` to every member but ``sender``, concurrently.

        Members found gone (session closed, send failed or too slow) are dropped, and
        every remaining member, ``sender`` included, is told ``{"left": NAME, "reason":
        "disconnected"}``; that broadcast may find more members gone, and so on until
        nobody else is.
        """
        gone = self.prune()
        targets = [(name, member) for name, member in self.members.items() if member is not sender]
        async with trio.open_nursery() as nursery:
            for name, member in targets:
                nursery.start_soon(self._deliver, name, member, message, gone)
        for name in gone:  # told to everyone left, the sender included
            logger.info("%s disconnected", name)
            await self.broadcast({"left": name, "reason": "disconnected"})

    async def _deliver(self, name: str, member: Client, message: dict, gone: list[str]) -> None:
        """Send ``message`` to one member; drop it (into ``gone``) if it is gone or stuck."""
        with trio.move_on_after(SEND_TIMEOUT) as waited:
            try:
                await member.send(Packet(message, encoding=member.encoding))
                return
            except _GONE:
                pass
        if waited.cancelled_caught:
            # Cancelled half-way through a packet: its stream is unusable. Close it,
            # which ends that member's session (its client sees the connection end).
            await member.close()
        if self.remove(name, member):
            gone.append(name)


def make_app(**settings) -> ChatRoom:
    """A fresh chat room with its handlers: an empty registry of its own.

    :param settings: :class:`~asyncapy.Server` parameters (``port``, ``timeout``...).
    """
    app = ChatRoom(**settings)

    async def refuse(client: Client, packet: Packet, error: str, **details) -> None:
        """Answer an error, then stop propagation: no ``ok`` for a refused request.
        Raises ``StopPropagation``: nothing after it runs."""
        await client.send(Packet({"status": "failure", "error": error, **details}, encoding=client.encoding))
        packet.stop_propagation()

    # -- group -1: every packet, first ------------------------------------------------
    @app.add_handler(group=-1)
    async def screen(client: Client, packet: Packet) -> None:
        """Log the packet (field names only) and refuse over-long messages."""
        logger.info("%s (%s) sent %s", client.address, app.name_of(client) or "-", sorted(map(str, packet)))
        text = packet.get("say")
        if text is not None and not isinstance(text, str):
            await refuse(client, packet, "a message is a string")
        if text is not None and len(text) > MAX_MESSAGE:
            await refuse(client, packet, "message too long", limit=MAX_MESSAGE)
        # Nothing to object to: the packet goes on to group 0.

    # -- group 0: the room --------------------------------------------------------------
    @app.add_handler(Filters.Fields(join=NAME))
    async def join(client: Client, packet: Packet) -> None:
        """``{"join": NAME}``: become a member; the others are told."""
        name = packet["join"]
        if not isinstance(name, str):  # Fields matched str(value): 7 passes as "7"
            await refuse(client, packet, BAD_NAME)
        current = app.name_of(client)
        if current is not None:
            await refuse(client, packet, f"already joined as {current}")
        await app.sweep()  # a name held by a vanished session is free again
        if name in app.members:
            await refuse(client, packet, "name taken")
        app.add(name, client)
        await app.broadcast({"joined": name}, client)

    @app.add_handler(Filters.Fields(join=None))
    async def bad_name(client: Client, packet: Packet) -> None:
        """``{"join": ...}`` with a name :data:`NAME` does not match."""
        await refuse(client, packet, BAD_NAME)

    @app.add_handler(Filters.Fields(say=None))
    async def say(client: Client, packet: Packet) -> None:
        """``{"say": TEXT}``: send TEXT to the other members."""
        name = app.name_of(client)
        if name is None:
            await refuse(client, packet, "join first")
        await app.broadcast({"from": name, "say": packet["say"]}, client)

    @app.add_handler(Filters.Fields(leave=None))
    async def leave(client: Client, packet: Packet) -> None:
        """``{"leave": true}``: stop being a member (the session stays open)."""
        name = app.name_of(client)
        if name is None:
            await refuse(client, packet, "join first")
        app.remove(name, client)
        await app.broadcast({"left": name, "reason": "left"}, client)

    @app.add_handler(Filters.Fields(who=None))
    async def who(client: Client, packet: Packet) -> None:
        """``{"who": true}`` -> ``{"members": [NAME, ...]}`` (an answer: no ``ok``)."""
        await app.sweep()
        await client.send(Packet({"members": sorted(app.members)}, encoding=client.encoding))
        packet.stop_propagation()

    @app.add_handler()
    async def unknown(client: Client, packet: Packet) -> None:
        """Anything else: refused, so not acknowledged."""
        await refuse(client, packet, "unknown request")

    # -- group 1: what got this far succeeded -------------------------------------------
    @app.add_handler(group=1)
    async def acknowledge(client: Client, packet: Packet) -> None:
        """``{"ok": true}`` for every packet that propagated this far."""
        await client.send(Packet({"ok": True}, encoding=client.encoding))

    return app


app = make_app()
"""The application ``asyncapy run examples.chat:app`` serves."""


def main(argv: Optional[list] = None) -> None:
    """``python -m examples.chat [PORT]``: serve on 127.0.0.1:PORT (8081)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        app.port = int(args[0])
    app.start()


if __name__ == "__main__":
    main()
