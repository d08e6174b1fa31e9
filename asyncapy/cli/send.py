"""``asyncapy send HOST:PORT JSON``: send packets to an AsyncAProto 22 server, print the replies.

One packet from the command line, or ``-``: one JSON object per line of stdin, all
sent on the same connection (one session), each reply printed on a line of its own,
in order, as soon as it arrives. It uses the bundled blocking
:class:`~asyncapy.client.Client`, with the same defaults: TLS on and verified
(``--no-tls`` for a plain-TCP server), 4-byte big-endian headers, JSON.

The decisions (docs/cli.md has the user's side):

* **A reply is printed as JSON** on stdout: indented on a terminal, one compact line
  otherwise (``--pretty``/``--no-pretty`` force either; with ``-`` it is one line per
  reply unless ``--pretty``). A ZiProto byte string becomes ``{"$bytes": "BASE64"}``;
  with ``--encoding ziproto`` the same form in the input is sent as a byte string.
* **An error reply is still a reply**: ``{"status": "failure", ...}`` is printed like
  any other, and the command exits 3 (after every line of ``-`` was sent), so a
  script can tell "the server said no" (3) from "no answer at all" (1).
* **Errors are one line** on stderr: 2 for bad flags or input (nothing is sent for a
  bad JSON argument; with ``-``, the lines before the bad one were sent and answered),
  1 for the network, TLS and the protocol (refused, timed out, no reply, a reply that
  is not AsyncAProto 22).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
from typing import Any, Iterator, Optional, Tuple

from ..client import Client, ProtocolViolation
from . import (
    EXIT_ERROR_REPLY,
    EXIT_OK,
    CommandError,
    HelpFormatter,
    UsageError,
    from_jsonable,
    parse_json,
    print_json,
)

__all__ = ["DEFAULT_TIMEOUT", "add_parser", "parse_address", "run", "is_failure"]

DEFAULT_TIMEOUT = 10.0
"""Seconds connecting may take, and then each whole reply (a deadline, not per read)."""

EXAMPLES = """\
examples:
  asyncapy send --no-tls 127.0.0.1:8081 '{"hello": "world"}'
  asyncapy send example.com:8081 '{"ping": 1}' --cafile ca.pem
  asyncapy send --no-tls [::1]:8081 '{"hello": "v6"}' --encoding ziproto
  printf '{"n": 1}\\n{"n": 2}\\n' | asyncapy send --no-tls localhost:8081 -

exit status: 0 every packet got a reply; 3 every packet got a reply and at least one
was {"status": "failure", ...}; 1 network, TLS or protocol failure (refused, timed
out, closed without replying, malformed reply); 2 bad flags or bad input.
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``send`` command to ``commands`` (an argparse sub-parsers action)."""
    send = commands.add_parser(
        "send",
        help="send packets to a server and print the replies",
        description="Send one packet (JSON), or one per line of stdin (-), on one connection "
        "to the AsyncAProto 22 server at HOST:PORT, and print each reply as JSON on stdout.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    send.add_argument(
        "address",
        metavar="HOST:PORT",
        help="where the server listens: 127.0.0.1:8081, localhost:8081, [::1]:8081",
    )
    send.add_argument(
        "payload",
        metavar="JSON",
        help="the packet's payload, a JSON object like '{\"hello\": \"world\"}'; or - to read "
        "one JSON object per line of stdin (blank lines skipped) and send each in turn",
    )
    send.add_argument(
        "--encoding",
        choices=("json", "ziproto"),
        default="json",
        help="Content-Encoding of the packets sent (default: %(default)s). With ziproto, "
        '{"$bytes": "BASE64"} in the payload is sent as a byte string. Replies are decoded '
        "by the encoding they declare",
    )
    send.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="connect with TLS, verifying the server's certificate and host name against "
        "the system's CAs or --cafile (default: TLS, as the bundled Client); --no-tls for "
        "a plain-TCP server",
    )
    send.add_argument(
        "--cafile",
        metavar="FILE",
        help="PEM file of the CA(s) that signed the server's certificate, instead of the "
        "system's (default: the system's CAs)",
    )
    send.add_argument(
        "--header-size",
        type=int,
        choices=(2, 4, 8),
        default=4,
        help="bytes of the Content-Length header; must match the server (default: %(default)s)",
    )
    send.add_argument(
        "--byteorder",
        choices=("big", "little"),
        default="big",
        help="byte order of the Content-Length header; must match the server "
        "(default: %(default)s)",
    )
    send.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds connecting (TLS handshake included) may take, and then each whole "
        "reply: a deadline, however slowly the reply trickles in (default: %(default)s)",
    )
    send.add_argument(
        "--pretty",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="indent the replies over several lines, or (--no-pretty) write each on one "
        "compact line (default: indented when stdout is a terminal and JSON is not -)",
    )
    send.set_defaults(command_function=run)
    return send


def parse_address(text: str) -> Tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``; an IPv6 address goes in brackets: ``[::1]:8081``.

    :raises UsageError: when ``text`` is not of that form or the port is not 1-65535.
    """
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or text[end + 1 : end + 2] != ":":
            raise UsageError(f"expected HOST:PORT like [::1]:8081, not {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise UsageError(f"expected HOST:PORT like 127.0.0.1:8081, not {text!r}")
        if ":" in host:
            raise UsageError(f"an IPv6 address goes in brackets: [{host}]:{port_text}, not {text!r}")
    if not host:
        raise UsageError(f"expected HOST:PORT with a host, not {text!r}")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise UsageError(f"the port must be a number from 1 to 65535, not {port_text!r} (in {text!r})")
    return host, int(port_text)


def is_failure(reply: Any) -> bool:
    """Whether ``reply`` is an error reply: a map whose ``status`` is ``"failure"``."""
    return isinstance(reply, dict) and reply.get("status") == "failure"


def _payload(text: str, what: str, encoding: str) -> dict:
    value = parse_json(text, what)
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object ({{...}}), not {type(value).__name__}")
    return from_jsonable(value) if encoding == "ziproto" else value


def _stdin_payloads(encoding: str) -> Iterator[dict]:
    for number, line in enumerate(sys.stdin, start=1):
        if line.strip():
            yield _payload(line, f"stdin line {number}", encoding)


def _tls_context(cafile: Optional[str]) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise UsageError(f"cannot load --cafile {cafile}: {reason}") from None


class _Session:
    """The client and what error messages need to know: where, and how."""

    def __init__(self, args: argparse.Namespace, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.args = args
        self.client = Client(
            byteorder=args.byteorder,
            header_size=args.header_size,
            tls=args.tls,
            encoding=args.encoding,
            timeout=args.timeout,
            ssl_context=_tls_context(args.cafile) if args.tls else None,
        )

    def connect(self) -> None:
        try:
            self.client.connect(self.host, self.port)
        except ssl.SSLCertVerificationError as exc:
            raise CommandError(
                f"TLS certificate verification failed for {self.where}: "
                f"{exc.verify_message or exc.reason}; pass --cafile FILE with the CA that "
                "signed the server's certificate"
            ) from None
        except ssl.SSLError as exc:
            raise CommandError(
                f"TLS handshake with {self.where} failed ({exc.reason or exc}); if the server "
                "speaks plain TCP, pass --no-tls"
            ) from None
        except ConnectionRefusedError:
            raise CommandError(f"cannot connect to {self.where}: connection refused (is the server running?)") from None
        except socket.gaierror as exc:
            raise CommandError(f"cannot resolve {self.host!r}: {exc.strerror}") from None
        except TimeoutError:
            raise CommandError(f"connecting to {self.where} timed out after {self.args.timeout:g}s") from None
        except ConnectionError:
            # Reset or closed during the TLS handshake: often a plain-TCP server.
            hint = "; if the server speaks plain TCP, pass --no-tls" if self.args.tls else ""
            raise CommandError(f"{self.where} closed the connection while connecting{hint}") from None
        except OSError as exc:
            raise CommandError(f"cannot connect to {self.where}: {exc.strerror or exc}") from None

    def request(self, payload: dict) -> Any:
        try:
            self.client.send(payload)
        except ssl.SSLError as exc:
            raise CommandError(f"TLS error sending to {self.where}: {exc.reason or exc}") from None
        except ValueError as exc:  # not encodable, or too large for --header-size
            raise UsageError(f"cannot send this payload: {exc}") from None
        except OSError as exc:
            raise CommandError(f"{self.where} closed the connection: {exc.strerror or exc}") from None
        try:
            return self.client.receive()
        except TimeoutError:
            raise CommandError(f"no reply from {self.where} within {self.args.timeout:g}s") from None
        except ProtocolViolation as exc:
            raise CommandError(f"malformed reply from {self.where}: {exc}") from None
        except ssl.SSLError as exc:
            raise CommandError(f"TLS error receiving from {self.where}: {exc.reason or exc}") from None
        except ConnectionError:  # closed (or reset) before a whole reply arrived
            hint = "; if the server speaks TLS, leave out --no-tls" if not self.args.tls else ""
            raise CommandError(f"{self.where} closed the connection without replying{hint}") from None
        except OSError as exc:
            raise CommandError(f"receiving from {self.where} failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.client.disconnect()


def run(args: argparse.Namespace) -> int:
    """Run ``asyncapy send`` with parsed ``args``; the exit status (errors raise
    :class:`~asyncapy.cli.CommandError`)."""
    host, port = parse_address(args.address)
    from_stdin = args.payload == "-"
    if not args.tls and args.cafile is not None:
        raise UsageError("--cafile is for TLS: leave out --no-tls, or drop --cafile")
    # A bad JSON argument is refused before anything is sent.
    payloads: Iterator[dict] = (
        _stdin_payloads(args.encoding) if from_stdin else iter([_payload(args.payload, "the JSON argument", args.encoding)])
    )
    pretty = args.pretty if args.pretty is not None else (sys.stdout.isatty() and not from_stdin)
    session = _Session(args, host, port)
    failures = 0
    try:
        session.connect()
        for payload in payloads:
            reply = session.request(payload)
            print_json(reply, pretty)
            failures += is_failure(reply)
    finally:
        session.close()
    return EXIT_ERROR_REPLY if failures else EXIT_OK
