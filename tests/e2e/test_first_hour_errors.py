"""The first hour's mistakes, made again through the real command line: an app that
fails while importing is one line naming the file and line (the whole traceback with
``--traceback`` or ``--log-level DEBUG``); a bad setting raised while importing exits
2 like any bad setting; a config-file typo and a flag typo name the nearest valid one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def asyncapy(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncapy", *args],
        cwd=cwd, capture_output=True, text=True, timeout=30, check=False,
    )


def one_line(result: subprocess.CompletedProcess, status: int) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("asyncapy: "), lines[0]
    return lines[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "badapp.py").write_text(
        "from asyncapy import Server\n\nserver = Server(port=0)\nprint(undefined_name)\n"
    )
    (tmp_path / "cfgapp.py").write_text("from asyncapy import Server\n\nserver = Server(port=70000)\n")
    (tmp_path / "impapp.py").write_text("import os\nimport no_such_module_here\n")
    (tmp_path / "synapp.py").write_text("x = 1\ny = (\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "app.py").write_text("from pkg import helper\n")
    (tmp_path / "pkg" / "helper.py").write_text("\n\nraise RuntimeError('no database')\n")
    (tmp_path / "good.py").write_text("from asyncapy import Server\n\nserver = Server(port=0)\n")
    (tmp_path / "typo.ini").write_text("[AsyncAPY]\nprot = 9000\n")
    return tmp_path


def test_an_exception_while_importing_names_the_file_and_line(project):
    line = one_line(asyncapy(project, "run", "badapp:server"), 1)
    assert line == (
        "asyncapy: app: importing 'badapp' failed (badapp.py, line 4): NameError: name "
        "'undefined_name' is not defined; --traceback shows the whole traceback"
    )


def test_the_innermost_frame_of_the_users_code_is_named(project):
    line = one_line(asyncapy(project, "run", "pkg.app:server"), 1)
    assert "(pkg/helper.py, line 3): RuntimeError: no database" in line


def test_a_syntax_error_names_its_file_and_line_once(project):
    line = one_line(asyncapy(project, "run", "synapp:x"), 1)
    assert "(synapp.py, line 2): SyntaxError: '(' was never closed;" in line
    assert line.count("line 2") == 1


def test_a_missing_import_inside_the_app_is_a_usage_error_naming_the_line(project):
    line = one_line(asyncapy(project, "run", "impapp:x"), 2)
    assert "cannot import 'impapp' (impapp.py, line 2): No module named 'no_such_module_here'" in line
    # A module that does not exist at all has no line to name.
    line = one_line(asyncapy(project, "run", "nowhere:app"), 2)
    assert line == "asyncapy: app: cannot import 'nowhere': No module named 'nowhere'"


def test_a_bad_setting_while_importing_exits_2_like_any_bad_setting(project):
    line = one_line(asyncapy(project, "run", "cfgapp:server"), 2)
    assert "(cfgapp.py, line 3): invalid port: 70000; accepted: an integer from 0 to 65535" in line


@pytest.mark.parametrize("flag", [("--traceback",), ("--log-level", "DEBUG"), ("--log-level", "debug")])
def test_the_whole_traceback_behind_a_flag_or_at_debug(project, flag):
    result = asyncapy(project, "run", "badapp:server", *flag)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any('badapp.py", line 4, in <module>' in line for line in lines)
    assert lines[-2] == "NameError: name 'undefined_name' is not defined"
    assert lines[-1].startswith("asyncapy: app: importing 'badapp' failed (badapp.py, line 4)")
    assert "--traceback shows" not in lines[-1]


def test_a_config_file_typo_names_the_setting_meant(project):
    line = one_line(asyncapy(project, "run", "good:server", "--config", "typo.ini"), 2)
    assert "invalid prot in typo.ini" in line
    assert "did you mean 'port'?" in line
    assert "session_limit_ipv6_prefix" not in line  # not the list of every name


def test_a_config_key_like_nothing_lists_every_setting(project):
    (project / "odd.ini").write_text("[AsyncAPY]\nzqxwv = 1\n")
    line = one_line(asyncapy(project, "run", "good:server", "--config", "odd.ini"), 2)
    assert "did you mean" not in line and "one of addr, port," in line


@pytest.mark.parametrize(
    "args, meant",
    [
        (("run", "good:server", "--prot", "9000"), "--port"),
        (("run", "good:server", "--metrics-prot=9100"), "--metrics-port"),
        (("run", "good:server", "--log-levl", "DEBUG"), "--log-level"),
        (("send", "--no-tls", "127.0.0.1:9", "{}", "--timout", "3"), "--timeout"),
        (("keys", "get", "somekey", "--stroe", "redis://127.0.0.1:9/0"), "--store"),
    ],
)
def test_a_flag_typo_names_the_flag_meant(project, args, meant):
    result = asyncapy(project, *args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "unrecognized arguments: " in line and f"(did you mean '{meant}'?)" in line, line


def test_a_flag_of_another_command_is_not_suggested(project):
    # --pretty is a flag of send, not of run: it is never suggested to run.
    result = asyncapy(project, "run", "good:server", "--pretty")
    assert result.returncode == 2
    assert "--pretty" in result.stderr and "did you mean '--pretty'" not in result.stderr


def test_the_lines_the_docs_show_are_the_lines_printed(project):
    """docs/cli.md and docs/configuration.md quote these lines: they are exact."""
    root = Path(__file__).resolve().parents[2]
    cli = (root / "docs" / "cli.md").read_text()
    configuration = (root / "docs" / "configuration.md").read_text()
    (project / "app.ini").write_text("[AsyncAPY]\nprot = 9000\n")
    flag = one_line(asyncapy(project, "run", "good:server", "--prot", "9000"), 2)
    key = one_line(asyncapy(project, "run", "good:server", "--config", "app.ini"), 2)
    assert flag in cli.splitlines()
    assert key in cli.splitlines()
    assert key.removeprefix("asyncapy: ") in configuration.splitlines()
    (project / "myapp.py").write_text("from asyncapy import Server\n\nServer(port=sever)\n")
    imported = one_line(asyncapy(project, "run", "myapp:server"), 1)
    assert imported in cli.splitlines()
