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
    "where_it_failed",
    "suggest_flag",
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
_OPTIONS_OF_EXTRAS = "_asyncapy_options_of_extras"


def suggest_flag(unknown: Any, options: Any) -> str:
    """`` (did you mean '--port'?)`` for the first of ``unknown`` (command-line words)
    that is a flag close to one of ``options``; ``""`` when none is."""
    import difflib

    known = [option for option in options if option.startswith("--")]
    for word in unknown:
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if close:
                return f" (did you mean {close[0]!r}?)"
    return ""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, then exit status 2.

    argparse prints the usage, then the error; here the error comes alone, with a
    pointer to ``--help``. Hidden commands (names starting with ``_``) are left out of
    the "choose from" list of an unknown command.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """As argparse's; remembers the flags of the (sub)command that left arguments
        unrecognized, for :meth:`parse_args` to suggest the nearest."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(namespace, _OPTIONS_OF_EXTRAS):
            setattr(namespace, _OPTIONS_OF_EXTRAS, list(self._option_string_actions))
        return namespace, extras

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """As argparse's, but an unknown flag names the nearest known one of its
        command (``--prot``: did you mean '--port'?)."""
        namespace, extras = self.parse_known_args(args, namespace)
        options = getattr(namespace, _OPTIONS_OF_EXTRAS, [])
        if hasattr(namespace, _OPTIONS_OF_EXTRAS):
            delattr(namespace, _OPTIONS_OF_EXTRAS)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{suggest_flag(extras, options)}")
        return namespace

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: MESSAGE (see PROG --help)`` on stderr and exit 2."""
        match = _CHOICES.search(message)
        if match:
            shown = [c for c in (s.strip() for s in match.group(1).split(",")) if not c.strip("'").startswith("_")]
            message = message[: match.start()] + f"(choose from {', '.join(shown)})"
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def where_it_failed(exc: BaseException) -> str:
    """``myapp.py, line 3``: where in the user's code ``exc`` was raised (the file of
    a ``SyntaxError``, else the innermost traceback frame outside Python's import
    machinery and AsyncAPY itself), relative to the current directory when inside it;
    ``""`` if there is no such frame."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        filename, line = exc.filename, exc.lineno
    else:
        filename, line = "", 0
        ours = (
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
            os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep,
        )
        traceback = exc.__traceback__
        while traceback is not None:
            name = traceback.tb_frame.f_code.co_filename
            if not name.startswith("<") and not os.path.abspath(name).startswith(ours):
                filename, line = name, traceback.tb_lineno
            traceback = traceback.tb_next
        if not filename:
            return ""
    try:
        relative = os.path.relpath(filename)
        if not relative.startswith(os.pardir):
            filename = relative
    except ValueError:
        pass
    return f"{filename}, line {line}"


def import_object(spec: str, what: str, *, traceback: Optional[bool] = None) -> Any:
    """The object named ``MODULE:ATTR`` (the current directory importable too).

    ``what`` names it in errors (``"--store"``, ``"the app"``): :class:`UsageError` for
    a bad spec, a missing module or attribute, or a
    :class:`~asyncapy.config.ConfigError` (a bad setting) raised while importing;
    :class:`CommandError` when the module fails another way while importing. Those
    two name the file and line that raised (:func:`where_it_failed`); with
    ``traceback`` True the whole traceback is printed on stderr first, with False the
    line says that ``--traceback`` would (None: the command has no such flag). The messages
    quote ``spec`` through :func:`~asyncapy.domain.redaction.redact`: a mistyped
    store URL (``redis:/:PASSWORD@host``) reads as ``MODULE:ATTR`` too.
    """
    module_name, _, attr = spec.partition(":")
    shown = redact(spec)
    if not module_name or not attr:
        raise UsageError(f"{what}: expected MODULE:ATTR (like examples.echo:app), not {shown!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module failed while importing
        where = where_it_failed(exc)
        at = f" ({where})" if where else ""
        if traceback and where:
            import traceback as tracebacks

            tracebacks.print_exception(exc, file=sys.stderr)
        if isinstance(exc, ImportError):  # the module, or one it imports, is missing
            raise UsageError(f"{what}: cannot import {redact(module_name)!r}{at}: {redact(str(exc))}") from None
        if isinstance(exc, ConfigError):
            # Redacted already, and its "accepted" text holds URL forms (PASSWORD@HOST)
            # that redact() would take for credentials. A bad setting: status 2.
            raise UsageError(f"{what}: importing {redact(module_name)!r} failed{at}: {exc}") from None
        hint = "; --traceback shows the whole traceback" if traceback is False else ""
        detail = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
        raise CommandError(
            f"{what}: importing {redact(module_name)!r} failed{at}: "
            f"{type(exc).__name__}: {redact(detail)}{hint}"
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
