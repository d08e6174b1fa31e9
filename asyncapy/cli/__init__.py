"""Building blocks of the ``asyncapy`` command line, shared by its commands.

The commands themselves are :mod:`asyncapy.cli.send` (``asyncapy send``) and
:mod:`asyncapy.cli.keys` (``asyncapy keys``); ``asyncapy run`` lives in
:mod:`asyncapy.__main__`, which builds the whole parser and is the entry point.

The rules every command keeps:

* **One line per error, never a traceback.** A command raises :class:`CommandError`
  (or :class:`UsageError`); the entry point prints ``PROG: MESSAGE`` on stderr and
  exits with the error's status. Even argparse's own errors are one line
  (:class:`OneLineParser`).
* **Exit statuses:** :data:`EXIT_OK` 0, :data:`EXIT_FAILURE` 1 (network, protocol,
  store), :data:`EXIT_USAGE` 2 (bad flags or input), :data:`EXIT_ERROR_REPLY` 3
  (``asyncapy send`` got a ``{"status": "failure"}`` reply).
* **JSON on stdout**, one document per line when piped, indented on a terminal
  (:func:`print_json`); values JSON cannot hold are made representable
  (:func:`jsonable`).
"""

from __future__ import annotations

import argparse
import base64
import codecs
import importlib
import json
import os
import re
import sys
from typing import Any, NoReturn, Optional, TextIO

from asyncapy.domain.redaction import redact

from ..config import ConfigError

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_ERROR_REPLY",
    "CommandError",
    "UsageError",
    "import_object",
    "OneLineParser",
    "HelpFormatter",
    "jsonable",
    "from_jsonable",
    "print_json",
    "parse_json",
    "escape_unsafe",
]

EXIT_OK = 0
"""Success."""
EXIT_FAILURE = 1
"""A network, TLS, protocol or store failure, or a missing API key."""
EXIT_USAGE = 2
"""Bad command line or bad input (argparse uses 2 too)."""
EXIT_ERROR_REPLY = 3
"""``asyncapy send``: every packet got a reply, and at least one was ``{"status": "failure", ...}``."""

BYTES_KEY = "$bytes"
"""The key of the one-entry map that stands for a byte string: ``{"$bytes": BASE64}``."""


class CommandError(Exception):
    """A command failed: the entry point prints ``PROG: message`` and exits with ``status``.

    :param message: one line saying what went wrong and, when it helps, what to do;
        ``None`` to print nothing (stdout closed under us, say).
    :param status: the exit status (default :data:`EXIT_FAILURE`).
    """

    def __init__(self, message: Optional[str], status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UsageError(CommandError):
    """Bad flags or bad input: exit status :data:`EXIT_USAGE` (2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions; keeps text with line breaks (the examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


_CHOICES = re.compile(r"\(choose from (.*)\)$")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, then exit status 2.

    argparse prints the usage, then the error; here the error comes alone, with a
    pointer to ``--help``. Hidden commands (names starting with ``_``) are left out of
    the "choose from" list of an unknown command.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: MESSAGE (see PROG --help)`` on stderr and exit 2."""
        match = _CHOICES.search(message)
        if match:
            shown = [c for c in (s.strip() for s in match.group(1).split(",")) if not c.strip("'").startswith("_")]
            message = message[: match.start()] + f"(choose from {', '.join(shown)})"
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def import_object(spec: str, what: str) -> Any:
    """The object named ``MODULE:ATTR`` (the current directory importable too).

    ``what`` names it in errors (``"--store"``, ``"the app"``): :class:`UsageError` for
    a bad spec, a missing module or attribute; :class:`CommandError` when the module
    itself fails while importing. The messages quote ``spec`` through
    :func:`~asyncapy.domain.redaction.redact`: a mistyped store URL (``redis:/:PASSWORD@host``)
    reads as ``MODULE:ATTR`` too.
    """
    module_name, _, attr = spec.partition(":")
    shown = redact(spec)
    if not module_name or not attr:
        raise UsageError(f"{what}: expected MODULE:ATTR (like examples.echo:app), not {shown!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what}: cannot import {redact(module_name)!r}: {redact(str(exc))}") from None
    except Exception as exc:  # the user's module failed while importing
        # A ConfigError is redacted already, and its "accepted" text holds URL forms
        # (PASSWORD@HOST) that redact() would take for credentials.
        detail = str(exc) if isinstance(exc, ConfigError) else redact(str(exc))
        raise CommandError(
            f"{what}: importing {redact(module_name)!r} failed: {type(exc).__name__}: {detail}"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UsageError(f"{what}: module {module_name!r} has no attribute {shown.partition(':')[2]!r}") from None


def jsonable(value: Any) -> Any:
    """``value`` (a decoded reply) with everything JSON cannot hold made representable.

    * a byte string (ZiProto ``bin``) becomes ``{"$bytes": "BASE64"}`` (standard
      base64, padded);
    * a map key that is not a string becomes its JSON text: ``1`` -> ``"1"``,
      ``true`` -> ``"true"``, ``b"\\x00"`` -> ``'{"$bytes":"AA=="}'``;
    * tuples become lists. Everything else is left as it is.
    """
    kind = type(value)
    if kind is dict:
        return {_key_text(key): jsonable(item) for key, item in value.items()}
    if kind in (list, tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    return value


def _key_text(key: Any) -> str:
    if type(key) is str:
        return key
    return json.dumps(jsonable(key), separators=(",", ":"))


def from_jsonable(value: Any) -> Any:
    """The inverse of :func:`jsonable` for values: ``{"$bytes": "BASE64"}`` -> bytes.

    Only a map whose one key is ``"$bytes"`` is converted; its value must be valid
    base64, or :class:`UsageError` is raised. Used for ZiProto payloads, which can
    carry byte strings; JSON payloads are sent as they are written.
    """
    kind = type(value)
    if kind is dict:
        if len(value) == 1 and BYTES_KEY in value:
            text = value[BYTES_KEY]
            try:
                if not isinstance(text, str):
                    raise ValueError(text)
                return base64.b64decode(text.encode("ascii"), validate=True)
            except ValueError:
                raise UsageError(f'{{"{BYTES_KEY}": ...}} must hold a base64 string, not {text!r}') from None
        return {key: from_jsonable(item) for key, item in value.items()}
    if kind is list:
        return [from_jsonable(item) for item in value]
    return value


def parse_json(text: str, what: str) -> Any:
    """``text`` parsed as JSON; :class:`UsageError` naming ``what`` if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply") from None


_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
"""What a terminal must never get raw from a server: C0 and C1 controls (U+009B is a
CSI, U+0085 a line break), DEL, the line and paragraph separators, and the bidirectional
marks, embeddings, overrides and isolates (U+202E turns the rest of a line around)."""


def escape_unsafe(text: str) -> str:
    """``text`` with every control and bidirectional formatting character written as a
    ``\\uXXXX`` escape (valid inside a JSON string, and plain ASCII on a terminal)."""
    return _UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _ascii_only(stream: TextIO) -> bool:
    """Whether ``stream`` needs non-ASCII characters escaped (it does not speak UTF-8)."""
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name != "utf-8"
    except LookupError:
        return True


def print_json(value: Any, pretty: bool, stream: Optional[TextIO] = None) -> None:
    """Write ``value`` (after :func:`jsonable`) as JSON on ``stream`` (stdout), and flush.

    ``pretty``: indented by 2, over several lines; otherwise one compact line.
    Non-ASCII characters are written as they are on a UTF-8 stream, escaped otherwise;
    control and bidirectional formatting characters are always escaped
    (:func:`escape_unsafe`), so a reply cannot drive the terminal or reorder what it shows.
    If the reader went away (``| head -1``), :class:`CommandError` with no message.
    """
    stream = sys.stdout if stream is None else stream
    try:
        text = json.dumps(
            jsonable(value),
            indent=2 if pretty else None,
            separators=None if pretty else (",", ":"),
            ensure_ascii=_ascii_only(stream),
        )
    except RecursionError:
        raise CommandError("the value is nested too deeply to print") from None
    # Outside strings JSON is plain ASCII, and json.dumps escapes C0 controls inside
    # them: the only raw line breaks are the indentation's, kept; only strings change.
    text = "\n".join(escape_unsafe(line) for line in text.split("\n"))
    try:
        stream.write(text + "\n")
        stream.flush()
    except BrokenPipeError:
        # Nobody reads any more: quietly stop, and keep Python from complaining about
        # the unflushable stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        raise CommandError(None) from None
