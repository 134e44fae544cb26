"""Execute examples/quickstart.ipynb in place, so that it is stored with its outputs.

The notebook is kept executed: its figures are static PNG outputs (matplotlib), so they render on GitHub
and in static viewers. Run after changing the notebook or the library's figures:

    HF_HUB_OFFLINE=1 python scripts/run_notebook.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def main() -> int:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    for cell in nb.cells:  # no run-specific noise in the stored file
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, NOTEBOOK)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    print(f"executed {NOTEBOOK} ({images} PNG figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
