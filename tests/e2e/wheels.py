"""The wheel a user's ``pip install`` builds, and a fresh virtual environment with it
installed: shared by tests/e2e/test_wheel.py (the import name, running the server) and
tests/e2e/test_typing.py (a user's type checker against the installed package).

The fresh environment borrows the test environment's third-party packages (trio,
msgspec, mypy...) through a ``.pth`` line instead of downloading them again; that
directory holds no ``asyncapy`` of its own (the editable install lives in the
repository and is found only through a hook that a plain path line does not run).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from tests.e2e.processes import ROOT


def build_wheel(out: Path) -> Path:
    """Build the repository's wheel into ``out`` as ``pip install`` would; its path."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("asyncapy-*.whl")
    return path


def install_in_fresh_env(wheel: Path, env_dir: Path) -> tuple[Path, Path]:
    """A new virtual environment in ``env_dir`` with ``wheel`` installed and the test
    environment's dependencies borrowed: its ``python`` and its site-packages."""
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The test environment's dependencies, without its editable asyncapy.
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)  # what pip does with a pure install of the wheel's files
    return python, site
