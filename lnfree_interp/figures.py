"""Figures of attribution results, one layout everywhere.

* Layer 0 is the top row of every heatmap (the residual stream reads top to bottom).
* Heatmaps show every per-layer component: the heads ``H0..H{n-1}``, then the attention bias, the
  attention and MLP outputs (``MLP``); components outside any layer (``embed``, ``pos_embed``, the
  unembedding bias) are listed under the figure with their values.
* Every colour bar and value axis names its units (``logits`` for DLA, the direct effect and a
  logit-difference metric); the title carries the prompt and the metric when the caller gives them.
* Static figures are matplotlib (PNG: they render on GitHub, in papers and in static notebook viewers);
  interactive ones are plotly. `save_html` writes several plotly figures into one self-contained
  page that opens offline and holds a single copy of plotly.js.

Colours: diverging ``RdBu`` centred on zero (positive blue), as in TransformerLens's tutorials.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_NEURON = re.compile(r"^L(\d+)N(\d+)$")
_LAYER_PART = re.compile(r"^(\d+)_(attn_bias|attn_out|mlp_bias|mlp_out|resid_pre)$")
_PART_COLUMN = {
    "attn_bias": "attn bias",
    "attn_out": "attn",
    "mlp_bias": "MLP bias",
    "mlp_out": "MLP",
    "resid_pre": "resid_pre",
}
_COLUMN_ORDER = ["attn bias", "attn", "MLP bias", "MLP", "resid_pre"]
KIND_NAMES = {
    "dla": "direct logit attribution",
    "direct_effect": "direct effect",
    "atp": "attribution patching",
    "activation_patching": "activation patching",
}
MAX_ANNOTATED_CELLS = 150  # write each cell's value in it up to this many cells
BAR_COMPONENTS = 30  # a bar chart shows the largest components


@dataclass
class Grid:
    """Per-layer components laid out as a ``[layer, column]`` grid (layer 0 first).

    Attributes:
        values: ``[n_layers, n_columns]`` batch-mean values (positions summed); NaN where no component.
        labels: the component label of each cell (``None`` where none).
        columns: column names: ``H0``..``H{n-1}``, then ``attn bias``, ``attn``, ``MLP bias``, ``MLP``,
            ``resid_pre`` (those present).
        n_heads: how many of the columns are heads (the first ones).
        other: components outside any layer (``embed``, ``pos_embed``, ``unembed bias``) and their values.
    """

    values: np.ndarray
    labels: list[list[str | None]]
    columns: list[str]
    n_heads: int
    other: dict[str, float]


def mean_values(result: Any) -> np.ndarray:
    """Batch-mean value of every component of an [`AttributionResult`][lnfree_interp.AttributionResult],
    positions summed: ``[component]``."""
    mean = result.values.detach().double().cpu().mean(-1)
    if mean.ndim > 1:
        mean = mean.sum(-1)
    return mean.numpy()


def component_grid(result: Any) -> Grid | None:
    """The layer x component grid of ``result``, or ``None`` when it has MLP neurons (``L{l}N{n}``)
    or no per-layer component (then a bar chart shows it)."""
    labels = list(result.labels)
    if any(_NEURON.match(lab) for lab in labels):
        return None
    mean = mean_values(result)
    cells: dict[tuple[int, str], tuple[str, float]] = {}
    other: dict[str, float] = {}
    heads: set[int] = set()
    for lab, value in zip(labels, mean.tolist()):
        if m := _HEAD.match(lab):
            heads.add(int(m.group(2)))
            cells[(int(m.group(1)), f"H{int(m.group(2))}")] = (lab, value)
        elif m := _LAYER_PART.match(lab):
            cells[(int(m.group(1)), _PART_COLUMN[m.group(2)])] = (lab, value)
        else:
            other[lab] = value
    if not cells:
        return None
    if result.bias is not None:
        other["unembed bias"] = float(result.bias.detach().double().cpu().mean())
    n_heads = max(heads) + 1 if heads else 0
    parts = {col for (_, col) in cells if not col.startswith("H") or not col[1:].isdigit()}
    columns = [f"H{h}" for h in range(n_heads)] + [c for c in _COLUMN_ORDER if c in parts]
    n_layers = max(result.n_layers, max(layer for layer, _ in cells) + 1)
    values = np.full((n_layers, len(columns)), np.nan)
    grid_labels: list[list[str | None]] = [[None] * len(columns) for _ in range(n_layers)]
    for (layer, col), (lab, value) in cells.items():
        j = columns.index(col)
        values[layer, j] = value
        grid_labels[layer][j] = lab
    return Grid(values=values, labels=grid_labels, columns=columns, n_heads=n_heads, other=other)


def units_of(result: Any, units: str | None = None) -> str:
    """``units`` if given, else ``result.extra["units"]``, else ``logits`` for DLA and the direct effect
    (they are logit contributions) and ``metric units`` for patching (the metric is the caller's)."""
    if units:
        return units
    if result.extra.get("units"):
        return str(result.extra["units"])
    return "logits" if result.kind in ("dla", "direct_effect") else "metric units"


def default_title(result: Any) -> str:
    """``<what> of <metric> on <prompt>`` from what the result records (``extra["metric"]``,
    ``extra["prompts"]``), with its exactness and batch size."""
    what = KIND_NAMES.get(result.kind, result.kind)
    if result.kind == "dla":
        what += " (exact: LN-free)" if result.exact else " (approximate: LayerNorm scale frozen)"
    metric = result.extra.get("metric")
    title = f"{what} of {metric}" if metric else what
    prompts = result.extra.get("prompts")
    n = result.n_prompts
    if prompts:
        title += f"\non {shorten(prompts[0])!s}" + (f" and {n - 1} more prompt(s), mean" if n > 1 else "")
    elif n > 1:
        title += f", mean over {n} prompts"
    return title


def shorten(text: Any, width: int = 60) -> str:
    """``repr`` of a prompt, shortened to ``width`` characters (newlines shown as ``\\n``)."""
    text = repr(text) if isinstance(text, str) else str(text)
    return text if len(text) <= width else text[: width - 4] + "...'"


def _others_note(grid: Grid, units: str) -> str:
    if not grid.other:
        return ""
    parts = ", ".join(f"{k} {v:+.3g}" for k, v in grid.other.items())
    return f"not in the grid: {parts} ({units})"


def x_label(grid: Grid) -> str:
    """``head``, ``component`` or ``head / component``: what the grid's columns are."""
    if grid.n_heads == len(grid.columns):
        return "head"
    return "component" if grid.n_heads == 0 else "head / component"


def _bound(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and float(finite.max()) > 0 else 1.0


# --- matplotlib (static PNG) ------------------------------------------------------------------


def draw_heatmap(
    ax: Any, grid: Grid, *, title: str, units: str, colorbar_label: str, bound: float | None = None
) -> Any:
    """Draw ``grid`` on a matplotlib ``ax`` (layer 0 at the top); returns the image."""
    import matplotlib

    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd")
    bound = bound or _bound(grid.values)
    im = ax.imshow(
        np.ma.masked_invalid(grid.values),
        cmap=cmap,
        vmin=-bound,
        vmax=bound,
        aspect="auto",
        origin="upper",
        interpolation="nearest",
    )
    n_layers, n_cols = grid.values.shape
    ax.set_xticks(range(n_cols), grid.columns, rotation=0 if n_cols <= 16 else 90, fontsize=9 if n_cols <= 16 else 6)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel(x_label(grid))
    ax.set_ylabel("layer (0 = first)")
    if 0 < grid.n_heads < n_cols:
        ax.axvline(grid.n_heads - 0.5, color="black", lw=1.5)
    if grid.values.size <= MAX_ANNOTATED_CELLS:
        for i in range(n_layers):
            for j in range(n_cols):
                v = grid.values[i, j]
                if np.isfinite(v):
                    ax.text(
                        j,
                        i,
                        f"{v:+.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if abs(v) > 0.6 * bound else "black",
                    )
    ax.set_title(title, fontsize=10)
    cbar = ax.figure.colorbar(im, ax=ax)
    cbar.set_label(f"{colorbar_label} ({units})")
    return im


def heatmap_figure(result: Any, title: str | None = None, units: str | None = None) -> Any:
    """A matplotlib ``Figure`` of ``result``: the layer x component heatmap, or a bar chart of the
    largest components for neuron-level results. Uses no pyplot state."""
    from matplotlib.figure import Figure

    units = units_of(result, units)
    title = title or default_title(result)
    label = KIND_NAMES.get(result.kind, result.kind)
    grid = component_grid(result)
    if grid is None:
        return bar_figure(result, title, units)
    n_layers, n_cols = grid.values.shape
    fig = Figure(figsize=(max(6.0, 0.6 * n_cols + 3.0), max(3.5, 0.45 * n_layers + 2.2)), dpi=110)
    ax = fig.subplots()
    draw_heatmap(ax, grid, title=title, units=units, colorbar_label=label)
    note = _others_note(grid, units)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7.5, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    return fig


def bar_figure(result: Any, title: str, units: str) -> Any:
    """Horizontal bars of the ``BAR_COMPONENTS`` largest |mean| components, largest at the top."""
    from matplotlib.figure import Figure

    mean = mean_values(result)
    order = np.argsort(-np.abs(mean))[:BAR_COMPONENTS]
    fig = Figure(figsize=(6.5, max(3.0, 0.22 * len(order) + 1.5)), dpi=110)
    ax = fig.subplots()
    ax.barh(range(len(order)), mean[order], color=["#2166ac" if v >= 0 else "#b2182b" for v in mean[order]])
    ax.set_yticks(range(len(order)), [result.labels[i] for i in order], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"{KIND_NAMES.get(result.kind, result.kind)} ({units})")
    shown = f"largest {len(order)} of {len(mean)} components" if len(order) < len(mean) else "components"
    ax.set_title(f"{title}\n{shown}", fontsize=10)
    fig.tight_layout()
    return fig


def scatter_figure(cmp: Any, title: str | None = None, units: str = "logits") -> Any:
    """A matplotlib ``Figure``: estimate (y) against reference (x), one point per component x prompt,
    coloured by layer, with the y = x line. ``units`` label both axes."""
    import matplotlib
    from matplotlib.figure import Figure

    a, b = cmp.a.double().cpu().numpy(), cmp.b.double().cpu().numpy()
    fig = Figure(figsize=(5.6, 4.8), dpi=110)
    ax = fig.subplots()
    layers = [-1 if x is None else x for x in cmp.layers]
    lo_l, hi_l = min(layers), max(layers)
    sc = ax.scatter(
        b,
        a,
        c=layers,
        cmap=matplotlib.colormaps["viridis"].resampled(hi_l - lo_l + 1),
        s=14,
        vmin=lo_l - 0.5,
        vmax=hi_l + 0.5,
    )
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    ax.plot([lo, hi], [lo, hi], "--", color="grey", lw=1, label="y = x")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel(_with_units(cmp.names[1], units))
    ax.set_ylabel(_with_units(cmp.names[0], units))
    ax.set_title((title or cmp.title or cmp.names[0]) + f"\n{agreement_line(cmp, units)}", fontsize=9)
    cbar = fig.colorbar(
        sc, ax=ax, label="layer (-1: not a layer)" if lo_l < 0 else "layer", ticks=range(lo_l, hi_l + 1)
    )
    cbar.ax.invert_yaxis()  # layer 0 at the top, as in the heatmaps
    fig.tight_layout()
    return fig


def _with_units(name: str, units: str) -> str:
    return name if "(" in name else f"{name} ({units})"


def agreement_line(cmp: Any, units: str = "logits") -> str:
    """One line of agreement figures: NMAE in percent (with its CI), Pearson r when known, the largest
    absolute error in ``units``."""
    ci = "" if math.isnan(cmp.ci[0]) else f" [95% CI {cmp.ci[0]:.3g}-{cmp.ci[1]:.3g}%]"
    line = f"NMAE {cmp.nmae:.3g}%{ci}"
    if "pearson" in cmp.stats:
        line += f", Pearson r {cmp.stats['pearson']:.3f}"
    if "max_abs_error" in cmp.stats:
        line += f", max |error| {cmp.stats['max_abs_error']:.2g} {units}"
    return line


# --- plotly (interactive) ---------------------------------------------------------------------


def heatmap_plotly(result: Any, title: str | None = None, units: str | None = None) -> Any:
    """The plotly version of `heatmap_figure` (hover shows each cell's component label)."""
    import plotly.graph_objects as go

    units = units_of(result, units)
    title = (title or default_title(result)).replace("\n", "<br>")
    label = KIND_NAMES.get(result.kind, result.kind)
    grid = component_grid(result)
    if grid is None:
        mean = mean_values(result)
        order = np.argsort(-np.abs(mean))[:BAR_COMPONENTS]
        fig = go.Figure(go.Bar(x=mean[order], y=[result.labels[i] for i in order], orientation="h"))
        fig.update_layout(title=title, xaxis_title=f"{label} ({units})", yaxis={"autorange": "reversed"})
        return fig
    bound = _bound(grid.values)
    rows = [str(i) for i in range(grid.values.shape[0])]
    text = [[lab or "" for lab in row] for row in grid.labels]
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=grid.columns,
            y=rows,
            colorscale="RdBu",
            zmin=-bound,
            zmax=bound,
            zmid=0,
            text=text,
            hovertemplate="%{text}: %{z:+.4f} " + units + "<extra></extra>",
            colorbar={"title": {"text": f"{label}<br>({units})"}},
            texttemplate="%{z:+.2f}" if grid.values.size <= MAX_ANNOTATED_CELLS else None,
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title=x_label(grid),
        yaxis_title="layer (0 = first)",
        yaxis={"autorange": "reversed", "type": "category"},
        xaxis={"type": "category"},
    )
    note = _others_note(grid, units)
    if note:
        fig.add_annotation(
            text=note, xref="paper", yref="paper", x=0, y=-0.2, showarrow=False, font={"size": 11}, xanchor="left"
        )
        fig.update_layout(margin={"b": 90})
    return fig


def scatter_plotly(cmp: Any, title: str | None = None, units: str = "logits") -> Any:
    """The plotly version of `scatter_figure`."""
    import plotly.graph_objects as go

    a, b = cmp.a.double().cpu().numpy(), cmp.b.double().cpu().numpy()
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=b,
            y=a,
            mode="markers",
            name="components",
            marker={
                "color": [-1 if x is None else x for x in cmp.layers],
                "colorscale": "Viridis",
                "showscale": True,
                "colorbar": {"title": "layer"},
            },
        )
    )
    fig.add_trace(
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dash", "color": "grey"})
    )
    head = (title or cmp.title or cmp.names[0]).replace("\n", "<br>")
    fig.update_layout(
        title=f"{head}<br><sup>{agreement_line(cmp, units)}</sup>",
        xaxis_title=_with_units(cmp.names[1], units),
        yaxis_title=_with_units(cmp.names[0], units),
    )
    return fig


def save_html(figures: Sequence[Any], path: str | Path, title: str = "lnfree_interp figures") -> Path:
    """Write plotly ``figures`` into one self-contained HTML page (one copy of plotly.js inside, so
    it opens offline and can be moved or mailed on its own); returns the path."""
    path = Path(path).with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_height=520) for i, fig in enumerate(figures)
    ]
    body = "\n<hr>\n".join(parts)
    path.write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title></head>\n'
        f'<body style="font-family: sans-serif">\n<h2>{escape(title)}</h2>\n{body}\n</body></html>\n',
        encoding="utf-8",
    )
    return path


def save_png(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as ``path.png`` (parent folders created); returns the path."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
