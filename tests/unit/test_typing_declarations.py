"""The declarations that type checkers read in place of what runs: they name every
setting, no more, no less.

``Settings`` is made by ``attrs.make_class`` from ``SETTINGS`` and the server's setting
attributes by ``_setting_property``, neither of which a type checker can follow; both
are spelled out under ``if TYPE_CHECKING:`` (asyncapy/config.py, asyncapy/server.py). A
setting added to ``SETTINGS`` without its declaration would be invisible (or an error)
to a user's type checker: this test says which one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import asyncapy
from asyncapy.config import SETTINGS
from asyncapy.server import Server

SOURCE = Path(asyncapy.__file__).parent


def _type_checking_block(body: list[ast.stmt]) -> list[ast.stmt]:
    (block,) = [
        node for node in body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    ]
    return block.body


def _declared(statements: list[ast.stmt]) -> list[str]:
    names = []
    for node in statements:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, ast.FunctionDef) and node.name not in names:
            names.append(node.name)  # a property and its setter: one name
    return names


def _class(tree: ast.Module | list[ast.stmt], name: str) -> ast.ClassDef:
    body = tree.body if isinstance(tree, ast.Module) else tree
    (found,) = [node for node in body if isinstance(node, ast.ClassDef) and node.name == name]
    return found


def test_settings_declares_every_setting_in_order():
    tree = ast.parse((SOURCE / "config.py").read_text())
    declared = _declared(_class(_type_checking_block(tree.body), "Settings").body)
    assert declared == list(SETTINGS)


def test_server_declares_every_setting_attribute():
    tree = ast.parse((SOURCE / "server.py").read_text())
    declared = _declared(_type_checking_block(_class(tree, "Server").body))
    # store and session_lease are real properties of their own, which checkers see.
    own = [name for name in SETTINGS if isinstance(vars(Server).get(name), property) and name not in declared]
    assert sorted(own) == ["session_lease", "store"]
    assert sorted(declared + own) == sorted(SETTINGS)
