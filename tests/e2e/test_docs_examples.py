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
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from asyncapy import Server
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


# -- every Python block names only what it defines or imports -------------------------------------
def _unbound_names(code: str) -> set:
    """Names ``code`` reads that it never binds (assigns, imports, defines) and that are
    not builtins: what would be a ``NameError`` for a reader who copies the block."""
    import builtins
    import symtable

    top = symtable.symtable(code, "<docs>", "exec")
    bound = {
        symbol.get_name()
        for symbol in top.get_symbols()
        if symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace()
    }
    unbound: set = set()

    def walk(table: symtable.SymbolTable) -> None:
        for symbol in table.get_symbols():
            free_at_top = table is top and not (symbol.is_assigned() or symbol.is_imported())
            if symbol.is_referenced() and (symbol.is_global() or free_at_top):
                name = symbol.get_name()
                if name not in bound and not hasattr(builtins, name):
                    unbound.add(name)
        for child in table.get_children():
            walk(child)

    walk(top)
    return unbound


def _quotes_shipped_code(body: str) -> bool:
    """A method quoted from adapters/sqlite.py (compared with the shipped code above)."""
    return re.match(r"(async )?def \w+\(self", body) is not None


def python_blocks() -> list:
    """``pytest.param(code, context)`` of every Python block of every page; ``context``
    is the page's previous Python block for a block that continues it (a ``(continued)``
    comment, or a fragment of :data:`NOT_RUN`), else ``""``."""
    params = []
    for page in PAGES:
        previous = ""
        for language, line, body, _ in fenced_blocks(page):
            if language != "python":
                continue
            first = body.strip().splitlines()[0]
            continues = "(continued)" in first or first in NOT_RUN
            if not _quotes_shipped_code(body):
                params.append(
                    pytest.param(body, previous if continues else "", id=f"{page.relative_to(ROOT)}:{line}")
                )
            previous = body
    return params


@pytest.mark.parametrize("code, context", python_blocks())
def test_every_python_block_imports_what_it_uses(code, context):
    """A snippet using a name it never imports (``SQLiteKeyStore``, ``trio``) fails
    for whoever copies it: every block binds what it reads, or continues the block
    before it and says so."""
    unbound = _unbound_names(f"{context}\n{code}" if context else code)
    assert not unbound, f"used but never imported or defined: {sorted(unbound)}"


def test_the_name_check_catches_a_missing_import():
    assert _unbound_names("keys = CachedKeyStore(SQLiteKeyStore('keys.db'))") == {
        "CachedKeyStore",
        "SQLiteKeyStore",
    }
    assert _unbound_names("async def main():\n    async with trio.open_nursery():\n        pass\n") == {"trio"}
    assert _unbound_names("import trio\nx = [trio for _ in range(2)]\ndef f(a):\n    return a, x\n") == set()


# -- blocks with no output shown: they run, or they serve -------------------------------------------
RUN_PAGES = [
    ROOT / "docs" / name
    for name in (
        "operations.md",
        "guide-custom-key-store.md",
        "guide-single-process.md",
        "migrating-from-0.5.md",
        "configuration.md",
        "client.md",
        "guide-scaling-out.md",
    )
]
"""The pages whose every Python block is run (or served), output shown or not."""

NOT_RUN_ALONE = {
    "import pytest": "a pytest file importing the reader's own sqlite_keystore module; its run is the text block after it",
    "async def handler(client, packet): ...": "the shape of a handler, not a program",
}
"""First lines of blocks of :data:`RUN_PAGES` that are not run, and why."""

_SERVING = re.compile(r"\bserver\.start\(\)|\.start\(\)\s*$", re.M)


def blocks_without_output() -> list:
    params = []
    for page in RUN_PAGES:
        blocks = fenced_blocks(page)
        for index, (language, line, body, gap) in enumerate(blocks):
            if language != "python" or _quotes_shipped_code(body):
                continue
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            if following is not None and following[0] == "text" and not gap.strip():
                continue  # run and compared by test_python_examples_print_what_the_docs_show
            first = body.strip().splitlines()[0]
            if first in NOT_RUN_ALONE or first in NOT_RUN:
                continue
            params.append(pytest.param(body, id=f"{page.relative_to(ROOT)}:{line}"))
    return params


def test_blocks_without_output_are_found():
    ids = [param.id for param in blocks_without_output()]
    assert any(i.startswith("docs/operations.md") for i in ids), ids
    assert any(i.startswith("docs/migrating-from-0.5.md") for i in ids), ids
    assert sum(i.startswith("docs/guide-single-process.md") for i in ids) >= 8, ids


@pytest.mark.parametrize("code", blocks_without_output())
def test_python_blocks_without_output_run_or_serve(tmp_path, tls_files, code):
    """A block that ends in ``server.start()`` must start serving (on a free port
    instead of 8081; TLS files and a clients' CA are in its directory) and stop with
    status 0 on SIGTERM; any other block must run to completion with status 0."""
    import shutil
    import signal

    shutil.copy(tls_files["cafile"], tmp_path / "clients-ca.pem")  # server.pem, server.key are there
    serving = _SERVING.search(code) is not None
    program = code.replace("port=8081", "port=0").replace('"127.0.0.1", 8081', '"127.0.0.1", 0')
    if serving:
        program = program.replace('if __name__ == "__main__":', "if True:")
    process = subprocess.Popen(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        if serving:
            first = process.stderr.readline()
            assert "AsyncAPY serving on" in first, first + process.stderr.read()
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err


# -- the migration page: its 0.5 app serves its 0.5 client -------------------------------------------
def test_the_05_app_of_the_migration_page_serves_its_05_client(tmp_path):
    page = ROOT / "docs" / "migrating-from-0.5.md"
    blocks = fenced_blocks(page)
    (app,) = [body for language, _, body, _ in blocks if language == "python" and "# app05.py" in body]
    (index,) = [i for i, block in enumerate(blocks) if block[0] == "python" and "Client(" in block[2] and ".connect(" in block[2]]
    client, shown = blocks[index][2], blocks[index + 1]
    assert shown[0] == "text"
    (tmp_path / "app05.py").write_text(app)
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncapy", "run", "app05:server", "--port", "0"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        logged = process.stderr.readline()
        port = re.search(r"serving on 127\.0\.0\.1:(\d+)", logged)
        assert port, logged
        result = subprocess.run(
            [sys.executable, "-c", client.replace("8081", port.group(1))],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )
    finally:
        process.terminate()
        process.wait(10)
        process.stderr.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shown[2].strip()
    # And `python app05.py`, as the page says, serves too.
    program = app.replace("8081", "0")
    started = subprocess.Popen(
        [sys.executable, "-c", program], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert "AsyncAPY serving on" in started.stderr.readline()
    finally:
        started.terminate()
        started.wait(10)
        started.stderr.close()


# -- the local Sentinel recipe of the scaling-out guide -----------------------------------------------
def _sh_blocks_under(page: Path, heading: str) -> list[str]:
    """The ``sh`` blocks of ``page`` between ``heading`` and the next heading of its level."""
    text = page.read_text()
    start = text.index(heading)
    level = heading.split(" ")[0]
    end = text.find(f"\n{level} ", start + len(heading))
    section = text[start : end if end >= 0 else len(text)]
    return [m.group(2) for m in FENCE.finditer(section) if m.group(1) == "sh"]


def test_the_local_sentinel_recipe_serves_and_follows_a_failover(tmp_path):
    """The five commands, as written but on free ports (a redis-server already on 6379
    must not be touched): a master, a replica, a sentinel, and ``asyncapy run`` on
    them; then the failover commands of the page, and the server still answers."""
    import time

    from tests.real_parts import free_ports, require

    require("redis-server")
    require("redis-cli")
    page = ROOT / "docs" / "guide-scaling-out.md"
    start, failover = _sh_blocks_under(page, "### A local Sentinel set-up in five commands")
    commands = [line for line in start.splitlines() if line.strip()]
    assert len(commands) == 5, commands
    master, replica, sentinel, api = free_ports(4)

    def ported(line: str) -> str:
        line = line.replace("26379", str(sentinel)).replace("6380", str(replica)).replace("6379", str(master))
        return line.replace("127.0.0.1:8081", f"127.0.0.1:{api}")

    env = {name: value for name, value in os.environ.items() if not name.startswith("ASYNCAPY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    server = None
    try:
        setup = subprocess.run(
            ["bash", "-e", "-c", "\n".join(ported(line) for line in commands[:4])],
            cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env,
        )
        assert setup.returncode == 0, setup.stderr
        run = ported(commands[4]).split()
        assert run[:2] == ["asyncapy", "run"], run
        server = subprocess.Popen(
            [str(BIN / "asyncapy"), *run[1:], "--port", str(api)],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env,
        )
        logged = server.stderr.readline()
        assert f"RedisSessionStore(redis+sentinel://127.0.0.1:{sentinel}/mymaster/0, lease=30s)" in logged, logged
        # The page's failover commands, from "another terminal".
        ask, where, send = [ported(line.split("#")[0].strip()) for line in failover.splitlines() if line.strip()]
        deadline = time.monotonic() + 30
        while True:  # the sentinel needs a moment to learn of the replica
            result = subprocess.run(["bash", "-c", ask], capture_output=True, text=True, env=env)
            if result.stdout.strip() == "OK" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert result.stdout.strip() == "OK", result.stdout + result.stderr
        while True:
            master_now = subprocess.run(["bash", "-c", where], capture_output=True, text=True, env=env).stdout.split()
            if master_now[-1:] == [str(replica)] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert master_now == ["127.0.0.1", str(replica)], master_now
        while True:  # the first call after the switch may still meet the old master
            answered = subprocess.run(["bash", "-c", send], capture_output=True, text=True, env=env, timeout=30)
            if answered.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout) == {"still": "served"}
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
            server.stderr.close()
        # The page's stop line, on these ports.
        text = page.read_text()
        stop = re.search(r"`(redis-cli -p 26379 shutdown;[^`]*)`", text).group(1)
        subprocess.run(["bash", "-c", ported(stop)], capture_output=True, timeout=30, env=env)
    assert server.returncode == 0
