"""The documentation builds, offline, with no warning: what `make docs` runs.

`mkdocs build --strict` (mkdocs.yml) fails on a link to a missing page or anchor, a
page of docs/ missing from the nav, a nav entry without its page, and a docstring the
API reference cannot parse (a documented parameter the signature lacks...). Building
here keeps the docs from rotting as the code and the pages change. It takes about two
seconds: mkdocstrings reads the sources statically and nothing is fetched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A proxy that refuses every connection: a plugin or theme that tries to fetch
# something at build time (an inventory, a font...) fails the build instead of
# quietly depending on the network.
_NO_NETWORK = "http://127.0.0.1:9"


def _build(site: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = _NO_NETWORK
    return subprocess.run(
        [
            sys.executable, "-m", "mkdocs", "build", "--strict",
            "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docs_build_strict_and_offline(tmp_path):
    site = tmp_path / "site"
    result = _build(site)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    assert "WARNING" not in output, output

    # Every page of docs/ was built (the nav lists them all, or --strict fails).
    pages = sorted(p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md"))
    assert pages, "no Markdown page under docs/"
    for page in pages:
        html = site / ("index.html" if page.name == "index.md" else page.with_suffix("") / "index.html")
        assert html.is_file(), f"{page} was not built ({html})"

    # The API reference was generated from the docstrings, not left empty.
    server_page = (site / "reference" / "server" / "index.html").read_text()
    assert 'id="asyncapy.server.Server"' in server_page
    assert 'id="asyncapy.server.Server.add_handler"' in server_page
    ports_page = (site / "reference" / "ports" / "index.html").read_text()
    assert 'id="domain.ports.KeyStore"' in ports_page

    # The site reads offline too: no script, stylesheet or font from another host.
    external = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""")
    for html in site.rglob("*.html"):
        match = external.search(html.read_text())
        assert match is None, f"{html.relative_to(site)} loads {match.group(0)!r}"
    for css in site.rglob("*.css"):
        text = css.read_text(errors="replace")
        assert not re.search(r"""(?:@import|url\()\s*["']?(?:https?:)?//""", text), css
