"""The built wheel claims one import name, ``asyncapy``, and serves beside a user project
that has packages of its own named ``domain`` and ``adapters``.

The repository keeps the layers as top-level folders; pyproject.toml installs two of
them under ``asyncapy`` (``asyncapy.domain``, ``asyncapy.adapters``). The editable
install of ``make test`` cannot show that a regular install gets it right, so this test
builds the wheel the way a user's ``pip install`` does, installs it into a fresh
virtual environment and runs ``asyncapy run`` there, from a project directory whose own
``domain`` and ``adapters`` packages the application imports.

The wheel and the fresh environment come from tests/e2e/wheels.py.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.e2e.processes import Running, ask
from tests.e2e.wheels import build_wheel, install_in_fresh_env

SERVING_ONE = re.compile(r"AsyncAPY serving on 127\.0\.0\.1:(\d+)")

USER_APP = '''
"""A user's project: its own domain and adapters packages, and an AsyncAPY server."""
import domain
import adapters
from asyncapy import Server, Client, Packet

server = Server(addr="127.0.0.1", port=0)

@server.add_handler()
async def echo(client: Client, packet: Packet):
    await client.send(Packet({"domain": domain.NAME, "adapters": adapters.NAME}, encoding=client.encoding))
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_asyncapy_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"asyncapy"}
    assert "asyncapy/domain/connection.py" in names
    assert "asyncapy/adapters/redis.py" in names
    # PEP 561's marker: a user's type checker reads the annotations of the whole package.
    assert "asyncapy/py.typed" in names
    # The accelerator is built under its installed name (a C compiler is on this machine).
    assert any(n.startswith("asyncapy/domain/_speedups.") and n.endswith(".so") for n in names)


def test_installed_beside_a_project_with_its_own_domain_and_adapters(wheel, tmp_path):
    python, site = install_in_fresh_env(wheel, tmp_path / "env")

    project = tmp_path / "project"
    for package in ("domain", "adapters"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"NAME = 'the user project\\'s {package}'\n")
    (project / "app.py").write_text(USER_APP)

    where = subprocess.run(
        [str(python), "-c", textwrap.dedent("""
            import sys, asyncapy, asyncapy.domain.codecs, domain
            assert "trio" not in sys.modules, "the core imported trio"
            print(asyncapy.__file__); print(asyncapy.domain.codecs.__file__); print(domain.__file__)
        """)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    package_file, codecs_file, user_domain = where.stdout.split()
    assert package_file.startswith(str(site)) and codecs_file.startswith(str(site))
    assert user_domain == str(project / "domain" / "__init__.py")

    with Running([str(python), "-m", "asyncapy", "run", "app:server"], cwd=project) as run:
        port = int(run.wait_for(SERVING_ONE, timeout=20)[0].group(1))
        assert ask(port, {"hello": 1}) == {
            "domain": "the user project's domain",
            "adapters": "the user project's adapters",
        }
        assert run.stop() == 0, run.output
