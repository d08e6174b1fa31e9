"""MkDocs hook: render the Sphinx roles of AsyncAPY's docstrings as plain code.

The docstrings are written for Sphinx (``:param x:`` fields, which mkdocstrings
parses with ``docstring_style: sphinx``, and cross-reference roles such as
``:class:`~asyncapy.domain.ports.KeyStore```). mkdocstrings leaves the roles alone, so on the
API reference pages they would show as ``:class:`` followed by the code. This hook
drops the role and keeps the name as code, as Sphinx shows it: a leading ``~`` keeps
the last component only, and functions and methods get ``()``. It also turns the
reStructuredText ``text::`` that introduces a code block into ``text:``.

It touches only the generated HTML of the pages under ``reference/``; nothing is
fetched and nothing in the Markdown sources changes.
"""

from __future__ import annotations

import re

_ROLE = re.compile(
    r":(?:py:)?(class|meth|func|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>"
)
_LITERAL_BLOCK_INTRO = re.compile(r"::</p>")


def _render(match: re.Match) -> str:
    role, short, target = match.groups()
    name = target.rsplit(".", 1)[-1] if short else target
    if role in ("meth", "func") and not name.endswith(")"):
        name += "()"
    return f"<code>{name}</code>"


def on_page_content(html: str, page, config, files) -> str:
    """Rewrite the roles of one API reference page (other pages are left as they are)."""
    if not page.file.src_uri.startswith("reference/"):
        return html
    html = _ROLE.sub(_render, html)
    return _LITERAL_BLOCK_INTRO.sub(":</p>", html)
