"""Check that the wheel (and the sdist) hold every file of the package: the embedded models, the held-out
text, ``py.typed``, every module. Usage: ``python .ci/check_wheel.py dist/*.whl dist/*.tar.gz``."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_files() -> set[str]:
    """Every file under lnfree_interp/ except bytecode caches, as ``lnfree_interp/...`` paths."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "lnfree_interp").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def main(paths: list[str]) -> int:
    expected = package_files()
    wheels = [p for p in paths if p.endswith(".whl")]
    sdists = [p for p in paths if p.endswith(".tar.gz")]
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist, got {paths}")
        return 1
    failed = False
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
    missing = sorted(expected - names)
    if missing:
        failed = True
        print(f"{wheels[0]} lacks {len(missing)} package file(s): {missing}")
    extra = sorted(n for n in names if not n.startswith(("lnfree_interp/", "lnfree_interp-")))
    if extra:
        failed = True
        print(f"{wheels[0]} holds files outside the package: {extra}")
    with tarfile.open(sdists[0]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        snames = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    need = expected | {"README.md", "CHANGELOG.md", "pyproject.toml"}
    missing = sorted(need - snames)
    if missing:
        failed = True
        print(f"{sdists[0]} lacks {len(missing)} file(s): {missing}")
    if not failed:
        print(f"wheel and sdist ({top}) hold all {len(expected)} package files")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
