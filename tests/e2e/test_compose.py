"""``docker-compose.yml`` and the ``Dockerfile``, checked without Docker.

Docker does not run where the tests run, so a compose file could rot unseen: a flag
renamed, an app moved. These tests read it and run the api service's command line
itself, as it is written, with only what must differ outside Docker substituted: the
host (loopback), the port (a free one) and the Redis URL (the test's redis-server).
It must serve with its workers and stop on SIGTERM with status 0, as ``docker stop``
expects.
"""

from __future__ import annotations

import re
import shlex
import sys

import pytest
import yaml

from .processes import ROOT, Running, ask, free_port


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml, parsed."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def api_command(compose: dict) -> list[str]:
    """The api service's command as an argument list (compose accepts a string too)."""
    command = compose["services"]["api"]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def option(command: list[str], name: str) -> str:
    """The value of ``--name VALUE`` in ``command``."""
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def test_the_api_service_is_built_here_and_waits_for_redis(compose):
    """The compose file wires what the command line needs: this image, a Redis it
    waits for, the Redis service's URL, several workers, the published port."""
    services = compose["services"]
    assert services["redis"]["image"] == "redis:7"
    api = services["api"]
    assert api["build"] in (".", {"context": "."})
    assert "redis" in api["depends_on"]
    command = api_command(compose)
    assert command[:2] == ["asyncapy", "run"]
    assert option(command, "--host") == "0.0.0.0"  # reachable through the published port
    assert int(option(command, "--workers")) > 1
    assert option(command, "--store").startswith("redis://redis:")  # the redis service
    published = [str(mapping).rsplit(":", 1)[-1] for mapping in api["ports"]]
    assert option(command, "--port") in published


def test_the_dockerfile_installs_the_package_from_python_3_11_slim():
    """The image holds what `asyncapy run examples.echo:app` imports."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    instructions = " ".join(line[:-1] if line.endswith("\\") else line + "\n" for line in lines).splitlines()
    instructions = [" ".join(line.split()) for line in instructions]
    assert instructions[0] == "FROM python:3.11-slim"
    # Installed from a folder apart from the working directory, then removed, so that
    # no source folder named asyncapy shadows the installed package at run time.
    assert any(re.match(r"RUN .*\bpip install /src( |$).*\brm -rf .*/src\b", line) for line in instructions)
    assert "/app" not in " ".join(line for line in instructions if line.startswith("COPY") and "examples" not in line)
    # The accelerator is compiled in the image (a compiler only for the build).
    assert any("gcc" in line and 'import asyncapy.domain._speedups' in line for line in instructions)
    # What `asyncapy run` needs to import is in the image: the packages and examples.
    copied = " ".join(line for line in instructions if line.startswith("COPY"))
    for needed in ("pyproject.toml", "setup.py", "README.md", "asyncapy", "domain", "adapters", "examples"):
        assert needed in copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    for kept_out in (".git", ".venv", "tests"):
        assert kept_out in ignored


def test_the_api_command_serves_with_its_workers_and_stops_on_sigterm(compose, redis_url):
    """The api service's very command line serves and stops as `docker stop` expects."""
    command = api_command(compose)
    port = free_port()
    local = {"--host": "127.0.0.1", "--port": str(port), "--store": redis_url}
    for name, value in local.items():
        command[command.index(name) + 1] = value
    # `asyncapy` is the console script; run the same entry point with this interpreter.
    assert command[0] == "asyncapy"
    with Running([sys.executable, "-m", "asyncapy", *command[1:]]) as run:
        workers = int(option(command, "--workers"))
        assert run.serving(workers) == port
        assert ask(port, {"hello": "compose"}) == {"hello": "compose"}
        assert run.stop() == 0, run.output
    assert f"127.0.0.1:{port} (plain TCP) with {workers} worker processes" in run.output
    assert "Traceback" not in run.output
