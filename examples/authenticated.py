"""An authenticated API: a local admin issues API keys, key holders get their own data.

What it shows:

- an **admin-only** handler, guarded by ``Filters.Ip("127.0.0.1") | Filters.Ip("::1")``,
  that issues keys (and one that revokes any key);
- handlers guarded by ``Filters.Fields(...) & Filters.APIFactory(keys, "key")`` that
  serve data using the key's metadata, read with ``await keys.aget(...)``: handlers use
  the async key API only, never the blocking ``keys.get()``;
- **groups and propagation**: every group-0 handler that answers stops propagation, so
  the one handler of group 1, a fallback replying ``{"status": "failure", "error":
  "unauthorized"}``, only sees packets that no guarded handler took;
- key revocation, by the admin (any key) or by a key's holder (their own).

The requests, all on one connection or on several:

==========================================  ===========  ==================================
request                                     who          reply
==========================================  ===========  ==================================
``{"issue_key": {"user": "alice"}}``        local admin  ``{"key": KEY}``
``{"revoke_key": KEY}``                     local admin  ``{"revoked": true}``
``{"key": KEY}``                            key holder   ``{"user": "alice"}``
``{"key": KEY, "note": "buy milk"}``        key holder   ``{"notes": 1}`` (how many now)
``{"key": KEY, "notes": true}``             key holder   ``{"notes": ["buy milk"]}``
``{"key": KEY, "revoke": true}``            key holder   ``{"revoked": true}``
anything else, a bad or revoked key         anyone       ``{"status": "failure",
                                                         "error": "unauthorized"}``
==========================================  ===========  ==================================

Notes belong to the *user* the key was issued for, so two keys issued for ``alice``
share them. They live in this process's memory.

Try it. Serve it (on 127.0.0.1:8081; ``python -m examples.authenticated 9000`` picks
another port)::

    python -m examples.authenticated
    # or: asyncapy run examples.authenticated:app

then, in another terminal, with the bundled client::

    python - <<'EOF'
    from asyncapy.client import Client
    with Client(tls=False) as c:
        c.connect("127.0.0.1", 8081)
        key = c.request({"issue_key": {"user": "alice"}})["key"]   # we are 127.0.0.1: admin
        print(c.request({"key": key}))                            # {'user': 'alice'}
        print(c.request({"key": key, "note": "buy milk"}))        # {'notes': 1}
        print(c.request({"key": key, "notes": True}))             # {'notes': ['buy milk']}
        print(c.request({"key": "not-a-key", "notes": True}))     # unauthorized
        print(c.request({"key": key, "revoke": True}))            # {'revoked': True}
        print(c.request({"key": key}))                            # unauthorized
    EOF

Serve it with ``--host 0.0.0.0`` and call it from another machine to see the admin
filter at work: ``issue_key`` is then ``unauthorized`` too.

Keys live in memory by default, and die with the process. Run it with a Redis store
(``asyncapy run examples.authenticated:app --store redis://127.0.0.1:6379/0``, or
``ASYNCAPY_STORE=redis://127.0.0.1:6379/0``) to keep them in Redis, hashed, shared by
every process using it (see ``examples/scaleout.py``): the factory is created without
``store=``, so it takes the store of the run, as the sessions do.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Optional

from asyncapy import APIKeyFactory, Client, Packet, Server
from asyncapy.filters import Filters
from asyncapy.util import fingerprint

__all__ = ["AuthenticatedAPI", "make_app", "app", "ADMIN", "STORE_ENV"]

logger = logging.getLogger("examples.authenticated")

STORE_ENV = "ASYNCAPY_STORE"
"""The environment variable naming where API keys live (memory:// when unset)."""

ADMIN = Filters.Ip("127.0.0.1") | Filters.Ip("::1")
"""Who may issue and revoke any key: clients on this machine only."""

USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}\Z")
"""What a user name may look like."""

MAX_NOTE = 500
"""The longest note accepted, in characters."""

UNAUTHORIZED = {"status": "failure", "error": "unauthorized"}


class AuthenticatedAPI(Server):
    """A :class:`~asyncapy.Server` carrying the state its handlers share.

    :param keys: the :class:`~asyncapy.APIKeyFactory` issuing and checking keys.
    :param settings: the :class:`~asyncapy.Server` parameters.
    """

    def __init__(self, keys: APIKeyFactory, **settings) -> None:
        """Build the server from ``settings``; keep ``keys``; start with no notes."""
        super().__init__(**settings)
        self.keys = keys
        """The API keys; each key's metadata is ``{"user": NAME}``."""
        self.notes: dict[str, list[str]] = {}
        """The notes of each user, in this process's memory."""


def make_app(store: Optional[str] = None, **settings) -> AuthenticatedAPI:
    """A fresh application: its own keys, its own notes, its own handlers.

    :param store: where the keys live (``memory://``, ``redis://...``); by default the
        process's default store (``asyncapy run --store``, else ``ASYNCAPY_STORE``, else
        memory).
    :param settings: :class:`~asyncapy.Server` parameters (``port``, ``timeout``...).
    """
    keys = APIKeyFactory(store=store)  # None: the run's store, else ASYNCAPY_STORE, else memory
    app = AuthenticatedAPI(keys, **settings)

    async def reply(client: Client, fields: dict) -> None:
        """Send ``fields`` to ``client``, in the encoding its session speaks."""
        await client.send(Packet(fields, encoding=client.encoding))

    async def finish(client: Client, packet: Packet, fields: dict) -> None:
        """Reply, then stop propagation: the packet was handled, so group 1's fallback
        must not answer it too. Raises ``StopPropagation``: nothing after it runs."""
        await reply(client, fields)
        packet.stop_propagation()

    async def user_of(client: Client, packet: Packet) -> str:
        """The user the packet's key was issued for.

        The filter checked the key a moment ago, but another session may have revoked
        it since: then the request is unauthorized, as if the filter had failed.
        """
        try:
            metadata = await keys.aget(packet["key"])
        except KeyError:
            await finish(client, packet, UNAUTHORIZED)
            raise  # not reached: finish() raised StopPropagation
        return metadata["user"]

    # -- group 0: the admin's handlers (local clients only) -----------------------------
    @app.add_handler(ADMIN & Filters.Fields(issue_key=None))
    async def issue_key(client: Client, packet: Packet) -> None:
        """``{"issue_key": {"user": NAME}}`` -> ``{"key": KEY}``."""
        request = packet["issue_key"]
        user = request.get("user") if isinstance(request, dict) else None
        if not isinstance(user, str) or not USER_NAME.match(user):
            error = "issue_key needs {\"user\": NAME}: 1 to 32 letters, digits, '_', '.' or '-'"
            await finish(client, packet, {"status": "failure", "error": error})
        key = await keys.aissue({"user": user})
        logger.info("Issued key %s for %r to %s", fingerprint(key), user, client.address)
        await finish(client, packet, {"key": key})

    @app.add_handler(ADMIN & Filters.Fields(revoke_key=None))
    async def revoke_key(client: Client, packet: Packet) -> None:
        """``{"revoke_key": KEY}`` -> ``{"revoked": true}``: any key, by the admin."""
        key = packet["revoke_key"]
        try:
            if not isinstance(key, str):
                raise KeyError(key)
            await keys.arevoke(key)
        except KeyError:
            await finish(client, packet, {"status": "failure", "error": "unknown key"})
        logger.info("Key %s revoked by the admin at %s", fingerprint(key), client.address)
        await finish(client, packet, {"revoked": True})

    # -- group 0: the key holders' handlers ---------------------------------------------
    # Fields first: `&` short-circuits, so the key is looked up (a store round trip with
    # Redis) only for the one handler whose fields match, not for every handler tried.
    @app.add_handler(Filters.Fields(key=None) & Filters.APIFactory(keys, "key"))
    async def whoami(client: Client, packet: Packet) -> None:
        """``{"key": KEY}`` -> ``{"user": NAME}``."""
        await finish(client, packet, {"user": await user_of(client, packet)})

    @app.add_handler(Filters.Fields(key=None, note=None) & Filters.APIFactory(keys, "key"))
    async def add_note(client: Client, packet: Packet) -> None:
        """``{"key": KEY, "note": TEXT}`` -> ``{"notes": COUNT}``."""
        user = await user_of(client, packet)
        note = packet["note"]
        if not isinstance(note, str) or not 0 < len(note) <= MAX_NOTE:
            error = f"a note is a string of 1 to {MAX_NOTE} characters"
            await finish(client, packet, {"status": "failure", "error": error})
        notes = app.notes.setdefault(user, [])
        notes.append(note)
        await finish(client, packet, {"notes": len(notes)})

    @app.add_handler(Filters.Fields(key=None, notes=None) & Filters.APIFactory(keys, "key"))
    async def list_notes(client: Client, packet: Packet) -> None:
        """``{"key": KEY, "notes": true}`` -> ``{"notes": [TEXT, ...]}``."""
        user = await user_of(client, packet)
        await finish(client, packet, {"notes": list(app.notes.get(user, []))})

    @app.add_handler(Filters.Fields(key=None, revoke=None) & Filters.APIFactory(keys, "key"))
    async def revoke_own_key(client: Client, packet: Packet) -> None:
        """``{"key": KEY, "revoke": true}`` -> ``{"revoked": true}``: the holder's own key."""
        key = packet["key"]
        try:
            await keys.arevoke(key)
        except KeyError:  # revoked meanwhile, by the admin or another session
            await finish(client, packet, UNAUTHORIZED)
        logger.info("Key %s revoked by its holder at %s", fingerprint(key), client.address)
        await finish(client, packet, {"revoked": True})

    # -- group 1: whatever no handler of group 0 took -----------------------------------
    @app.add_handler(group=1)
    async def unauthorized(client: Client, packet: Packet) -> None:
        """Every packet that reaches group 1 was refused: an unknown request, a missing,
        bad or revoked key, or an admin request from another machine."""
        await reply(client, UNAUTHORIZED)

    return app


app = make_app()
"""The application ``asyncapy run examples.authenticated:app`` serves."""


def main(argv: Optional[list] = None) -> None:
    """``python -m examples.authenticated [PORT]``: serve on 127.0.0.1:PORT (8081)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        app.port = int(args[0])
    app.start()


if __name__ == "__main__":
    main()
