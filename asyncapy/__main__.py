"""The ``asyncapy`` command line (also ``python -m asyncapy``).

``asyncapy run MODULE:ATTR`` serves the :class:`~asyncapy.server.Server` found at
``MODULE.ATTR``; the flags override the server's own settings.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from . import __version__
from .config import ConfigError, load_config, validate
from .server import Server

__all__ = ["main", "load_app"]


_TLS_SETTINGS = frozenset({"certfile", "keyfile", "cafile"})


def load_app(spec: str) -> Server:
    """Import ``MODULE:ATTR`` (from the current directory too) and return the Server."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"asyncapy: expected MODULE:ATTR (like examples.echo:app), not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"asyncapy: cannot import {module_name!r}: {exc}") from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"asyncapy: module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, Server):
        raise SystemExit(f"asyncapy: {spec} is {app!r}, not an asyncapy Server")
    return app


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncapy", description="AsyncAPY command line")
    parser.add_argument("--version", action="version", version=f"asyncapy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve an application",
        description="Serve the Server object found at MODULE:ATTR until Ctrl-C or SIGTERM.",
    )
    run.add_argument("app", metavar="MODULE:ATTR", help="where the Server object is, e.g. examples.echo:app")
    run.add_argument("--host", help="address to bind (overrides the app's addr)")
    run.add_argument("--port", type=int, help="TCP port (overrides the app's port)")
    run.add_argument("--config", metavar="FILE", help="INI file with an [AsyncAPY] section")
    run.add_argument("--certfile", metavar="FILE", help="PEM certificate chain: serve TLS")
    run.add_argument("--keyfile", metavar="FILE", help="PEM private key of --certfile")
    run.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (overrides the app's logging_level)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    overrides: dict = {}
    if args.config:
        overrides.update(load_config(args.config))
    for flag, name in (("host", "addr"), ("port", "port"), ("log_level", "logging_level")):
        value = getattr(args, flag)
        if value is not None:
            overrides[name] = validate(name, value, f"--{flag.replace('_', '-')}")
    for flag in ("certfile", "keyfile"):
        value = getattr(args, flag)
        if value is not None:  # an absent flag keeps the app's (or the config's) file
            overrides[flag] = validate(flag, value, f"--{flag}")
    for name, value in overrides.items():
        setattr(app, name, value)
    if overrides.keys() & _TLS_SETTINGS:
        # The files changed, from the flags or the config: the context must follow,
        # or the server would silently keep serving without (or with stale) TLS.
        app.ssl_context = app._tls_from_files()
    app.start()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``asyncapy`` command."""
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"asyncapy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"asyncapy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
