"""The ``asyncapy`` command line (also ``python -m asyncapy``).

``asyncapy run MODULE:ATTR`` serves the :class:`~asyncapy.server.Server` found at
``MODULE.ATTR``; the flags override the server's own settings. With ``--workers N``
(N > 1) it supervises N worker processes serving the same port (see
:mod:`asyncapy.workers`); each is started as ``asyncapy _worker ...``, a hidden
command taking the same arguments, so that it builds its server the same way.

``asyncapy send HOST:PORT JSON`` sends packets and prints the replies
(:mod:`asyncapy.cli.send`); ``asyncapy keys ACTION`` manages API keys in a shared
store (:mod:`asyncapy.cli.keys`). Every error is one line on stderr, never a
traceback (:mod:`asyncapy.cli`); docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from asyncapy.adapters.memory import MemorySessionStore

from . import __version__
from .adapters import store_urls
from .cli import CommandError, HelpFormatter, OneLineParser, UsageError, escape_unsafe, import_object
from .cli import keys as keys_command
from .cli import send as send_command
from .config import ConfigError, check_proxy_settings, load_config, validate
from .server import Server
from .stores import STORE_ENV, set_default_store
from .workers import WORKER_COMMAND, run_worker, supervise

__all__ = ["main", "load_app", "run_store"]


_TLS_SETTINGS = frozenset({"certfile", "keyfile", "cafile"})


def load_app(spec: str, *, traceback: bool = False) -> Server:
    """Import ``MODULE:ATTR`` (from the current directory too) and return the Server.

    :param traceback: print the whole traceback of an exception raised while
        importing (``--traceback``, or ``--log-level DEBUG``) before the one line.
    :raises UsageError: (exit status 2) for a bad spec, a missing module or attribute,
        a bad setting (a ``ConfigError``) raised while importing, or an object that is
        not a Server; :class:`CommandError` (1) when the module fails another way
        while importing. Both name the file and line that raised.
    """
    app = import_object(spec, "app", traceback=traceback)
    if not isinstance(app, Server):
        raise UsageError(f"{spec} is {app!r}, not an asyncapy Server")
    return app


_SERVER_FLAGS = (
    "host", "port", "store", "config", "certfile", "keyfile", "log_level",
    "max_protocol_errors", "store_timeout", "log_format", "trusted_proxies", "rate_limit", "rate_burst",
)
"""The ``run`` flags that shape the server, forwarded as they are to every worker.
Not ``--metrics-port`` and ``--metrics-host``: with workers, the supervisor serves the
metrics of them all (see :mod:`asyncapy.worker_metrics`)."""


_EPILOG = """\
Run 'asyncapy COMMAND --help' for the flags of each command.
exit status: 0 success; 1 network, protocol or store failure; 2 bad flags or input;
3 'send' got an error reply ({"status": "failure", ...}).
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="asyncapy",
        description="AsyncAPY command line: serve an application, talk to a server, manage "
        "API keys.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"asyncapy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve an application",
        description="Serve the Server object found at MODULE:ATTR until Ctrl-C or SIGTERM. "
        "The flags override the app's own settings, which override the defaults; a flag "
        "left out keeps the app's (or --config's) value.",
    )
    _add_server_arguments(run)
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serve with N processes sharing the port (default: 1, this process). With a "
        "session_limit, needs a shared store (--store redis://...)",
    )
    send_command.add_parser(commands)
    keys_command.add_parser(commands)
    # Hidden (no help=): how the supervisor of --workers starts each worker.
    worker = commands.add_parser(WORKER_COMMAND)
    _add_server_arguments(worker)
    worker.add_argument("--listen-fds", required=True, help=argparse.SUPPRESS)
    worker.add_argument("--control-fd", type=int, required=True, help=argparse.SUPPRESS)
    worker.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    return parser


def _add_server_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("app", metavar="MODULE:ATTR", help="where the Server object is, e.g. examples.echo:app")
    run.add_argument("--host", help="address to bind (default: the app's addr, 127.0.0.1 unless set)")
    run.add_argument("--port", type=int, help="TCP port, 0 for any free one (default: the app's port, 8081 unless set)")
    run.add_argument(
        "--store",
        metavar="URL",
        help="where sessions live, and API keys of every APIKeyFactory() created without "
        "store= (a Redis store is shared by every process using it): "
        + store_urls.grammar().replace("%", "%%")
        + f" (default: ${STORE_ENV}, else the --config file's store, else "
        "the app's own, memory unless set)",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="INI file with an [AsyncAPY] section; the other flags win over it (default: none)",
    )
    run.add_argument(
        "--certfile",
        metavar="FILE",
        help="PEM certificate chain: serve TLS (default: the app's certfile; plain TCP unless set)",
    )
    run.add_argument("--keyfile", metavar="FILE", help="PEM private key of --certfile (default: the app's keyfile)")
    run.add_argument(
        "--max-protocol-errors",
        type=int,
        metavar="N",
        help="close a session after N protocol errors in a row, 0 never (default: the "
        "app's max_protocol_errors, 100 unless set)",
    )
    run.add_argument(
        "--store-timeout",
        type=float,
        metavar="SECONDS",
        help="seconds the session store gets to admit a session before the client is "
        "answered ERR_UNAVAILABLE (default: the app's store_timeout, 5 unless set)",
    )
    run.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: the app's logging_level, INFO "
        "unless set)",
    )
    run.add_argument(
        "--log-format",
        metavar="FORMAT",
        help="text (the console_format) or json (one JSON object a line) (default: the "
        "app's log_format, text unless set)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz over HTTP on this port (default: the "
        "app's metrics_port; none unless set)",
    )
    run.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address the metrics port binds (default: the app's metrics_host, 127.0.0.1 "
        "unless set)",
    )
    _add_proxy_arguments(run)
    _add_limit_arguments(run)


def _add_limit_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--rate-limit",
        metavar="RATE",
        help="requests one client address may make: N/s, N/m or N/h, e.g. 100/s, shared by "
        "every process of the store; over it a packet is answered ERR_RATE_LIMITED "
        "(default: the app's rate_limit, none unless set)",
    )
    run.add_argument(
        "--rate-burst",
        metavar="N",
        type=int,
        help="requests allowed at once above --rate-limit (default: the app's rate_burst, 0 unless set)",
    )


def _add_proxy_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--proxy-protocol",
        action=argparse.BooleanOptionalAction,
        help="every connection starts with a PROXY protocol header (v1 or v2) from a trusted "
        "proxy, and the client's address is the one it names; needs --trusted-proxies (or "
        "the app's) (default: the app's proxy_protocol, off unless set)",
    )
    run.add_argument(
        "--traceback",
        action="store_true",
        help="when importing the app fails, print the whole traceback before the one-line "
        "error (also with --log-level DEBUG) (default: the one line, naming the file and line)",
    )
    run.add_argument(
        "--trusted-proxies",
        metavar="ADDR[,ADDR...]",
        help="the proxies whose PROXY headers are believed: IP addresses and CIDR networks, "
        "IPv4 or IPv6, e.g. 10.0.0.5,10.1.0.0/16,fd00::/8 (default: the app's trusted_proxies)",
    )
    run.add_argument(
        "--reactor",
        action=argparse.BooleanOptionalAction,
        help="serve plain-TCP sessions from one reactor task over epoll (Linux); --no-reactor "
        "gives each session a task of its own (default: the app's reactor, on unless set)",
    )
    run.add_argument(
        "--insecure-trust-any-proxy",
        action=argparse.BooleanOptionalAction,
        help="let --trusted-proxies cover every address (0.0.0.0/0, ::/0): any peer may then "
        "claim any client address; refused without this (default: the app's "
        "insecure_trust_any_proxy, off unless set)",
    )


def run_store(args: argparse.Namespace, config: dict) -> Optional[str]:
    """The store of this run: ``--store``, else ``ASYNCAPY_STORE``, else the config
    file's ``store``, else ``None`` (the app's own). It holds the sessions, and is the
    default store of every ``APIKeyFactory()`` the app creates without ``store=``."""
    if args.store is not None:
        return validate("store", args.store, "--store")
    value = os.environ.get(STORE_ENV)
    if value:
        return validate("store", value, STORE_ENV)
    return config.get("store")


def _configure(args: argparse.Namespace) -> Server:
    """The app of ``args``, with the config file's and the flags' overrides applied."""
    config = load_config(args.config) if args.config else {}
    store = run_store(args, config)
    # Before the import: the app's APIKeyFactory() objects are created as it runs.
    set_default_store(store)
    debug = str(args.log_level or config.get("logging_level", "")).upper() in ("DEBUG", str(logging.DEBUG))
    app = load_app(args.app, traceback=args.traceback or debug)
    overrides: dict = dict(config)
    sources: dict = dict.fromkeys(config, args.config)
    for flag, name in (
        ("host", "addr"),
        ("port", "port"),
        ("log_level", "logging_level"),
        ("max_protocol_errors", "max_protocol_errors"),
        ("store_timeout", "store_timeout"),
        ("certfile", "certfile"),
        ("keyfile", "keyfile"),
        ("log_format", "log_format"),
        ("metrics_port", "metrics_port"),
        ("metrics_host", "metrics_host"),
        ("proxy_protocol", "proxy_protocol"),
        ("trusted_proxies", "trusted_proxies"),
        ("insecure_trust_any_proxy", "insecure_trust_any_proxy"),
        ("reactor", "reactor"),
        ("rate_limit", "rate_limit"),
        ("rate_burst", "rate_burst"),
    ):
        value = getattr(args, flag)
        if value is not None:  # an absent flag keeps the app's (or the config's) value
            source = f"--{flag.replace('_', '-')}"
            overrides[name] = validate(name, value, source)
            sources[name] = source
    if store is not None:  # --store, ASYNCAPY_STORE or the config's (run_store)
        overrides["store"] = store
    tls = {name: (overrides.pop(name), sources[name]) for name in _TLS_SETTINGS & overrides.keys()}
    if tls and app._has_own_tls_context():
        # An app that built its own ssl_context (client verification, say) must not
        # lose it to a --certfile given for a certificate rotation: refused, naming
        # both, before anything is changed.
        app._use_tls_files(tls)
    check_proxy_settings(  # before anything is changed, as above
        overrides.get("proxy_protocol", app.proxy_protocol),
        overrides.get("trusted_proxies", app.trusted_proxies),
        "the app, --config and the flags",
        trust_any=overrides.get("insecure_trust_any_proxy", app.insecure_trust_any_proxy),
    )
    for name, value in overrides.items():
        setattr(app, name, value)
    if tls:
        # The files changed, from the flags or the config: the context must follow,
        # or the server would silently keep serving without (or with stale) TLS.
        app._use_tls_files(tls)
    return app


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The ``run`` arguments of ``args`` minus ``--workers``: what each worker gets."""
    forwarded = [args.app]
    for flag in _SERVER_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            forwarded += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("proxy_protocol", "insecure_trust_any_proxy", "reactor"):
        value = getattr(args, flag)
        if value is not None:
            name = flag.replace("_", "-")
            forwarded.append(f"--{name}" if value else f"--no-{name}")
    if args.traceback:
        forwarded.append("--traceback")
    return forwarded


def _run(args: argparse.Namespace) -> int:
    app = _configure(args)
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise ConfigError("workers", workers, "an integer of at least 1", "--workers")
    if workers == 1:
        app.start()  # configures logging in app.log_format (--log-format)
        return 0
    if app.session_limit > 0 and isinstance(app.store, MemorySessionStore):
        # Each worker's in-memory store counts only its own sessions: the limit would
        # silently become N times the limit.
        print(
            f"asyncapy: --workers {workers} with session_limit {app.session_limit} needs a "
            "shared session store (each worker's in-memory store counts only its own "
            "sessions): pass a Redis store, e.g. --store redis://localhost:6379/0",
            file=sys.stderr,
        )
        return 2
    return supervise(app, _worker_args(args), workers)


def _worker(args: argparse.Namespace) -> int:
    app = _configure(args)
    run_worker(app, [int(fd) for fd in args.listen_fds.split(",")], args.control_fd, index=args.worker_index)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``asyncapy`` command: the exit status."""
    args = _build_parser().parse_args(argv)
    command = getattr(args, "command_function", None)
    if command is not None:  # send, keys
        prog = f"asyncapy {args.command}"
        try:
            return command(args)
        except CommandError as exc:
            if exc.message:  # it may quote what a server sent: never raw controls
                print(f"{prog}: {escape_unsafe(exc.message)}", file=sys.stderr)
            return exc.status
        except KeyboardInterrupt:
            return 130
    try:
        return _worker(args) if args.command == WORKER_COMMAND else _run(args)
    except ConfigError as exc:
        print(f"asyncapy: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:  # the app could not be loaded (UsageError: 2)
        print(f"asyncapy: {exc.message}", file=sys.stderr)
        return exc.status
    except OSError as exc:
        print(f"asyncapy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
