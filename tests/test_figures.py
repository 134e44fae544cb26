"""Figures (lnfree_interp.figures via AttributionResult / Comparison): one layout everywhere.

Layer 0 at the top, MLPs beside the heads, units on every colour bar and axis, the caller's title (prompt
and metric), PNG by default and one copy of plotly.js per HTML page; the printed figures read consistently.
"""

import ast
import math
from pathlib import Path

import pytest
import torch

import lnfree_interp as L
from lnfree_interp.figures import component_grid, save_html

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\nI will not"


@pytest.fixture(scope="module")
def free():
    return L.load_hooked("tiny-shakespeare-lnfree")


@pytest.fixture(scope="module")
def dla(free):
    return L.direct_logit_attribution(free, PROMPT, " be", " go")


def test_grid_has_heads_and_mlps_with_layer_zero_first(dla):
    grid = component_grid(dla)
    assert grid is not None
    assert grid.columns == ["H0", "H1", "H2", "H3", "attn bias", "MLP"] and grid.n_heads == 4
    for layer in range(4):  # row i is layer i, each cell the component's own value
        assert grid.values[layer, 5] == pytest.approx(float(dla[f"{layer}_mlp_out"].mean()), abs=1e-12)
        assert grid.values[layer, 2] == pytest.approx(float(dla[f"L{layer}H2"].mean()), abs=1e-12)
        assert grid.labels[layer][:2] == [f"L{layer}H0", f"L{layer}H1"]
    # nothing is lost: the grid plus the listed components plus the bias is the model's metric
    total = float(torch.tensor(grid.values).nansum()) + sum(grid.other.values())
    assert set(grid.other) == {"embed", "pos_embed", "unembed bias"}
    assert total == pytest.approx(float(dla.metric[0]), abs=1e-4)


def test_static_figure_orientation_units_title(dla):
    fig = dla.figure(title=f"DLA of logit[' be'] - logit[' go'] on {PROMPT!r}")
    ax, cbar = fig.axes
    bottom, top = ax.get_ylim()
    assert bottom > top  # layer 0 at the top
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "MLP"
    assert "(logits)" in cbar.get_ylabel()
    assert "I will not" in ax.get_title() and "logit[' be']" in ax.get_title()
    assert any("unembed bias" in t.get_text() and "logits" in t.get_text() for t in fig.texts)


def test_interactive_figure_same_layout(dla):
    fig = dla.plot(title="t")
    heat = fig.data[0]
    assert heat.type == "heatmap" and list(heat.x) == ["H0", "H1", "H2", "H3", "attn bias", "MLP"]
    assert fig.layout.yaxis.autorange == "reversed" and list(heat.y) == ["0", "1", "2", "3"]
    assert "logits" in heat.colorbar.title.text
    assert heat.z[0][5] == pytest.approx(float(dla["0_mlp_out"].mean()), abs=1e-12)


def test_neuron_results_are_bars_in_logits(free):
    res = L.direct_logit_attribution(free, PROMPT, " be", by="neuron", top_k=5)
    assert component_grid(res) is None
    fig = res.figure()
    assert "(logits)" in fig.axes[0].get_xlabel()
    assert len(fig.axes[0].patches) == min(30, len(res.labels))


def test_save_writes_png_and_optional_self_contained_html(dla, tmp_path):
    assert dla.save(tmp_path / "a" / "dla") == [tmp_path / "a" / "dla.png"]
    png, page = dla.save(tmp_path / "b" / "dla", html=True)
    assert png.stat().st_size > 10_000 and page.suffix == ".html"
    text = page.read_text()
    assert "<script src=" not in text and text.count("* plotly.js v") == 1  # plotly.js inside, once
    assert not list(tmp_path.rglob("*.js"))  # no folder gets its own plotly.min.js


def test_save_html_holds_one_plotly_copy_for_many_figures(dla, tmp_path):
    page = save_html([dla.plot("one"), dla.plot("two"), dla.plot("three")], tmp_path / "all", title="<x> & y")
    text = page.read_text()
    assert text.count("* plotly.js v") == 1 and text.count('class="plotly-graph-div"') == 3
    assert "<title>&lt;x&gt; &amp; y</title>" in text


def test_top_has_std_only_over_several_prompts(free):
    one = L.direct_logit_attribution(free, PROMPT, " be", " go").top(3)
    assert list(one.columns) == ["component", "mean"]
    two = L.direct_logit_attribution(free, [PROMPT, "JULIET:\nI will not"], " be", " go").top(3)
    assert list(two.columns) == ["component", "mean", "std"] and (two["std"] > 0).all()


def test_comparison_prints_one_consistent_set_and_plots_in_logits(free):
    pairs = L.ioi_prompts(free, n=4)
    metric = L.logit_diff(pairs.answers, pairs.wrongs)
    atp = L.attribution_patching(free, pairs.clean, pairs.corrupted, metric, per_position=False)
    act = L.activation_patching(free, pairs.clean, pairs.corrupted, metric, progress=False)
    cmp = L.compare_attribution(atp, act)
    text = repr(cmp)
    assert f"NMAE {cmp.nmae:.3g}%" in text and "100 * mean|a - b| / mean|b|" in text
    assert f"full-restoration effect {100 * cmp.stats['normalised_mae']:.3g}%" in text
    assert "normalised_mae" not in text and "nmae=" not in text  # no unexplained raw keys
    fig = cmp.figure(title="AtP on IOI")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "activation patching (logits)" and ax.get_ylabel() == "attribution patching (logits)"
    assert "AtP on IOI" in ax.get_title() and "NMAE" in ax.get_title() and "logits" in ax.get_title()
    bottom, top = fig.axes[1].get_ylim()
    assert bottom > top  # the layer colour bar too: layer 0 at the top
    plotly_fig = cmp.plot(title="AtP on IOI")
    assert plotly_fig.layout.xaxis.title.text == "activation patching (logits)"


def test_comparison_single_prompt_has_no_ci(free):
    free64 = L.load_hooked("tiny-shakespeare-lnfree", dtype=torch.float64)
    cmp = L.compare_dla_direct_effect(free64, PROMPT, " be", " go")
    assert math.isnan(cmp.ci[0]) and "no CI from one prompt" in repr(cmp)
    assert "CI" not in cmp.figure().axes[0].get_title()


def test_cli_and_demo_do_not_import_each_other():
    """The apps layer: cli imports demo (the demo command); demo never imports cli (no cycle)."""
    tree = ast.parse((ROOT / "lnfree_interp" / "demo.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "cli" not in imported and "lnfree_interp.cli" not in imported
