"""The figures of [`compare_models`][lnfree_interp.report.compare_models] (matplotlib ``Figure`` objects, never
pyplot's global state). Layer 0 is at the top of every layer axis; units are on every axis."""

from __future__ import annotations

from typing import Any

import numpy as np


def _fig(ncols: int, width: float = 4.2, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, width * ncols), height), dpi=100)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def residual_norm_figure(labels: list[str], results: dict[str, dict[str, Any]]):
    fig, (ax,) = _fig(1, 6.5, 4.2)
    for i, m in enumerate(labels):
        n = results[m]["norms"]
        y = np.arange(len(n))
        colour = f"C{i}"
        ax.plot(n["first"], y, "o-", color=colour, label=f"{m}: position 0")
        ax.plot(n["rest"], y, "x--", color=colour, label=f"{m}: positions 1..T-1")
    n = results[labels[0]]["norms"]
    ax.set_yticks(range(len(n)), [h.replace("blocks.", "L").replace(".hook_", " ") for h in n["hook"]])
    ax.invert_yaxis()  # layer 0 at the top
    ax.set_xscale("log")
    ax.set_xlabel("mean L2 norm of the residual stream (residual-stream units, log)")
    ax.set_title("Residual-stream norm per layer: first token vs the rest", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sink_figure(labels: list[str], results: dict[str, dict[str, Any]], threshold: float):
    fig, axes = _fig(len(labels), 3.6, 3.6)
    for ax, m in zip(axes, labels):
        s = results[m]["sinks"]
        grid = s.first_attention.numpy()
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")  # row 0 (layer 0) at the top
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{m}\nsink rate {s.overall_sink_rate:.3f} (threshold {threshold})", fontsize=8)
        fig.colorbar(im, ax=ax, label="mean attention to position 0")
    fig.suptitle("Attention to the first token per head (queries 1..T-1)", fontsize=10)
    fig.tight_layout()
    return fig


def calibration_figure(labels: list[str], results: dict[str, dict[str, Any]]):
    fig, (ax,) = _fig(1, 5.5, 4.5)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for i, m in enumerate(labels):
        c = results[m]["calibration"]
        b = c.bins[c.bins["count"] > 0]
        ax.plot(b["confidence"], b["accuracy"], "o-", color=f"C{i}", label=f"{m}: ECE {c.ece:.4f}")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy (top-1 = next token)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability diagram, {c.n_bins} equal-width bins, next-token prediction", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def entropy_neuron_figure(labels: list[str], results: dict[str, dict[str, Any]]):
    fig, axes = _fig(len(labels) + 1, 3.6, 3.8)
    for ax, m in zip(axes, labels):
        s = results[m]["scores"]
        top = results[m]["ablation"].table["index"].tolist()
        chosen = s["index"].isin(top)
        ax.scatter(s["w_out_norm"][~chosen], s["null_fraction"][~chosen], s=6, alpha=0.5, label="neurons")
        ax.scatter(s["w_out_norm"][chosen], s["null_fraction"][chosen], s=18, color="red", label="ablated candidates")
        ax.set_xlabel("||W_out[n]|| (residual-stream units)")
        ax.set_ylabel("share of W_out[n] in W_U's null space")
        ax.set_title(m, fontsize=8)
        ax.legend(fontsize=6)
    ax = axes[-1]
    for i, m in enumerate(labels):
        S = results[m]["spectrum"]
        ax.plot(np.arange(len(S)), S / S.max(), color=f"C{i}", label=m)
    ax.set_xlabel("singular direction (ascending)")
    ax.set_ylabel("singular value of W_U / largest")
    ax.set_yscale("log")
    ax.set_title("Unembedding spectrum", fontsize=8)
    ax.legend(fontsize=6)
    fig.suptitle("Entropy-neuron candidates of the last MLP layer", fontsize=10)
    fig.tight_layout()
    return fig


def ablation_figure(labels: list[str], results: dict[str, dict[str, Any]]):
    fig, axes = _fig(len(labels), 3.6, 3.6)
    for ax, m in zip(axes, labels):
        a = results[m]["ablation"]
        data = [row.abs().numpy() for row in a.per_token["dH"]]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(data) + 1), a.table["neuron"], rotation=45, fontsize=7)
        ax.set_ylabel("|ΔH| per token (nats)")
        ax.set_title(m, fontsize=8)
    fig.suptitle("Mean ablation of entropy-neuron candidates: change in next-token entropy", fontsize=10)
    fig.tight_layout()
    return fig


def loss_figure(labels: list[str], results: dict[str, dict[str, Any]]):
    fig, (ax,) = _fig(1, 5.5, 4)
    top = max(float(results[m]["loss"].per_token.max()) for m in labels)
    bins = np.linspace(0, top, 60)
    for i, m in enumerate(labels):
        r = results[m]["loss"]
        ax.hist(r.per_token.numpy(), bins=bins, histtype="step", color=f"C{i}",
                label=f"{m}: mean {r.mean:.3f}, median {r.median:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("per-token cross-entropy (nats)")
    ax.set_ylabel("tokens (log)")
    ax.set_title("Per-token loss on the evaluation text (outliers in the tail)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def scatter_figure(labels: list[str], results: dict[str, dict[str, Any]], key: str, title: str):
    fig, axes = _fig(len(labels), 3.6, 3.8)
    for ax, m in zip(axes, labels):
        c = results[m][key]
        a, b = c.a.double().numpy(), c.b.double().numpy()
        sc = ax.scatter(b, a, s=8, c=[-1 if x is None else x for x in c.layers], cmap="viridis")
        fig.colorbar(sc, ax=ax, label="layer")
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        ax.plot([lo, hi], [lo, hi], "--", color="grey", lw=1)
        ax.set_xlabel(c.names[1])
        ax.set_ylabel(c.names[0])
        ax.set_title(f"{m}\nNMAE {c.nmae:.3g}%", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def make_figures(labels: list[str], results: dict[str, dict[str, Any]], threshold: float) -> dict[str, Any]:
    """All figures of the report, by file stem."""
    return {
        "loss": loss_figure(labels, results),
        "calibration": calibration_figure(labels, results),
        "attention_sinks": sink_figure(labels, results, threshold),
        "residual_norms": residual_norm_figure(labels, results),
        "entropy_neurons": entropy_neuron_figure(labels, results),
        "entropy_neuron_ablation": ablation_figure(labels, results),
        "dla_vs_direct_effect": scatter_figure(labels, results, "dla",
                                               "DLA vs direct effect per head, logit difference on text windows"),
        "atp_vs_activation_patching": scatter_figure(labels, results, "atp",
                                                     "AtP vs activation patching per head, IOI logit difference"),
    }
