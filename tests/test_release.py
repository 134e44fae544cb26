"""One version everywhere: the package, its installed metadata, the CLI, the changelog and the docs."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import lnfree_interp

ROOT = Path(__file__).resolve().parents[1]


def test_version_agrees_everywhere():
    version = lnfree_interp.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    # the installed metadata reads __version__ (pyproject: dynamic version; reinstall after a bump)
    assert importlib.metadata.version("lnfree_interp") == version
    res = subprocess.run(
        [sys.executable, "-m", "lnfree_interp.cli", "--version"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == f"lnfree-interp {version}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, flags=re.M)[0] == version  # newest entry first
    assert f"lnfree_interp {version}" in (ROOT / "docs" / "index.md").read_text()


def test_pyproject_takes_the_version_from_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'version = { attr = "lnfree_interp.__version__" }' in text
    assert not re.search(r'^version\s*=\s*"', text, flags=re.M)
