"""Scaling out: several worker processes, one port, sessions and API keys in Redis.

What it shows: an application ready for ``asyncapy run --workers N``.

- The server has a ``session_limit`` (:data:`SESSION_LIMIT` sessions per client
  address). With several processes the limit only means something if they count the
  sessions together, in a shared session store: ``asyncapy run`` refuses ``--workers
  2`` with a ``session_limit`` and sessions in memory.
- An :class:`~asyncapy.APIKeyFactory` keeps its keys in the same store, so a key
  issued by any process (or by a script) works in every worker at once.
- Every reply says which process answered (``pid``) and how many sessions the
  client's address holds *across all workers* (``len(await client.get_sessions())``).

Both stores come from one setting: ``asyncapy run --store URL``, or the environment
variable ``ASYNCAPY_STORE``: ``memory://`` (the default: this process only) or a Redis
URL such as ``redis://127.0.0.1:6379/0``. The key factory is created without
``store=``, so it takes the store of the run (``--store``, else ``ASYNCAPY_STORE``),
like the sessions.

The requests:

=============================  =========================================================
request                        reply
=============================  =========================================================
``{"whoami": true}``           ``{"pid": PID, "sessions": N}``
``{"key": KEY}``               ``{"user": NAME, "pid": PID, "sessions": N}``
anything else, a bad key       ``{"status": "failure", "error": "unauthorized"}``
=============================  =========================================================

Try it with a Redis (``apt-get install redis-server``, or ``docker run -p 6379:6379
redis``)::

    export ASYNCAPY_STORE=redis://127.0.0.1:6379/0
    asyncapy run examples.scaleout:app --workers 2

issue a key from another terminal, into the same Redis (any process may)::

    ASYNCAPY_STORE=redis://127.0.0.1:6379/0 python -m examples.scaleout issue alice

and call it over several connections with the bundled client::

    python - KEY <<'EOF'
    import sys
    from asyncapy.client import Client
    clients = [Client(tls=False) for _ in range(5)]
    for client in clients:
        client.connect("127.0.0.1", 8081)
        print(client.request({"key": sys.argv[1]}))
    EOF

Each reply names the worker that accepted that connection (which one is up to the
kernel) and the live sessions of 127.0.0.1 in *both* workers: 1, 2, 3, 4, then the
fifth connection is refused with ``ERR_SESSION_LIMIT_REACHED``, whichever worker
accepted it.

While Redis is down, a new connection is refused with ``ERR_UNAVAILABLE``, and so is a
packet on an open connection, with a key (the key cannot be checked) or without (the
handler's ``get_sessions()`` cannot count): "retry later", with one warning line in
the server's log each. The connection stays open; the same request succeeds once
Redis is back.

Without Redis, ``python -m examples.scaleout`` (or ``asyncapy run
examples.scaleout:app``) serves one process with everything in memory;
``python -m examples.scaleout`` then issues a key at start and prints it, since no
other process can put one in its memory. ``python -m examples.scaleout 9000`` picks
another port than 8081.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from asyncapy import APIKeyFactory, Client, Packet, Server
from asyncapy.filters import Filters

__all__ = ["ScaleOutAPI", "make_app", "app", "STORE_ENV", "SESSION_LIMIT", "store_url"]

STORE_ENV = "ASYNCAPY_STORE"
"""The environment variable naming the store of sessions and keys."""

SESSION_LIMIT = 4
"""Live sessions one client address may hold, across every worker."""


def store_url() -> str:
    """The value of ``ASYNCAPY_STORE``, or ``memory://`` when it is unset or empty."""
    return os.environ.get(STORE_ENV) or "memory://"


class ScaleOutAPI(Server):
    """A :class:`~asyncapy.Server` carrying the key factory its handlers use.

    :param keys: the :class:`~asyncapy.APIKeyFactory`; each key's metadata is
        ``{"user": NAME}``.
    :param settings: the :class:`~asyncapy.Server` parameters.
    """

    def __init__(self, keys: APIKeyFactory, **settings) -> None:
        """Build the server from ``settings``; keep ``keys``."""
        super().__init__(**settings)
        self.keys = keys
        """The API keys, in the same store as the sessions."""


def make_app(store: Optional[str] = None, **settings) -> ScaleOutAPI:
    """A fresh application whose sessions and keys both live in ``store``.

    :param store: ``memory://`` or a Redis URL; by default :func:`store_url`.
    :param settings: more :class:`~asyncapy.Server` parameters (``port``...).
    """
    url = store_url() if store is None else store
    # Without store=, the factory takes the process's default store: the one of
    # `asyncapy run --store`, else ASYNCAPY_STORE, else memory.
    keys = APIKeyFactory() if store is None else APIKeyFactory(store=store)
    settings.setdefault("session_limit", SESSION_LIMIT)
    app = ScaleOutAPI(keys, store=url, **settings)

    async def where(client: Client) -> dict:
        """This process, and the sessions of the client's address in every process."""
        return {"pid": os.getpid(), "sessions": len(await client.get_sessions())}

    @app.add_handler(Filters.Fields(whoami=None))
    async def whoami(client: Client, packet: Packet) -> None:
        """``{"whoami": ...}`` -> ``{"pid": PID, "sessions": N}``."""
        await client.send(Packet(await where(client), encoding=client.encoding))

    @app.add_handler(Filters.Fields(key=None) & Filters.APIFactory(keys, "key"))
    async def user(client: Client, packet: Packet) -> None:
        """``{"key": KEY}`` -> ``{"user": NAME, "pid": PID, "sessions": N}``."""
        try:
            metadata = await keys.aget(packet["key"])  # async: never blocks the loop
        except KeyError:  # revoked since the filter checked it
            metadata = None
        if not isinstance(metadata, dict) or "user" not in metadata:
            await refuse(client, packet)
            return
        reply = {"user": metadata["user"], **await where(client)}
        await client.send(Packet(reply, encoding=client.encoding))

    @app.add_handler()
    async def refuse(client: Client, packet: Packet) -> None:
        """Anything else: no handler above took it."""
        await client.send(Packet({"status": "failure", "error": "unauthorized"}, encoding=client.encoding))

    return app


app = make_app()
"""The application ``asyncapy run examples.scaleout:app`` serves."""


def main(argv: Optional[list] = None) -> int:
    """``python -m examples.scaleout [PORT]`` serves (one process);
    ``python -m examples.scaleout issue USER`` issues a key into ``ASYNCAPY_STORE``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["issue"]:
        if len(args) != 2:
            print("usage: python -m examples.scaleout issue USER", file=sys.stderr)
            return 2
        if store_url().lower().startswith("memory://"):
            print(
                f"{STORE_ENV} is not set: a key issued into this script's memory would die "
                "with it. Set it to the Redis URL the server uses.",
                file=sys.stderr,
            )
            return 2
        print(app.keys.issue({"user": args[1]}))  # a script: the blocking API is right here
        return 0
    if args:
        app.port = int(args[0])
    if store_url().lower().startswith("memory://"):
        print(f"Keys live in this process's memory; try this one: {app.keys.issue({'user': 'demo'})}")
    app.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
