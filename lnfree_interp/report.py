"""One report comparing models side by side on the paper's findings (arXiv 2507.02559, section 5).

[`compare_models`][lnfree_interp.compare_models] runs every analysis on each model - held-out loss with its outliers,
calibration (ECE), output divergence from the first model, attention sinks and first-token residual
norms, entropy neurons, DLA vs the true direct effect, attribution vs activation patching - and
returns a `ModelComparison` whose `ModelComparison.save` writes one offline HTML page
(figures embedded as PNG, no JavaScript), a Markdown summary and the PNG figures. Every choice
(text, windows, threshold, bins, resamples, null-space size, prompts) is an argument and is printed
in the report. ``lnfree-interp compare`` is the command-line front end.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LNFreeError

#: the trio shipped with the package: with LayerNorm, vanilla fine-tune, LN-free fine-tune
EMBEDDED_TRIO = ("tiny-shakespeare", "tiny-shakespeare-vanilla", "tiny-shakespeare-lnfree")
#: marker pair around the generated table in a Markdown file (see `update_markdown_block`)
MARKER = "lnfree-compare"


@dataclass
class ModelComparison:
    """The result of [`compare_models`][lnfree_interp.compare_models].

    Attributes:
        table: ``pandas.DataFrame``: one row per figure (``figure``, ``unit``), one column per model,
            values formatted as text (the numbers are in ``results``).
        settings: every choice the figures depend on (text, windows, threshold, bins, ...).
        results: per model label, the analysis objects (``loss``, ``calibration``, ``divergence``,
            ``sinks``, ``norms``, ``scores``, ``ablation``, ``dla``, ``atp``).
        figures: name -> ``matplotlib.figure.Figure``.
        timings: seconds per step.
    """

    table: Any
    settings: dict[str, Any]
    results: dict[str, dict[str, Any]]
    figures: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_markdown(self, figure_dir: str | None = None) -> str:
        """The table and the settings as Markdown (with links to the figures under ``figure_dir``)."""
        lines = [markdown_table(self.table), "", "Settings: " + "; ".join(
            f"{k} = {v}" for k, v in self.settings.items()) + "."]
        if figure_dir is not None:
            lines += ["", "Figures: " + ", ".join(f"[{n}]({figure_dir}/{n}.png)" for n in self.figures)]
        return "\n".join(lines)

    def png_bytes(self) -> dict[str, bytes]:
        """Each figure rendered once as PNG bytes."""
        import io

        out = {}
        for name, fig in self.figures.items():
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            out[name] = buf.getvalue()
        return out

    def to_html(self, pngs: dict[str, bytes] | None = None) -> str:
        """A self-contained HTML page: the table, the settings, every figure as an inline PNG (no
        JavaScript, nothing fetched)."""
        import base64

        pngs = self.png_bytes() if pngs is None else pngs
        parts = [f"<h1>{html.escape(TITLE)}</h1>",
                 self.table.to_html(index=False, border=0, classes="figures", escape=True),
                 "<h2>Settings</h2><ul>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
                                                   for k, v in self.settings.items()) + "</ul>"]
        for name, data in pngs.items():
            parts.append(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
                         f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(TITLE)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")

    def save(self, out: str | Path) -> list[Path]:
        """Write ``report.html`` (offline, figures inline), ``report.md`` and ``{figure}.png`` to ``out``.

        Raises:
            LNFreeError: ``out`` is an existing file.
        """
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise LNFreeError(f"{out} is an existing file; pass a directory (it is created if missing).")
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        pngs = self.png_bytes()
        for name, data in pngs.items():
            (out / f"{name}.png").write_bytes(data)
            paths.append(out / f"{name}.png")
        (out / "report.md").write_text(f"# {TITLE}\n\n" + self.to_markdown(".") + "\n")
        (out / "report.html").write_text(self.to_html(pngs))
        return [out / "report.html", out / "report.md", *paths]

    def __repr__(self) -> str:
        return self.table.to_string(index=False)


TITLE = "LN-free vs LayerNorm models: the paper's findings side by side"


def markdown_table(frame) -> str:
    """A ``pandas.DataFrame`` of strings as a GitHub Markdown table."""
    cols = [str(c) for c in frame.columns]
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(rows)


def update_markdown_block(path: str | Path, content: str, marker: str = MARKER) -> None:
    """Replace the text between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->`` in ``path``.

    Raises:
        LNFreeError: the file lacks the markers.
    """
    path = Path(path)
    text = path.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text or text.index(start) > text.index(end):
        raise LNFreeError(f"{path} has no '{start}' ... '{end}' block to replace; add the two lines first.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{content.strip()}\n{end}{tail}")


def _load(sources: Any, dtype: Any) -> tuple[list[str], list[Any]]:
    from .checkpoints import inspect_checkpoint
    from .loaders import load_hf

    if isinstance(sources, dict):
        labels, items = [str(k) for k in sources], list(sources.values())
    else:
        items = [sources] if isinstance(sources, (str, Path)) else list(sources)
        labels = [str(s) if isinstance(s, (str, Path)) else
                  str(getattr(getattr(s, "config", None), "name_or_path", "") or f"model {i}")
                  for i, s in enumerate(items)]
    if not items:
        raise LNFreeError("compare_models needs at least one model (a source or a loaded model).")
    if len(set(labels)) != len(labels):
        raise LNFreeError(f"Model labels {labels} repeat; pass a dict {{label: model}}.")
    models = []
    for item in items:
        if isinstance(item, (str, Path)):
            item = load_hf(item, dtype=dtype, expect_lnfree=inspect_checkpoint(item).lnfree)
        models.append(item)
    return labels, models


def _prompts_from_text(model: Any, text: str, n: int, length: int, seed: int):
    """``n`` windows of ``length`` tokens from ``text`` with the true next token as the answer and the
    model's most likely other token as the wrong answer."""
    from .analyses import token_windows
    from .backends import get_backend

    stream = token_windows(model, text, seq_len=length + 1).flatten().cpu()
    if stream.numel() < length + 2:
        raise LNFreeError(f"The text is too short for DLA prompts of {length} tokens.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length - 1, (n,), generator=gen).tolist()
    windows = torch.stack([stream[s: s + length] for s in starts])
    answers = torch.stack([stream[s + length] for s in starts])
    backend = get_backend(model)
    with torch.no_grad():
        logits = backend.forward(windows.to(backend.device), None)[:, -1].clone()
    logits[torch.arange(n), answers.to(logits.device)] = -float("inf")
    return windows, answers, logits.argmax(-1).cpu()


def compare_models(
    models: Any = EMBEDDED_TRIO,
    *,
    text: str | None = None,
    prompts: Any = None,
    max_tokens: int | None = 4096,
    seq_len: int | None = None,
    threshold: float = 0.3,
    n_bins: int = 10,
    n_boot: int = 1000,
    k_null: int | None = None,
    top_neurons: int = 5,
    n_dla_prompts: int = 24,
    dla_prompt_len: int = 32,
    dtype: Any = torch.float64,
    progress: bool = True,
) -> ModelComparison:
    """Run the paper's analyses on each model and tabulate them side by side.

    The first model is the reference for the divergences (JSD, KL). Loads sources with
    [`load_hf`][lnfree_interp.load_hf] in ``dtype`` (LN-free or not detected from the checkpoint).

    Args:
        models: sources (Hub ids / aliases, directories, embedded names), loaded models, or a dict
            ``{label: model}``; default the embedded trio.
        text: evaluation text (default: the held-out tiny-shakespeare sample shipped with the package;
            the paper uses The Pile).
        prompts: `IOIPrompts` for attribution vs activation patching (default
            ``ioi_prompts(first model, n=8)``).
        max_tokens: tokens of ``text`` used by the text-level analyses (default 4096; ``None``: all).
        seq_len: window length (default ``min(512, n_ctx)``).
        threshold: attention-sink threshold (paper: 0.3).
        n_bins: ECE bins (paper: 10).
        n_boot: ECE bootstrap resamples (paper: 10,000; 1,000 here to keep the report fast).
        k_null: effective null-space size for entropy neurons (default ``d_model // 64``).
        top_neurons: entropy-neuron candidates mean-ablated per model.
        n_dla_prompts: text windows for DLA vs direct effect.
        dla_prompt_len: their length in tokens.
        dtype: dtype for loading sources (float64: DLA = DE to ~1e-13 LN-free).
        progress: print each step with its time.

    Returns:
        [`ModelComparison`][lnfree_interp.ModelComparison] (``.save(dir)`` writes the HTML page, Markdown and PNGs).

    Raises:
        LNFreeError: models with different vocabularies or tokenizers, a text shorter than one
            window, a threshold outside (0, 1), and whatever the analyses raise.
    """
    from . import (
        activation_patching,
        attribution_patching,
        compare_attribution,
        compare_dla_direct_effect,
        evaluate_loss,
        ioi_prompts,
        logit_diff,
    )
    from .analyses import (
        calibration,
        check_same_vocabulary,
        entropy_neuron_scores,
        first_token_analysis,
        neuron_ablation,
        output_divergence,
        unembedding_spectrum,
    )
    from .analyses.windows import DEFAULT_SEQ_LEN, LOGIT_BUDGET, check_fraction
    from .backends import get_backend
    from .registry import EMBEDDED_DIR

    check_fraction(threshold, "threshold")
    t_start = time.perf_counter()
    labels, loaded = _load(models, dtype)
    for other in loaded[1:]:
        check_same_vocabulary(loaded[0], other)
    text_name = "held-out tiny-shakespeare sample (shipped)" if text is None else f"{len(text)} characters given"
    text = (EMBEDDED_DIR / "heldout.txt").read_text() if text is None else text
    if prompts is None:
        prompts = ioi_prompts(loaded[0], n=8)
    dla_inputs = _prompts_from_text(loaded[0], text, n_dla_prompts, dla_prompt_len, seed=0)
    steps = ["loss", "calibration", "divergence", "sinks and norms", "entropy neurons", "DLA vs DE", "AtP"]
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {"load": time.perf_counter() - t_start}
    total = len(steps) * len(loaded)
    i = 0
    for label, model in zip(labels, loaded):
        backend = get_backend(model)
        res: dict[str, Any] = {"lnfree": backend.lnfree}
        seq = min(DEFAULT_SEQ_LEN, backend.n_ctx) if seq_len is None else seq_len  # one window length for all
        opts = {"seq_len": seq, "max_tokens": max_tokens, "progress": False}
        for step in steps:
            i += 1
            if progress:
                print(f"[{i}/{total}] {label}: {step} ...", end="", flush=True)
            t0 = time.perf_counter()
            if step == "loss":
                res["loss"] = evaluate_loss(model, text, seq_len=seq, max_tokens=max_tokens, progress=False,
                                            return_per_token=True,
                                            batch_size=max(1, LOGIT_BUDGET // (seq * backend.d_vocab)))
            elif step == "calibration":
                res["calibration"] = calibration(model, text, n_bins=n_bins, n_boot=n_boot, **opts)
            elif step == "divergence":
                res["divergence"] = (None if model is loaded[0] else
                                     output_divergence(loaded[0], model, text, **opts))
            elif step == "sinks and norms":
                res["sinks"], res["norms"] = first_token_analysis(model, text, threshold=threshold, **opts)
            elif step == "entropy neurons":
                res["scores"] = entropy_neuron_scores(model, k_null=k_null)
                res["spectrum"] = unembedding_spectrum(model)[0].numpy()
                res["ablation"] = neuron_ablation(model, text, res["scores"]["index"].tolist()[:top_neurons],
                                                  return_per_token=True, **opts)
            elif step == "DLA vs DE":
                res["dla"] = compare_dla_direct_effect(model, *dla_inputs)
            else:
                metric = logit_diff(prompts.answers, prompts.wrongs)
                atp = attribution_patching(model, prompts.clean, prompts.corrupted, metric, nodes="head",
                                           per_position=False)
                act = activation_patching(model, prompts.clean, prompts.corrupted, metric, nodes="head",
                                          progress=False)
                res["atp"] = compare_attribution(atp, act)
            timings[f"{label}: {step}"] = time.perf_counter() - t0
            if progress:
                print(f" {timings[f'{label}: {step}']:.1f} s", flush=True)
        results[label] = res
    backend = get_backend(loaded[0])
    settings = {
        "text": text_name, "tokens used": "all" if max_tokens is None else max_tokens,
        "window (seq_len)": seq_len or min(512, backend.n_ctx), "sink threshold": threshold,
        "ECE bins": f"{n_bins} equal-width", "ECE bootstrap resamples": n_boot,
        "null-space size k_null": k_null or f"default d_model // 64 = {max(1, backend.d_model // 64)}",
        "entropy neurons ablated": f"top {top_neurons} by null-space norm, mean ablation",
        "DLA prompts": f"{n_dla_prompts} windows of {dla_prompt_len} tokens (answer: next token, wrong: first "
                       "model's top other token)",
        "patching prompts": f"{len(prompts)} IOI-style pairs, metric logit difference, all heads",
        "divergence reference": labels[0], "dtype": str(dtype).replace("torch.", ""),
    }
    from .report_figures import make_figures

    table = build_table(labels, results, threshold, n_bins)
    figures = make_figures(labels, results, threshold)
    timings["total"] = time.perf_counter() - t_start
    if progress:
        print(f"done in {timings['total']:.0f} s", flush=True)
    return ModelComparison(table=table, settings=settings, results=results, figures=figures, timings=timings)


def _f(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2g}"


def build_table(labels: list[str], results: dict[str, dict[str, Any]], threshold: float, n_bins: int):
    """The side-by-side table: one row per figure, one column per model (strings)."""
    import pandas as pd

    rows: list[tuple[str, str, list[str]]] = []

    def row(name: str, unit: str, fn) -> None:
        rows.append((name, unit, [fn(results[m]) for m in labels]))

    row("LayerNorm", "", lambda r: "none (LN-free)" if r["lnfree"] else "yes")
    row("CE loss mean", "nats", lambda r: _f(r["loss"].mean))
    row("CE loss median", "nats", lambda r: _f(r["loss"].median))
    row("CE 99.9% range", "nats", lambda r: f"{_f(r['loss'].range_999[0], 3)}–{_f(r['loss'].range_999[1], 2)}")
    row(f"ECE ({n_bins} bins) [95% CI]", "prob.",
        lambda r: f"{_f(r['calibration'].ece)} [{_f(r['calibration'].ci[0])}, {_f(r['calibration'].ci[1])}]")
    row("top-1 accuracy", "", lambda r: _f(r["calibration"].accuracy))
    row("mean entropy", "nats", lambda r: _f(r["calibration"].mean_entropy))
    row(f"JSD vs {labels[0]}", "nats", lambda r: "–" if r["divergence"] is None else _f(r["divergence"].jsd))
    row(f"KL({labels[0]} ‖ model)", "nats",
        lambda r: "–" if r["divergence"] is None else _f(r["divergence"].kl_ab))
    row(f"sink rate, all layers (threshold {threshold})", "share",
        lambda r: _f(r["sinks"].overall_sink_rate, 3))
    row(f"heads with mean attention to pos 0 > {threshold}", "share",
        lambda r: _f(float(r["sinks"].sink_heads.mean()), 3))

    def first_norm(r) -> str:
        n = r["norms"]
        k = int(n["first"].idxmax())
        return f"{n['first'][k]:.1f} ({n['hook'][k].replace('blocks.', 'L').replace('.hook_', ' ')})"

    row("first-token residual norm, max over layers", "resid.", first_norm)
    row("other tokens' residual norm, same layer", "resid.",
        lambda r: f"{r['norms']['rest'][int(r['norms']['first'].idxmax())]:.1f}")
    row("top entropy-neuron candidate (null fraction)", "",
        lambda r: f"{r['scores']['neuron'][0]} ({_f(r['scores']['null_fraction'][0], 3)})")
    row("its median |ΔH| under mean ablation", "nats", lambda r: _f(r["ablation"].table["median_abs_dH"][0]))
    row("max median |ΔH| over the ablated candidates", "nats",
        lambda r: _f(float(r["ablation"].table["median_abs_dH"].max())))
    row("DLA vs direct effect NMAE (heads) [95% CI]", "%",
        lambda r: f"{r['dla'].nmae:.3g} [{r['dla'].ci[0]:.3g}, {r['dla'].ci[1]:.3g}]")
    row("AtP vs activation patching: Pearson r", "", lambda r: _f(r["atp"].stats["pearson"], 3))
    row("AtP vs activation patching: NMAE", "%", lambda r: f"{r['atp'].nmae:.3g}")
    frame = pd.DataFrame([[name, unit, *vals] for name, unit, vals in rows], columns=["figure", "unit", *labels])
    return frame
