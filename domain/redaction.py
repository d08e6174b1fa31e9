"""Credentials out of messages: :func:`redact`, the one function every error path uses.

A store URL may carry a password (``redis://:PASSWORD@host:6379/0``, or
``?password=...``), and so may any text that quotes one: a value that failed
validation, a line of a file that is not the INI file it was taken for, a library's
exception. Whatever reaches an exception message, a log line or the terminal goes
through :func:`redact` first.

It is deliberately blunt, because it must also work on what cannot be parsed: a URL
with an unencoded ``/``, ``?`` or ``#`` in its password, a mistyped scheme, a stray
space. Where a parser would draw the line between credentials and host is exactly
what a malformed value makes uncertain, so the mask errs towards hiding too much:

* in a URL (``SCHEME://`` or ``SCHEME:``), everything between the scheme and the
  **last** ``@`` of the line is user information: ``redis://alice:***@host:6379/0``
  (the user name is kept when it is plainly one), ``redis://***@host`` when there is
  no ``:`` in it;
* with no scheme left, in ``USER:PASSWORD@HOST`` (one word), what is between the
  colon and the ``@``;
* in a URL with no ``@``, what follows a colon of the host part is shown only if it
  is a port number: ``redis://:***`` (a password whose ``@`` and host were left out);
* ``NAME=VALUE`` and ``NAME: VALUE`` where the name says password, secret or token
  (``password=``, ``ssl_password=``, ``API_TOKEN=``, ``secret_key:``...) lose the
  value: that covers URL query parameters and ``.env``-style lines alike.

Pure string work, with no knowledge of any protocol: the core, the adapters and the
public package all share it.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact", "redact_url", "looks_secret"]

MASK = "***"
"""What a hidden credential is replaced by."""

# A scheme (RFC 3986: a letter, then letters, digits, + - .) and its colon. "://" is
# looked for first; a bare "SCHEME:" (a mistyped "redis:/:pw@host") only when the
# colon is followed by something that cannot start a port number or a sentence.
_FULL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_BARE_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*:(?=[^\s\d])")

_SECRET_WORDS = r"pass(?:word|wd)?|pwd|secret|token|api[_-]?key"
_SECRET_NAME = re.compile(rf"(?:{_SECRET_WORDS})", re.IGNORECASE)
_SECRET_PAIR = re.compile(
    rf"(?P<name>\b[\w.\-]*(?:{_SECRET_WORDS})[\w.\-]*)(?P<sep>\s*[=:]\s*)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s&;,'\"]+)",
    re.IGNORECASE,
)
_PLAIN_USER = re.compile(r"[\w.\-+%]*")


def looks_secret(name: str) -> bool:
    """Whether a setting or parameter named ``name`` (``password``, ``API_TOKEN``...)
    holds a secret, so that its value is never shown at all."""
    return bool(_SECRET_NAME.search(name))


def _mask_userinfo(line: str) -> str:
    at = line.rfind("@")
    if at < 0:
        return line
    match = _FULL_SCHEME.search(line, 0, at) or _BARE_SCHEME.search(line, 0, at)
    if match is None:
        # No scheme: "USER:PASSWORD@HOST" with the scheme lost; within the word only,
        # so that "error: mail bob@example.com" keeps its meaning.
        word = max(line.rfind(blank, 0, at) for blank in " \t") + 1
        colon = line.find(":", word, at)
        if colon < 0 or line[colon + 1 : at] in ("", MASK):
            return line
        return line[: colon + 1] + MASK + line[at:]
    start = match.end()
    while start < at and line[start] == "/":
        start += 1
    userinfo = line[start:at]
    if not userinfo or userinfo == MASK or userinfo.endswith(":" + MASK):
        return line
    user, separator, _ = userinfo.partition(":")
    if separator and _PLAIN_USER.fullmatch(user):
        masked = f"{user}:{MASK}"
    else:
        masked = MASK
    return line[:start] + masked + line[at:]


_AUTHORITY_END = re.compile(r"[/?#\s'\"<>]")


def _mask_odd_port(line: str) -> str:
    """``redis://:hunter2`` (no ``@``, no host): what follows a colon of the authority
    is a port only if it is a number; anything else may be a password whose ``@`` and
    host were forgotten."""
    pieces = []
    position = 0
    for match in _FULL_SCHEME.finditer(line):
        start = match.end()
        end_match = _AUTHORITY_END.search(line, start)
        end = end_match.start() if end_match else len(line)
        authority = line[start:end]
        if "@" in authority:
            continue
        host_end = authority.find("]") + 1 if authority.startswith("[") else 0
        colon = authority.find(":", host_end)
        if colon < 0 or authority[colon + 1 :].isdigit() or authority[colon + 1 :] in ("", MASK):
            continue
        pieces.append(line[position : start + colon + 1])
        pieces.append(MASK)
        position = end
    return "".join(pieces) + line[position:] if pieces else line


def _mask_pair(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[0] in "'\"" else ""  # a quoted value keeps its quotes
    return f"{match.group('name')}{match.group('sep')}{quote}{MASK}{quote}"


def redact(text: str) -> str:
    """``text`` with every credential it may hold replaced by :data:`MASK`.

    ``redis://:hunter2@10.0.0.5:6379/0`` -> ``redis://:***@10.0.0.5:6379/0``;
    ``unix:///run/redis.sock?db=1&password=hunter2`` -> ``unix:///run/redis.sock?db=1&password=***``;
    ``REDIS_PASSWORD=hunter2`` -> ``REDIS_PASSWORD=***``. Text without credentials
    comes back unchanged (the very same object), so callers may compare with ``is``.
    Works line by line: a URL's user information never extends past its line.
    """
    if not isinstance(text, str):
        raise TypeError(f"redact() takes a str, not {type(text).__name__}")
    if "@" not in text and "://" not in text and not _SECRET_NAME.search(text):
        return text  # the common case, without a regex pass per line
    lines = text.split("\n")
    result = "\n".join(_SECRET_PAIR.sub(_mask_pair, _mask_odd_port(_mask_userinfo(line))) for line in lines)
    return text if result == text else result


_LEADING_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*:/*")


def redact_url(value: str) -> str:
    """:func:`redact` for a value known to be meant as a URL (a ``store`` setting).

    :func:`redact` must keep prose readable, so with no scheme it takes only the word
    before an ``@`` for credentials (``error: mail bob@example.com`` stays as it is).
    A value that is meant to be a URL has no prose in it: everything before its last
    ``@`` (after the scheme, when there is one) is user information, blanks and all,
    so ``:Pw Pw@127.0.0.1`` (a scheme forgotten, a password with a space) becomes
    ``***@127.0.0.1``.
    """
    text = redact(value)
    at = text.rfind("@")
    if at < 0:
        return text
    scheme = _LEADING_SCHEME.match(text, 0, at)
    start = scheme.end() if scheme else 0
    userinfo = text[start:at]
    if userinfo == MASK or (userinfo.endswith(":" + MASK) and _PLAIN_USER.fullmatch(userinfo[: -len(MASK) - 1])):
        return text
    return text[:start] + MASK + text[at:]
