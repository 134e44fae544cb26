"""The quickstart notebook executes end to end; the docs build with --strict; both as a user would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _output_kinds(cells) -> list[list[str]]:
    """Per code cell: the kind of each output (stream name, or the richest MIME type of a display)."""
    kinds = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        row = []
        for out in cell["outputs"]:
            if out["output_type"] == "stream":
                if not (row and row[-1] == out["name"]):  # how a stream is chunked depends on flush timing
                    row.append(out["name"])
            elif out["output_type"] == "error":
                row.append("error")
            else:
                data = out.get("data", {})
                row.append("image/png" if "image/png" in data else "text/html" if "text/html" in data
                           else next(iter(data), "empty"))
        kinds.append(row)
    return kinds


def test_notebook_is_stored_executed_with_static_figures():
    """Stored executed (scripts/run_notebook.py), top to bottom, its figures as PNG: they render on GitHub and
    in static viewers (no plotly JSON, no widgets), and no warnings (such as "IProgress not found")."""
    nb = json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    kinds = _output_kinds(nb["cells"])
    # DLA heatmaps, DLA vs DE, AtP vs activation patching; the circuit section's edge graph and faithfulness curve
    assert sum(k.count("image/png") for k in kinds) == 5
    assert not any("stderr" in k or "error" in k for k in kinds)
    text = json.dumps(nb)
    assert "application/vnd.plotly" not in text and "widget-view" not in text and "IProgress" not in text


def test_quickstart_notebook_executes(tmp_path):
    """Executes end to end, and gives the outputs stored in the repository (same kinds, cell by cell)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    stored = _output_kinds(json.loads((ROOT / "examples" / "quickstart.ipynb").read_text())["cells"])
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Comparison(" in outputs and "NMAE" in outputs
    assert _output_kinds(json.loads(nbformat.writes(nb))["cells"]) == stored, \
        "the stored notebook is stale: run `python scripts/run_notebook.py`"
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


# --- every code block of the README and the docs runs as written -------------------------------

import re  # noqa: E402

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: a fenced block, optionally preceded by ``<!-- docs-test: skip REASON -->``
FENCE = re.compile(r"(?:<!-- docs-test: skip (?P<reason>[^>]+?) -->\s*\n)?^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n"
                   r"(?P<code>.*?)^(?P=indent)```", re.M | re.S)


def _blocks(path):
    return [(m["lang"] or "text", m["code"], (m["reason"] or "").strip()) for m in FENCE.finditer(path.read_text())]


def test_docs_have_runnable_examples_and_skips_say_why():
    blocks = [b for f in DOC_FILES for b in _blocks(f)]
    assert sum(lang == "python" and not reason for lang, _, reason in blocks) >= 6
    for _lang, code, reason in blocks:
        assert reason == "" or len(reason) > 10, f"a skipped block needs a reason: {code[:80]!r}"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_doc_code_blocks_run(path, tmp_path, monkeypatch, capsys):
    """Python blocks run in order in one namespace per file (as a reader pastes them), in an empty
    folder; ``lnfree-interp ...`` lines of shell blocks run through the CLI's main() and must exit 0
    (``demo`` is left to test_cli / test_headlines). Install, test and serve commands are not run."""
    import linecache
    import shlex

    import plotly.io as pio

    from lnfree_interp.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pio.renderers, "default", "json")  # fig.show() must not open a browser
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for i, (lang, code, reason) in enumerate(_blocks(path)):
        if reason:
            continue
        if lang == "python":
            name = str(tmp_path / f"{path.stem}_block{i}.py")  # a real file: nnsight reads a trace's source back
            Path(name).write_text(code)
            linecache.cache[name] = (len(code), None, code.splitlines(True), name)
            exec(compile(code, name, "exec"), namespace)  # noqa: S102 - our own docs
            ran += 1
        elif lang in ("bash", "shell", "sh", "console", "text"):
            for line in code.replace("\\\n", " ").splitlines():  # join continuation lines
                words = shlex.split(line, comments=True)
                if len(words) < 2 or words[0] != "lnfree-interp" or words[1] == "demo":
                    continue
                assert main(words[1:]) == 0, f"{path.name}: {line}\n{capsys.readouterr().err[-2000:]}"
                ran += 1
    if not ran:
        pytest.skip(f"{path.name} has no runnable code block")


def test_api_page_names_are_importable_as_it_says():
    """docs/api.md: every object documented on its own is importable from lnfree_interp, except in the
    Backends section (documented as importable from its module)."""
    import importlib

    import lnfree_interp

    section, checked = "", 0
    for line in (ROOT / "docs" / "api.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        target = line[4:].strip() if line.startswith("::: ") else ""
        if not target or section == "Backends":
            continue
        try:
            importlib.import_module(target)
            continue  # a module section
        except ImportError:
            pass
        module, name = target.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), f"docs/api.md documents a missing {target}"
        assert hasattr(lnfree_interp, name), f"docs/api.md says {name} is importable from lnfree_interp; it is not"
        checked += 1
    assert checked >= 20


def test_docstrings_use_markdown_not_sphinx_roles():
    """The API reference renders docstrings as Markdown (mkdocstrings): Sphinx roles (:func:`x`) and
    '::' literal-block markers would print as-is. Cross-references are written [`x`][lnfree_interp.x]."""
    role = re.compile(r":(?:py:)?(?:func|class|meth|data|mod|attr|exc|obj|const):`")
    bad = []
    for path in sorted((ROOT / "lnfree_interp").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if role.search(line) or re.search(r"[\w)]::$", line):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "\n".join(bad[:30])
