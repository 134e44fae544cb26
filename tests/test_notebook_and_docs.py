"""The quickstart notebook executes end to end; the docs build with --strict; both as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_is_stored_without_outputs():
    nb = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_quickstart_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Comparison(" in outputs and "NMAE" in outputs
    # the headline: DLA vs direct effect ~0 % LN-free (float64), > 1 % with LayerNorm, as the library computes it
    import re

    import torch

    import lnfree_interp as L
    from lnfree_interp.demo import heldout_prompts

    shown = [float(x) for x in re.findall(r"NMAE\s+([-+0-9.e]+)\s*%", outputs)][:2]  # cmp_free, cmp_base
    assert len(shown) == 2, outputs[-3000:]
    windows, answers, wrongs = heldout_prompts(L.load_hooked("tiny-shakespeare-lnfree"), n=24)
    base = L.load_hooked("tiny-shakespeare-vanilla", dtype=torch.float64, expect_lnfree=False)
    expected = L.compare_dla_direct_effect(base, windows, answers, wrongs).nmae
    assert shown[0] <= 1e-6 and expected > 1.0
    assert shown[1] == pytest.approx(expected, rel=5e-3)  # printed with 3 significant digits


def test_docs_build_strict(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
