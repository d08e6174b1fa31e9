"""The documentation's commands and outputs are what the code does: docs that cannot drift.

What a reader copies from the README, ``docs/cli.md`` and the guides is run here, and
what it prints is compared with what the page shows:

- every Python example followed by a ``text`` block of its output (and needing no
  server) runs in a fresh directory and must print exactly that block;
- every ``console`` block of ``docs/cli.md`` (``$ command`` lines, each followed by
  its output) runs in one shell, with the virtual environment's ``bin`` first on
  ``PATH`` as the page tells the reader to have it, against a real server on a free
  port in place of ``127.0.0.1:8081``; fingerprints of random keys are the only
  thing compared loosely;
- code of ``adapters/sqlite.py`` quoted in the custom key store guide is the shipped
  code (compared as syntax trees, docstrings aside, which the guide leaves out);
- the start-up line the guides show is the one ``asyncapy run`` logs;
- the README's client example prints what the README says, against ``make run``'s
  echo server.

A page that changes its examples is checked as it is; an example that cannot run here
is listed in :data:`NOT_RUN` with the reason.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from asyncapy import Packet, Server
from asyncapy.adapters.sqlite import SQLiteKeyStore
from tests.conftest import serving

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
BIN = Path(sys.executable).parent

NOT_RUN = {
    "class UpsertingStore(SQLiteKeyStore):": "a fragment of the test file above it; its output is pytest's",
}
"""First lines of Python examples paired with an output that are not run, and why."""

NEEDS_A_SERVER = re.compile(r"\.connect\(|asyncapy_serve|open_test_client")


def fenced_blocks(page: Path) -> list[tuple[str, int, str, str]]:
    """``(language, line, body, what follows up to the next block)`` of each block."""
    text = page.read_text()
    matches = list(FENCE.finditer(text))
    blocks = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((match.group(1), line, match.group(2), text[match.end() : end]))
    return blocks


def python_examples() -> list:
    """``pytest.param(page, line, code, output, previous block)`` of every runnable pair."""
    params = []
    for page in PAGES:
        blocks = fenced_blocks(page)
        for index, (language, line, body, gap) in enumerate(blocks[:-1]):
            following = blocks[index + 1]
            if language != "python" or following[0] != "text" or gap.strip():
                continue
            first = body.strip().splitlines()[0]
            if first in NOT_RUN or NEEDS_A_SERVER.search(body):
                continue
            previous = blocks[index - 1] if index else None
            params.append(
                pytest.param(body, following[2], previous, id=f"{page.relative_to(ROOT)}:{line}")
            )
    return params


@pytest.mark.parametrize("code, output, previous", python_examples())
def test_python_examples_print_what_the_docs_show(tmp_path, code, output, previous):
    if previous is not None and previous[0] == "ini":
        # The INI file the page showed just before, under the name the code reads.
        name = re.search(r"[\w.-]+\.ini", code)
        assert name, "an example after an INI block should read it"
        (tmp_path / name.group(0)).write_text(previous[2])
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == output.strip()


def test_the_documented_examples_are_found():
    """The selection above is not empty by accident (a changed fence, a renamed page)."""
    ids = [param.id for param in python_examples()]
    assert len(ids) >= 10, ids
    assert any(i.startswith("docs/guide-custom-key-store.md") for i in ids), ids


# -- docs/cli.md's console blocks -------------------------------------------------------------
def console_blocks(page: Path) -> list:
    """``pytest.param([(command, expected output)...])`` of each ``console`` block."""
    params = []
    for language, line, body, _ in fenced_blocks(page):
        if language != "console":
            continue
        steps: list = []
        for text_line in body.splitlines():
            if text_line.startswith("$ "):
                steps.append([text_line[2:], []])
            else:
                assert steps, f"{page.name}:{line}: output before any command"
                steps[-1][1].append(text_line)
        params.append(pytest.param([(c, "\n".join(o)) for c, o in steps], id=f"{page.name}:{line}"))
    return params


_MARK = "@@@ docs-example step ended @@@"
_FINGERPRINT = re.compile(r"fingerprint [0-9a-f]{12}")


def _normalise(text: str) -> str:
    return _FINGERPRINT.sub("fingerprint <12 hex digits>", text).strip()


@pytest.mark.parametrize("steps", console_blocks(ROOT / "docs" / "cli.md"))
async def test_cli_console_examples_print_what_the_docs_show(tmp_path, steps):
    server = Server(addr="127.0.0.1", port=0, timeout=5)

    @server.add_handler(group=-1)
    async def boom(client, packet):
        if "boom" in packet:  # "a handler that raises", as the page says
            raise RuntimeError("boom")

    @server.add_handler()
    async def echo(client, packet):  # examples/echo.py's handler
        await client.send(packet)

    async with serving(server) as (host, port):
        script = []
        for command, _ in steps:
            command = command.replace("127.0.0.1:8081", f"{host}:{port}")
            # Each step's output ends with a mark; $? survives for the next step.
            script.append(f"{command}\n__status=$?; echo '{_MARK}'; (exit $__status)")
        env = {
            name: value for name, value in os.environ.items() if not name.startswith("ASYNCAPY_")
        }
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv, activated
        with trio.fail_after(120):
            result = await trio.run_process(
                ["bash", "-c", "\n".join(script)],
                cwd=tmp_path,
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
                env=env,
            )
    outputs = result.stdout.decode().split(_MARK + "\n")
    assert len(outputs) == len(steps) + 1, result.stdout.decode()
    for (command, expected), got in zip(steps, outputs):
        assert _normalise(got) == _normalise(expected), f"$ {command}"


# -- code quoted from the SQLite store ------------------------------------------------------------
def _without_docstring(function: ast.AST) -> str:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        function.body = body[1:]
    return ast.dump(function)


def test_code_the_custom_store_guide_quotes_is_the_shipped_code():
    quoted = [
        body
        for language, _, body, _ in fenced_blocks(ROOT / "docs" / "guide-custom-key-store.md")
        if language == "python" and re.match(r"(async )?def \w+\(self", body)
    ]
    assert len(quoted) >= 2, "the guide quotes update() and _run()"
    for body in quoted:
        snippet = ast.parse(textwrap.dedent(body)).body[0]
        method = getattr(SQLiteKeyStore, snippet.name)
        shipped = ast.parse(textwrap.dedent(inspect.getsource(method))).body[0]
        assert _without_docstring(snippet) == _without_docstring(shipped), (
            f"docs/guide-custom-key-store.md quotes SQLiteKeyStore.{snippet.name} as it no "
            f"longer is; the shipped code:\n{inspect.getsource(method)}"
        )


# -- the start-up line -------------------------------------------------------------------------
_TIMESTAMP = re.compile(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d [AP]M")


def test_the_start_up_line_is_the_one_the_guides_show():
    process = subprocess.Popen(
        [str(BIN / "asyncapy"), "run", "examples.echo:app", "--port", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        logged = process.stderr.readline().strip()
    finally:
        process.terminate()
        process.wait(10)
        process.stderr.close()
    port = re.search(r"127\.0\.0\.1:(\d+)", logged)
    assert port, logged
    actual = _TIMESTAMP.sub("<time>", logged).replace(port.group(0), "127.0.0.1:8081")
    shown = [
        line
        for line in (ROOT / "docs" / "guide-single-process.md").read_text().splitlines()
        if "AsyncAPY serving on" in line
    ]
    assert shown
    for line in shown:
        if line.startswith("[INFO]"):
            assert _TIMESTAMP.sub("<time>", line) == actual
        else:  # quoted in a sentence or a table: the message without its prefix
            message = re.search(r"`(AsyncAPY serving on [^`]*)`", line).group(1)
            assert actual.endswith(message), (message, actual)


# -- the README -----------------------------------------------------------------------------
async def test_the_readme_client_prints_what_the_readme_says_against_make_run():
    readme = (ROOT / "README.md").read_text()
    client_code = next(
        body for language, _, body, _ in fenced_blocks(ROOT / "README.md")
        if language == "python" and body.startswith("from asyncapy.client import Client")
    )
    promised = re.search(r"echo server of `make run` it prints the packet it sent, `([^`]*)`", readme)
    assert promised, "the README says what the client prints"
    from examples.echo import app  # what `make run` serves

    async with serving(app) as (host, port):  # a free port; restored afterwards
        code = client_code.replace("8081", str(port))
        result = await trio.run_process(
            [sys.executable, "-c", code], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == promised.group(1)


def test_the_first_commands_say_where_the_command_is():
    """After ``make run`` the command lives in ``.venv/bin``: the README and the CLI
    page say so before their first ``asyncapy`` command (no "command not found")."""
    for page in (ROOT / "README.md", ROOT / "docs" / "cli.md"):
        text = page.read_text()
        assert ".venv/bin/asyncapy" in text and ". .venv/bin/activate" in text, page.name
        first_command = min(text.find("```sh\nasyncapy"), text.find("$ asyncapy"), key=lambda i: i if i >= 0 else len(text))
        assert text.find(".venv/bin/asyncapy") < first_command, page.name
