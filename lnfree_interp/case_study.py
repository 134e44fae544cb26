"""Case study: the induction circuit found edge by edge (EAP, EAP-IG, edge patching, faithfulness).

`induction_case_study` builds prompt pairs whose circuit is known (Olsson et al. 2022):

* clean ``[BOS] + s + s``: ``seq_len`` distinct random tokens, then the same again, so every token of the
  repeat can be predicted by induction (attend to the token after the current token's first
  occurrence, through a previous-token head feeding the induction head's keys: K-composition);
* corrupted ``[BOS] + s' + s``: the first copy replaced by other distinct random tokens (none of
  ``s``), so the second copy repeats nothing; the tokens at the metric's positions are unchanged;
* metric: the logit difference ``logit[s[i+1]] - logit[s'[i+1]]`` at the position of the repeat's
  ``s[i]``, averaged over ``i = 0 .. seq_len-2`` (logits; linear in the logits, so on an LN-free model
  EAP of every edge into ``logits`` is exact).

It then runs `edge_attribution` (EAP and EAP-IG), the ground truth
`edge_patching` (all edges, or the top ones), compares them per reader class
(``logits``, ``q``, ``k``, ``v``, ``mlp_in``), evaluates the top-n circuits
(`faithfulness_curve`), and asks whether the top edges contain a
previous-token head -> induction head ``.k`` edge (heads identified independently, from attention
patterns, by [`induction_score`][lnfree_interp.induction_score]).
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .backends import get_backend
from .circuits import edge_attribution, edge_patching
from .faithfulness import faithfulness_curve
from .patching import compare_attribution
from .edge_results import EdgeResult
from .errors import LNFreeError
from .induction import InductionResult, induction_score, repeated_tokens

__all__ = ["InductionCaseStudy", "RepeatLogitDiff", "case_study_markdown", "case_study_table", "induction_case_study",
           "induction_pairs", "plot_faithfulness"]

METRIC_TEXT = "mean over the repeat of logit[true next] - logit[corrupted next]"


class RepeatLogitDiff:
    """``mean_i logit[answers[:, i]] - logit[wrongs[:, i]]`` at ``positions[i]`` (logits, one value per prompt).

    Linear in the logits (``linear = True``), so EAP of edges into ``logits`` is exact on an LN-free model.
    """

    linear = True

    def __init__(self, positions: Int[Tensor, "n"], answers: Int[Tensor, "batch n"], wrongs: Int[Tensor, "batch n"]):
        self.positions, self.answers, self.wrongs = positions, answers, wrongs

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
        if logits.shape[0] != self.answers.shape[0]:
            raise LNFreeError(f"RepeatLogitDiff was built for {self.answers.shape[0]} prompts, got logits for "
                              f"{logits.shape[0]}.")
        at = logits[:, self.positions.to(logits.device)]  # [batch, n, vocab]
        good = at.gather(2, self.answers.to(logits.device)[..., None])[..., 0]
        bad = at.gather(2, self.wrongs.to(logits.device)[..., None])[..., 0]
        return (good - bad).mean(1)

    def take(self, start: int, stop: int, n: int) -> RepeatLogitDiff:
        """This metric for prompts ``start:stop`` of ``n`` (``batch_size=`` streaming cuts it alongside the prompts).

        Raises:
            LNFreeError: it was built for another number of prompts than ``n``.
        """
        if n != self.answers.shape[0]:
            raise LNFreeError(f"RepeatLogitDiff was built for {self.answers.shape[0]} prompts, got {n}.")
        return RepeatLogitDiff(self.positions, self.answers[start:stop], self.wrongs[start:stop])

    def __repr__(self) -> str:
        return f"RepeatLogitDiff({len(self.positions)} positions)"


def induction_pairs(model: Any, *, n_prompts: int = 8, seq_len: int = 16, seed: int = 0):
    """``(clean, corrupted, metric)`` for the case study (see the module docstring); ids ``[n_prompts, 1 + 2 seq_len]``.

    Raises:
        LNFreeError: ``n_prompts < 1``, ``seq_len < 2``, ``1 + 2 seq_len`` above the context, too small a vocabulary.
    """
    backend = get_backend(model)
    for name, value, low in (("n_prompts", n_prompts, 1), ("seq_len", seq_len, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LNFreeError(f"{name} must be an int >= {low}, got {value!r}.")
    if 1 + 2 * seq_len > backend.n_ctx:
        raise LNFreeError(f"BOS + 2 x seq_len = {1 + 2 * seq_len} tokens exceed the context n_ctx = {backend.n_ctx}; "
                          f"use seq_len <= {(backend.n_ctx - 1) // 2}.")
    # 2*seq_len distinct tokens per prompt: the first half is s, the second s' (disjoint from s)
    toks, _ = repeated_tokens(backend, n_seq=n_prompts, seq_len=2 * seq_len, seed=seed, prepend_bos=True)
    bos, s, s2 = toks[:, :1], toks[:, 1:1 + seq_len], toks[:, 1 + seq_len:1 + 2 * seq_len]
    clean, corrupted = torch.cat([bos, s, s], 1), torch.cat([bos, s2, s], 1)
    positions = torch.arange(1 + seq_len, 2 * seq_len)  # the repeat's s[0..seq_len-2]
    return clean, corrupted, RepeatLogitDiff(positions, s[:, 1:], s2[:, 1:])


@dataclass
class InductionCaseStudy:
    """What `induction_case_study` found on one model (scores in logits)."""

    name: str
    lnfree: bool
    clean: Int[Tensor, "batch pos"] = field(repr=False)
    corrupted: Int[Tensor, "batch pos"] = field(repr=False)
    eap: EdgeResult = field(repr=False)
    eap_ig: EdgeResult = field(repr=False)
    patched: EdgeResult | None = field(repr=False)
    induction: InductionResult = field(repr=False)
    agreement: Any  #: DataFrame per method and reader kind: compare_attribution's figures + max_abs_effect
    faithfulness: Any  #: DataFrame: n_edges, eap, eap_ig (normalised faithfulness of the top-n circuits)
    k_composition: Any  #: DataFrame: head -> head ``.k`` edges ranked by |EAP|, with the heads' scores
    metric_clean: float
    metric_corrupted: float
    top_k: int
    threshold: float = 0.3

    @property
    def found(self) -> bool:
        """A previous-token head -> induction head ``.k`` edge is among the top ``top_k`` EAP edges."""
        df = self.k_composition
        return bool(((df["rank"] <= self.top_k) & df["prev_token_head"] & df["induction_head"]).any())

    def summary(self) -> str:
        ind, ind_s = self.induction.best_induction
        prev, prev_s = self.induction.best_prev_token
        best = self.k_composition.iloc[0] if len(self.k_composition) else None
        lines = [f"{self.name} ({'LN-free' if self.lnfree else 'with LayerNorm'}): metric clean "
                 f"{self.metric_clean:+.3f}, corrupted {self.metric_corrupted:+.3f} logits; "
                 f"induction NLL drop {self.induction.nll_drop:.2f} nats"
                 + (" (clean and corrupted barely differ: faithfulness is unreliable)"
                    if abs(self.metric_clean - self.metric_corrupted)
                    <= 0.05 * (abs(self.metric_clean) + abs(self.metric_corrupted)) / 2 else ""),
                 f"  best induction head {ind} (score {ind_s:.2f}), best previous-token head {prev} ({prev_s:.2f})"]
        if best is not None:
            lines.append(f"  highest head->head .k edge: {best['edge']} (rank {int(best['rank'])} of "
                         f"{len(self.eap.edges)}, EAP {best['eap']:+.4f})")
        key = f"{prev}->{ind}.k"
        row = self.k_composition[self.k_composition["edge"] == key]
        if len(row):
            truth = ""
            if self.patched is not None and key in self.patched.labels:
                truth = f", edge patching {float(self.patched[key].mean()):+.4f}"
            lines.append(f"  best previous-token -> best induction head: {key} rank {int(row['rank'].iloc[0])} "
                         f"(EAP {float(row['eap'].iloc[0]):+.4f}{truth})")
        lines.append(f"  previous-token -> induction .k edge in the top {self.top_k}: {'yes' if self.found else 'no'}"
                     f" (heads with scores >= {self.threshold})")
        return "\n".join(lines)

    def plot_agreement(self):
        """EAP vs edge patching per edge (batch mean, logits), coloured by reader class; y = x dashed."""
        import matplotlib.pyplot as plt

        if self.patched is None:
            raise LNFreeError("This case study ran without edge patching (patch_top=0).")
        eap = dict(zip(self.eap.edges, self.eap.mean().tolist()))
        fig, ax = plt.subplots(figsize=(6, 5))
        for kind in ("logits", "q", "k", "v", "mlp_in"):
            pts = [(eap[e], float(v)) for e, v in zip(self.patched.edges, self.patched.mean()) if e.reader.kind == kind]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(ys, xs, s=10, alpha=0.7, label=kind)
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("edge patching effect (logits)")
        ax.set_ylabel("EAP score (logits)")
        ax.set_title(f"EAP vs edge patching per edge: {self.name}\nrepeated random tokens\nmetric: {METRIC_TEXT}",
                     fontsize=9)
        ax.legend(title="reader", fontsize=8)
        fig.tight_layout()
        return fig

    def plot_graph(self, k: int = 40):
        """The top-``k`` EAP edges as a layered graph (layer 0 at the top)."""
        return self.eap.plot(k, title=f"Top {k} EAP edges (blue +, red -): {self.name}\nrepeated random tokens\n"
                                      f"metric: {METRIC_TEXT} (logits)")


def _agreement(est: EdgeResult, truth: EdgeResult) -> list[dict]:
    """Per reader class: [`compare_attribution`][lnfree_interp.compare_attribution] of ``est`` against edge patching
    (per edge and prompt), with the largest true effect for scale."""
    per = compare_attribution(est, truth, n_boot=200).per_component
    kinds = [e.reader.kind for e in truth.edges]
    b = truth.values.detach().double().cpu()
    rows = []
    for row in per.to_dict("records"):
        idx = [i for i, k in enumerate(kinds) if k == row["reader"]]
        rows.append({"method": est.kind, "reader_kind": row.pop("reader"), "n_edges": row.pop("edges"), **row,
                     "max_abs_effect": float(b[idx].abs().max())})
    return rows


def _k_composition(eap: EdgeResult, ind: InductionResult, threshold: float) -> Any:
    import pandas as pd

    score = eap.mean().detach().double().cpu()
    order = score.abs().argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    rows = []
    for i, e in enumerate(eap.edges):
        if e.writer.kind == "head" and e.reader.kind == "k":
            p = float(ind.prev_token[e.writer.layer, e.writer.head])
            q = float(ind.induction[e.reader.layer, e.reader.head])
            rows.append({"edge": e.label, "rank": int(rank[i]), "eap": float(score[i]), "prev_token_score": p,
                         "induction_score": q, "prev_token_head": p >= threshold, "induction_head": q >= threshold})
    return pd.DataFrame(rows).sort_values("rank").reset_index(drop=True)


def induction_case_study(
    model: Any,
    *,
    name: str | None = None,
    n_prompts: int = 8,
    seq_len: int = 16,
    seed: int = 0,
    steps: int = 5,
    patch_top: int | None = None,
    sizes: Sequence[int] = (1, 2, 5, 10, 20, 50, 100, 200),
    top_k: int = 20,
    threshold: float = 0.3,
) -> InductionCaseStudy:
    """Find the induction circuit edge by edge and check the attribution against the ground truth.

    Args:
        model: anything the loaders return (LN-free or an LN baseline); float64 for exactness figures.
        name: label in tables and titles (default: the backend's name).
        n_prompts: prompt pairs; ``seq_len``: distinct tokens per copy (prompts are ``1 + 2 seq_len`` tokens).
        seed: seeds the tokens (the same seed gives the same prompts on models sharing a tokenizer).
        steps: EAP-IG steps.
        patch_top: edge-patch only the top ``patch_top`` EAP edges (``None``: every edge; 0: none).
        sizes: circuit sizes (top-n EAP / EAP-IG edges) for the faithfulness curve; the full graph is added.
        top_k: "top edges" for `InductionCaseStudy.found`.
        threshold: previous-token / induction score (attention probability) above which a head counts as one.

    Returns:
        `InductionCaseStudy` with ``agreement``, ``faithfulness`` and ``k_composition`` DataFrames,
        ``summary()``, ``plot_agreement()``, ``plot_graph()``.

    Raises:
        LNFreeError: bad sizes or counts (see `induction_pairs`), a negative ``patch_top``, a model without
            attention-pattern hooks.
    """
    import pandas as pd

    if patch_top is not None and (isinstance(patch_top, bool) or not isinstance(patch_top, int) or patch_top < 0):
        raise LNFreeError(f"patch_top={patch_top!r} must be an integer >= 0 (the top-N EAP edges to edge-patch; 0: "
                          "none) or None (every edge).")
    backend = get_backend(model)
    clean, corrupted, metric = induction_pairs(model, n_prompts=n_prompts, seq_len=seq_len, seed=seed)
    eap = edge_attribution(model, clean, corrupted, metric, method="eap")
    eap_ig = edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=steps)
    patched = None
    rows = []
    if patch_top != 0:
        edges = None if patch_top is None else eap.top_edges(int(patch_top))
        patched = edge_patching(model, clean, corrupted, metric, edges=edges, progress=False)
        rows = _agreement(eap, patched) + _agreement(eap_ig, patched)
    n_all = len(eap.edges)
    sizes = sorted({int(n) for n in sizes if 0 < int(n) < n_all} | {n_all})
    with warnings.catch_warnings():  # summary() prints both metrics and flags a small gap itself
        warnings.filterwarnings("ignore", message="The clean and ablated metrics barely differ")
        curve = {kind: faithfulness_curve(model, (res, sizes), clean, corrupted, metric, progress=False)["faithfulness"]
                 for kind, res in (("eap", eap), ("eap_ig", eap_ig))}
    ind = induction_score(model, n_seq=max(16, n_prompts), seq_len=seq_len, seed=seed)
    return InductionCaseStudy(
        name=name or backend.name, lnfree=bool(backend.lnfree), clean=clean, corrupted=corrupted, eap=eap,
        eap_ig=eap_ig, patched=patched, induction=ind, agreement=pd.DataFrame(rows),
        faithfulness=pd.DataFrame({"n_edges": sizes, **curve}), k_composition=_k_composition(eap, ind, threshold),
        metric_clean=float(eap.extra["metric_clean"].mean()),
        metric_corrupted=float(eap.extra["metric_corrupted"].mean()),
        top_k=top_k, threshold=threshold)


def case_study_table(studies: Sequence[InductionCaseStudy]):
    """EAP / EAP-IG vs edge patching per reader class for several models side by side (one DataFrame)."""
    import pandas as pd

    frames = [s.agreement.assign(model=s.name) for s in studies if len(s.agreement)]
    if not frames:
        raise LNFreeError("No case study here ran edge patching (patch_top=0).")
    df = pd.concat(frames, ignore_index=True)
    return df[["model", "method", "reader_kind", "n_edges", "pearson", "spearman", "nmae", "sign_agreement",
               "max_abs_error", "max_abs_effect"]]


def plot_faithfulness(studies: Sequence[InductionCaseStudy]):
    """Normalised faithfulness of the top-n EAP (solid) and EAP-IG (dashed) circuits, one colour per model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(studies):
        colour = f"C{i}"
        df = s.faithfulness
        ax.plot(df["n_edges"], df["eap"], "o-", color=colour, label=f"{s.name} EAP")
        ax.plot(df["n_edges"], df["eap_ig"], "s--", color=colour, label=f"{s.name} EAP-IG", alpha=0.7)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("edges in the circuit (top-n by |score|)")
    ax.set_ylabel("normalised faithfulness\n(m_circuit - m_corrupted) / (m_clean - m_corrupted)")
    ax.set_title(f"Faithfulness of top-n circuits, corrupted ablation, repeated random tokens\nmetric: {METRIC_TEXT}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _md(df: Any, digits: int = 4) -> str:
    """A DataFrame as a Markdown table (floats in ``digits`` significant digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.{digits}g}"
        return str(v)
    lines = ["| " + " | ".join(str(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def case_study_markdown(studies: Sequence[InductionCaseStudy], figure_dir: str | None = None) -> str:
    """The case study's findings as Markdown: per-model summary, agreement per reader class,
    faithfulness of the top-n circuits, the highest head -> head ``.k`` edges; figure links under ``figure_dir``."""
    import pandas as pd

    s0 = studies[0]
    n, P = s0.clean.shape
    parts = [f"{n} prompt pairs of {P} tokens (BOS + {(P - 1) // 2} random tokens + their repeat; corrupted: "
             f"the first copy replaced); metric: {METRIC_TEXT} (logits); float "
             f"{str(s0.eap.values.dtype).replace('torch.float', '')}.", ""]
    for s in studies:
        parts += ["```", s.summary(), "```", ""]
    if any(len(s.agreement) for s in studies):
        df = case_study_table(studies).rename(columns={
            "max_abs_error": "max abs error", "max_abs_effect": "max abs effect", "reader_kind": "reader",
            "n_edges": "edges", "nmae": "NMAE %", "sign_agreement": "sign agreement"})
        parts += ["**Attribution vs edge patching, per reader class** (`compare_attribution` over every edge and "
                  "prompt; errors and effects in logits):", "",
                  _md(df), ""]
    faith = pd.DataFrame({"edges": s0.faithfulness["n_edges"]})
    for s in studies:
        faith[f"{s.name} EAP"] = s.faithfulness["eap"].values
        faith[f"{s.name} EAP-IG"] = s.faithfulness["eap_ig"].values
    parts += ["**Normalised faithfulness of the top-n circuits** (corrupted ablation):", "", _md(faith.round(4)), ""]
    for s in studies:
        k = s.k_composition.head(5)[["edge", "rank", "eap", "prev_token_score", "induction_score"]]
        parts += [f"**Highest head -> head `.k` edges, {s.name}** (rank among {len(s.eap.edges)} edges by |EAP|; "
                  "writer's previous-token score, reader's induction score):", "", _md(k), ""]
    if figure_dir is not None:
        parts += [f"![Faithfulness of the top-n circuits]({figure_dir}/faithfulness.png)", ""]
        for s in studies:
            parts += [f"![Top EAP edges, {s.name}]({figure_dir}/circuit_{s.name}.png)", ""]
            if s.patched is not None:
                parts += [f"![EAP vs edge patching, {s.name}]({figure_dir}/eap_vs_edge_patching_{s.name}.png)", ""]
    return "\n".join(parts).strip() + "\n"
