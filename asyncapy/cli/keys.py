"""``asyncapy keys ACTION --store STORE``: issue, read, update, reissue and revoke API keys.

The command drives :class:`~asyncapy.util.APIKeyFactory`'s synchronous methods (the
ones meant for scripts) against a store that outlives the command:

* a Redis URL (any form of :mod:`asyncapy.adapters.store_urls` but ``memory://``), the
  store ``asyncapy run --store`` and ``APIKeyFactory(store=URL)`` use;
* a ``sqlite:///PATH`` URL, the file ``APIKeyFactory(store="sqlite:///PATH")`` uses
  (:mod:`asyncapy.adapters.sqlite`); or
* ``MODULE:ATTR`` naming a :class:`~asyncapy.domain.ports.KeyStore` object (your own
  adapter) or an :class:`~asyncapy.util.APIKeyFactory` (the very one your server checks
  keys with).

``memory://`` is refused: the keys would vanish when the command exits. The store
may also come from the ``ASYNCAPY_STORE`` environment variable, which keeps a Redis
password out of the shell history and out of ``ps``.

Secrets: the only key ever printed is the one just issued or reissued, on stdout.
A key given to the command (``get``, ``update``, ``reissue``, ``revoke``) is never
printed nor logged; a missing key is named by its :func:`~asyncapy.util.fingerprint`,
the tag the server's logs use. ``KEY`` may be ``-`` to read the key from stdin, so it
stays out of ``ps`` and the shell history too. Store URLs are echoed only with their
password masked (:func:`~asyncapy.domain.redaction.redact`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from asyncapy.domain.errors import StoreUnavailable
from asyncapy.domain.keylimits import key_limit
from asyncapy.domain.ports import KeyStore, run_to_completion
from asyncapy.domain.redaction import redact_url

from ..adapters import store_urls
from ..config import ConfigError
from ..util import APIKeyFactory, fingerprint
from . import EXIT_OK, CommandError, HelpFormatter, UsageError, import_object, parse_json, print_json

__all__ = ["STORE_ENV", "add_parser", "open_factory", "run"]

from ..stores import STORE_ENV  # noqa: E402  (re-exported: the variable read when --store is not given)

_STORE_HINT = (
    "pass --store redis://HOST:PORT/DB or --store sqlite:///keys.db (the store your "
    "APIKeyFactory uses), or --store MODULE:ATTR naming your KeyStore or APIKeyFactory"
)

EXAMPLES = """\
examples:
  export ASYNCAPY_STORE=redis://localhost:6379/0
  KEY=$(asyncapy keys issue --metadata '{"user": "alice"}')
  echo "$KEY" | asyncapy keys get -
  asyncapy keys update "$KEY" '{"user": "alice", "plan": "pro"}'
  KEY=$(asyncapy keys reissue "$KEY")
  asyncapy keys revoke "$KEY"
  asyncapy keys issue --rate-limit 100/s --rate-burst 50   # the key's own limit
  asyncapy keys issue --store sqlite:///keys.db    # APIKeyFactory(store="sqlite:///keys.db")
  asyncapy keys issue --store mykeys:store         # mykeys.py: store = MyKeyStore(...)

exit status: 0 done; 1 no such key, or the store is unavailable; 2 bad flags or input.
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``keys`` command and its actions to ``commands`` (argparse sub-parsers)."""
    keys = commands.add_parser(
        "keys",
        help="issue, read, update, reissue and revoke API keys in a shared store",
        description="Manage the API keys that Filters.APIFactory checks, in a store shared "
        "with the server (Redis, an SQLite file, or a KeyStore of your own). Run "
        "'asyncapy keys ACTION --help' for each action's flags.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    _add_issue(actions)

    get = _action(actions, "get", "print a key's metadata", "Print the metadata of KEY as JSON on stdout.")
    _key_argument(get)
    get.add_argument(
        "--pretty",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="indent the JSON, or (--no-pretty) write it on one line (default: indented "
        "when stdout is a terminal)",
    )

    update = _action(
        actions, "update", "replace a key's metadata", "Replace the metadata of KEY with JSON; prints nothing."
    )
    _key_argument(update)
    update.add_argument("metadata", metavar="JSON", help="the new metadata, any JSON value")

    reissue = _action(
        actions,
        "reissue",
        "replace a key by a new one and print it",
        "Replace KEY by a new key that keeps its metadata (KEY stops working at once); print "
        "the new key on stdout.",
    )
    _key_argument(reissue)
    _size_argument(reissue)

    revoke = _action(actions, "revoke", "delete a key", "Delete KEY: it stops working at once; prints nothing.")
    _key_argument(revoke)
    return keys


def _add_issue(actions: Any) -> None:
    issue = _action(
        actions,
        "issue",
        "create a key and print it",
        "Create a new random key carrying --metadata, store it, and print it on stdout.",
    )
    issue.add_argument(
        "--metadata",
        metavar="JSON",
        default="null",
        help="the key's metadata, any JSON value, e.g. '{\"user\": \"alice\"}' (default: null)",
    )
    _size_argument(issue)
    issue.add_argument(
        "--rate-limit",
        metavar="RATE",
        default=None,
        help="the key's own rate limit, N/s, N/m or N/h (e.g. 100/s), stored with the key "
        "(default: none)",
    )
    issue.add_argument(
        "--rate-burst",
        metavar="N",
        type=int,
        default=0,
        help="requests the key may make at once above --rate-limit (default: 0)",
    )


def _action(actions: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """One action's parser, with the ``--store`` every action takes."""
    parser = actions.add_parser(name, help=help, description=description, epilog=EXAMPLES, formatter_class=HelpFormatter)
    parser.add_argument(
        "--store",
        metavar="STORE",
        default=os.environ.get(STORE_ENV) or None,
        help="where the keys live: a URL, "
        + store_urls.grammar(names=[s.name for s in store_urls.SCHEMES if s.name != "memory"]).replace("%", "%%")
        + "; or MODULE:ATTR naming a KeyStore or an APIKeyFactory (imported from the current "
        f"directory too); memory:// is refused (default: ${STORE_ENV}; required if unset)",
    )
    parser.set_defaults(command_function=run)
    return parser


def _key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "key",
        metavar="KEY",
        help="the API key, or - to read it from the first line of stdin (keeps it out "
        "of ps and the shell history); a key that begins with - (none issued since "
        "0.6 does) goes last, after --",
    )


def _size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        type=int,
        metavar="N",
        help="length of the new key in characters, at least 16 (default: 32, or the "
        "size of the APIKeyFactory named by --store)",
    )


def _import_store(spec: str) -> Any:
    return import_object(spec, "--store")


def open_factory(store: Optional[str], size: Optional[int] = None) -> APIKeyFactory:
    """The :class:`APIKeyFactory` over the store that ``--store`` names (see the module).

    :param size: the length of keys it issues; ``None`` keeps the named factory's size,
        or 32.
    :raises UsageError: for a missing, ``memory://`` or unusable ``store``.
    """
    if size is not None and size < 16:
        raise UsageError(f"--size must be at least 16, not {size}")
    if not store:
        raise UsageError(f"a key store is required: {_STORE_HINT} (or set ${STORE_ENV})")
    if "://" in store:
        scheme = store.partition("://")[0].lower()
        if scheme == "memory":
            raise UsageError(
                "--store memory:// keeps keys in this process only: they would be gone "
                f"when this command exits; {_STORE_HINT}"
            )
        try:
            store_urls.check(store)
        except ValueError as exc:  # never quotes the URL; redact_url masks its password
            raise UsageError(f"invalid --store {redact_url(store)!r} ({exc})") from None
        try:
            return APIKeyFactory(size if size is not None else 32, store=store)
        except StoreUnavailable as exc:  # an SQLite file that cannot be opened
            raise CommandError(f"the key store is unavailable: {exc}") from None
        except ConfigError as exc:  # checked above: a limit such as ASYNCAPY_KEY_CACHE_SIZE
            raise UsageError(str(exc)) from None
    target = _import_store(store)
    if isinstance(target, APIKeyFactory):
        if size is not None:
            target.size = size
        return target
    if isinstance(target, KeyStore):
        return APIKeyFactory(size if size is not None else 32, store=target)
    raise UsageError(
        f"--store {redact_url(store)} is a {type(target).__name__}, not a KeyStore nor an APIKeyFactory"
    )


def _read_key(key: str) -> str:
    if key == "-":
        key = sys.stdin.readline().strip()
        if not key:
            raise UsageError("KEY is -, but stdin holds no key")
    return key


def _perform(factory: APIKeyFactory, args: argparse.Namespace, key: str, metadata: Any) -> None:
    action = args.keys_action
    if action == "issue":
        if args.rate_limit is None and not args.rate_burst:
            print(factory.issue(metadata), flush=True)  # as 0.5 (a subclass's issue may take no more)
        else:
            print(factory.issue(metadata, rate_limit=args.rate_limit, rate_burst=args.rate_burst), flush=True)
        return
    try:
        if action == "get":
            pretty = args.pretty if args.pretty is not None else sys.stdout.isatty()
            print_json(factory.get(key), pretty)
        elif action == "update":
            factory.update(key, metadata)
        elif action == "reissue":
            print(factory.reissue(key), flush=True)
        elif action == "revoke":
            factory.revoke(key)
        else:  # pragma: no cover - argparse allows only the actions above
            raise UsageError(f"unknown action {action!r}")
    except KeyError:
        raise CommandError(f"no such key (fingerprint {fingerprint(key)})") from None


def run(args: argparse.Namespace) -> int:
    """Run ``asyncapy keys ACTION`` with parsed ``args``; the exit status (errors raise
    :class:`~asyncapy.cli.CommandError`)."""
    # The input first: bad JSON or a missing key is refused before the store is opened.
    what = "--metadata" if args.keys_action == "issue" else "JSON"
    metadata = parse_json(args.metadata, what) if hasattr(args, "metadata") else None
    key = _read_key(args.key) if hasattr(args, "key") else ""
    if getattr(args, "rate_limit", None) is not None or getattr(args, "rate_burst", None):
        try:
            key_limit(args.rate_limit, args.rate_burst)
        except ValueError as exc:
            raise UsageError(f"--{str(exc).replace('_', '-', 1)}") from None
    factory = open_factory(args.store, getattr(args, "size", None))
    try:
        _perform(factory, args, key, metadata)
    except StoreUnavailable as exc:
        raise CommandError(f"the key store is unavailable: {exc}") from None
    except RuntimeError as exc:  # an adapter that cannot be driven synchronously
        raise CommandError(f"the key store failed: {exc}") from None
    finally:
        try:
            run_to_completion(factory.store.aclose())
        except Exception:
            pass  # the command's outcome is what matters; the process ends anyway
    return EXIT_OK
