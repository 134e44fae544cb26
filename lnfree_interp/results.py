"""Result objects shared by DLA, direct effect, attribution patching and activation patching.

Labels follow TransformerLens conventions: ``L{l}H{h}`` (attention head), ``{l}_attn_bias``,
``{l}_attn_out``, ``{l}_mlp_out``, ``L{l}N{n}`` (MLP neuron), ``{l}_mlp_bias``, ``embed``,
``pos_embed``, ``{l}_resid_pre``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_LAYER = re.compile(r"^(?:L)?(\d+)[_N]")


#: relative tolerances by dtype for sums of attribution components (``assert_exact`` here and in
#: `patching`): rounding grows with the number of summands.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def label_layer(label: str) -> int | None:
    """Layer of a component label (``None`` for ``embed``, ``pos_embed``, ``unembed_bias``)."""
    m = _HEAD.match(label) or _LAYER.match(label)
    return int(m.group(1)) if m else None


@dataclass
class AttributionResult:
    """Per-component attributions of a metric, in logits (or the metric's units).

    Attributes:
        values: ``[component, batch]``, or ``[component, pos, batch]`` for per-position patching.
        labels: one per component (TransformerLens-style, see module doc).
        metric: ``[batch]``: the model's actual metric on the clean inputs.
        kind: ``"dla"``, ``"direct_effect"``, ``"atp"`` or ``"activation_patching"``.
        bias: ``[batch]``: the unembedding-bias term (``b_U[answer] - b_U[wrong]``, ``ln_f`` bias
            folded) for DLA, so that ``values.sum(0) + bias == metric``.
        exact: DLA equals the true direct effect (LN-free model; the direct path is linear).
        note: how to read the numbers (e.g. the LN-baseline approximation).
        direct: AtP only: the part through the node's direct path to the logits.
        indirect: AtP only: the rest, ``values - direct``.
        positions: per-position results: the sequence positions of ``values``' middle axis.
        n_layers: number of layers, for the layer x head heatmap.
        n_heads: number of heads per layer.
        extra: further per-kind data; a summary (``per_prompt=False``) holds ``n_prompts``, ``std``
            (``[component]``, over prompts, positions summed), for DLA ``max_sum_error`` and ``scale``
            (see `streaming.Running`), and its per-prompt tensors
            (``values``, ``metric``, ``bias``...) hold the mean over prompts, ``[..., 1]``.
    """

    values: Tensor
    labels: list[str]
    metric: Float[Tensor, "batch"]
    kind: str
    n_layers: int
    n_heads: int
    bias: Float[Tensor, "batch"] | None = None
    exact: bool = False
    note: str = ""
    direct: Tensor | None = None
    indirect: Tensor | None = None
    positions: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.labels) != self.values.shape[0]:
            raise ValueError(f"{len(self.labels)} labels for {self.values.shape[0]} components")

    # --- numbers -----------------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        """How many prompts the values describe (the batch axis, or a summary's count)."""
        return int(self.extra.get("n_prompts", self.values.shape[-1]))

    @property
    def per_prompt(self) -> bool:
        """Whether the last axis holds one value per prompt (``False`` for a ``per_prompt=False`` summary,
        whose last axis holds their mean)."""
        return "n_prompts" not in self.extra

    def total(self) -> Float[Tensor, "batch"]:
        """Sum over components (and positions) plus the bias term: equals ``metric`` for exact DLA."""
        total = self.values.flatten(0, -2).sum(0) if self.values.ndim > 2 else self.values.sum(0)
        return total + self.bias if self.bias is not None else total

    def assert_exact(self, rtol: float | None = None) -> None:
        """Raise unless these values are exact: an LN-free model's DLA (or a direct effect), whose
        components plus bias reproduce the metric to ``rtol`` relative to the size of the summands,
        max over the batch of sum |component| + |bias| (the scale floating-point rounding of a sum
        grows with; default 1e-10 in float64, 1e-5 in float32, 1e-2 in float16, 5e-2 in bfloat16:
        `TOLERANCE`). Relative to |metric| alone would fail
        spuriously on a near-zero logit difference. The direct effect and activation patching are
        measurements (ground truth by construction, no sum to check): they pass.

        Raises:
            LNFreeError: attribution patching (a first-order estimate, never exact); DLA of a model with
                LayerNorm (an approximation); or a sum that is off.
        """
        from .errors import LNFreeError

        if self.kind == "atp":
            raise LNFreeError("Attribution patching is a first-order (gradient) estimate of activation patching, "
                              "not exact on any model: measure its error with compare_attribution(atp_result, "
                              "activation_patching(...)).")
        if not self.exact:
            raise LNFreeError("This attribution comes from a model with LayerNorm: DLA freezes the final "
                              "LayerNorm scale and is only an approximation of the direct effect. Use an "
                              "LN-free checkpoint, or compare_dla_direct_effect to measure the error.")
        if self.kind == "dla":

            dtype = self.values.dtype
            rtol = rtol if rtol is not None else (1e-10 if dtype == torch.float64 else TOLERANCE.get(dtype, 1e-5))
            if self.per_prompt:
                err = float((self.total() - self.metric).detach().abs().max())
                scale = self.values.abs().flatten(0, -2).sum(0) if self.values.ndim > 2 else self.values.abs().sum(0)
                if self.bias is not None:
                    scale = scale + self.bias.detach().abs()
                ref = max(float(scale.max()), float(self.metric.abs().max()), 1e-30)
            else:  # a summary: the per-prompt figures recorded while streaming (its mean hides cancelling errors)
                err, ref = self.extra["max_sum_error"], max(self.extra["scale"], 1e-30)
            if err > rtol * ref:
                raise LNFreeError(f"DLA components sum to the metric only within {err:.3g} (relative "
                                  f"{err / ref:.3g} of the summands' scale > {rtol:g}).")

    def mean(self) -> Tensor:
        """Mean over the batch: ``[component]`` (or ``[component, pos]``)."""
        return self.values.mean(-1)

    def __getitem__(self, label: str) -> Tensor:
        """Values of one component by label."""
        try:
            return self.values[self.labels.index(label)]
        except ValueError:
            raise KeyError(f"No component {label!r}; labels look like {self.labels[:5]}") from None

    def head_matrix(self) -> Float[Tensor, "layer head"]:
        """Batch-mean (and position-sum) value of every head as a ``[n_layers, n_heads]`` grid."""
        grid = torch.full((self.n_layers, self.n_heads), float("nan"), dtype=torch.float64)
        mean = self.mean()
        if mean.ndim > 1:
            mean = mean.sum(-1)
        for i, label in enumerate(self.labels):
            m = _HEAD.match(label)
            if m:
                grid[int(m.group(1)), int(m.group(2))] = float(mean[i])
        return grid

    def to_dataframe(self):
        """Long-format ``pandas.DataFrame``: one row per component x prompt (x position).

        Columns: ``component``, ``layer``, ``head``, ``prompt``, (``pos``), ``value``, and for AtP
        ``direct`` and ``indirect``. DLA adds an ``unembed_bias`` row per prompt for the bias term.
        """
        import numpy as np
        import pandas as pd

        shape = tuple(self.values.shape)
        n_rest = int(np.prod(shape[1:]))
        heads = [int(m.group(2)) if (m := _HEAD.match(lab)) else None for lab in self.labels]
        cols: dict[str, Any] = {
            "component": np.repeat(np.array(self.labels, dtype=object), n_rest),
            "layer": np.repeat(np.array([label_layer(lab) for lab in self.labels], dtype=object), n_rest),
            "head": np.repeat(np.array(heads, dtype=object), n_rest),
            "prompt": np.tile(np.arange(shape[-1]), n_rest // shape[-1] * shape[0]) if self.per_prompt
            else f"mean of {self.n_prompts}",
        }
        if len(shape) == 3:
            pos = np.array(self.positions if self.positions else range(shape[1]))
            cols["pos"] = np.tile(np.repeat(pos, shape[-1]), shape[0])
        cols["value"] = self.values.detach().double().cpu().numpy().reshape(-1)
        if self.direct is not None:
            cols["direct"] = self.direct.detach().double().cpu().numpy().reshape(-1)
            cols["indirect"] = self.indirect.detach().double().cpu().numpy().reshape(-1)
        frame = pd.DataFrame(cols)
        if self.bias is not None:
            bias = self.bias.detach().double().cpu().numpy()
            prompt = np.arange(len(bias)) if self.per_prompt else f"mean of {self.n_prompts}"
            frame = pd.concat([frame, pd.DataFrame({"component": "unembed_bias", "layer": None, "head": None,
                                                    "prompt": prompt, "value": bias})],
                              ignore_index=True)
        return frame

    def top(self, k: int = 10):
        """The ``k`` components with the largest |batch-mean value| (positions summed), as a DataFrame.

        Raises:
            LNFreeError: ``k < 1``.
        """
        import pandas as pd

        from .errors import LNFreeError

        if int(k) < 1:
            raise LNFreeError(f"top(k={k}): k must be at least 1 (there are {len(self.labels)} components).")

        mean = self.mean().detach().double().cpu()
        if mean.ndim > 1:
            mean = mean.sum(-1)
        order = mean.abs().argsort(descending=True)[:k].tolist()
        table = {"component": [self.labels[i] for i in order], "mean": [float(mean[i]) for i in order]}
        values = self.values.detach().double().cpu()
        if self.n_prompts > 1:  # std over prompts; one prompt has none (no column of zeros)
            std = (values.sum(1) if values.ndim > 2 else values).std(-1) if self.per_prompt else self.extra["std"]
            table["std"] = [float(std[i]) for i in order]
        return pd.DataFrame(table)

    # --- figures (layout: lnfree_interp.figures) ----------------------------------------------
    def plot(self, title: str | None = None, units: str | None = None):
        """Interactive plotly figure: the layer x component heatmap (heads, attention bias, MLP; layer 0
        at the top; centred ``RdBu``; colour bar in ``units``, default logits for DLA), or a bar chart of
        the largest components for neuron-level results. ``title``: put the prompt and metric there
        (default: what the result records)."""
        from .figures import heatmap_plotly

        return heatmap_plotly(self, title, units)

    def figure(self, title: str | None = None, units: str | None = None):
        """The static version of `plot`: a matplotlib ``Figure`` (no pyplot state touched)."""
        from .figures import heatmap_figure

        return heatmap_figure(self, title, units)

    def save(self, path: str | Path, title: str | None = None, units: str | None = None, *,
             html: bool = False) -> list[Path]:
        """Write ``path.png`` (`figure`) and, with ``html=True``, ``path.html`` (`plot`, one
        self-contained page with plotly.js inside: opens offline, ~5 MB); returns the paths. Leaves
        pyplot's state (and a notebook's backend) alone."""
        from .figures import save_html, save_png

        paths = [save_png(self.figure(title, units), path)]
        if html:
            paths.append(save_html([self.plot(title, units)], Path(path).with_suffix(""), title=title or self.kind))
        return paths

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.values.shape)
        head = f"AttributionResult(kind={self.kind!r}, values [{shape}], exact={self.exact})"
        if not self.per_prompt:
            head += f"\n  the mean over {self.n_prompts} prompt{'s' * (self.n_prompts != 1)} (per_prompt=False)"
        return head + (f"\n  note: {self.note}" if self.note else "") + "\n" + self.top(5).to_string(index=False)


@dataclass
class Comparison:
    """Agreement between two attributions of the same components (see the two ``compare_*`` functions).

    Attributes:
        nmae: normalised mean absolute error ``100 * mean|a - b| / mean|b|`` in percent (``b`` the
            reference: the direct effect, or activation patching).
        ci: bootstrap 95% confidence interval of ``nmae`` (resampling prompts; NaN for one prompt).
        per_component: ``pandas.DataFrame`` with one row per component (``nmae`` per component, means).
        stats: further figures (correlations, sign agreement, normalised errors...).
        a: the estimate, flattened (AtP, or DLA).
        b: the reference, flattened (activation patching, or the direct effect).
        layers: each element's layer (for colouring).
        names: axis names of ``a`` and ``b``.
    """

    nmae: float
    ci: tuple[float, float]
    per_component: Any
    stats: dict[str, float]
    a: Tensor
    b: Tensor
    layers: Sequence[int | None]
    names: tuple[str, str]
    title: str = ""

    def __repr__(self) -> str:
        ci = "no CI from one prompt" if math.isnan(self.ci[0]) else f"95% CI {self.ci[0]:.3g}-{self.ci[1]:.3g}%"
        head = (f"Comparison({self.names[0]} vs {self.names[1]}): NMAE {self.nmae:.3g}% ({ci}) "
                f"= 100 * mean|a - b| / mean|b|")
        named = {"pearson": "Pearson r {:.3f}", "spearman": "Spearman rho {:.3f}",
                 "sign_agreement": "sign agreement {:.0%}", "max_abs_error": "max|a - b| {:.3g}"}
        parts = []
        for key, value in self.stats.items():
            if key == "nmae":  # the headline figure above
                continue
            if key == "normalised_mae":  # the paper's normalisation, in percent like NMAE
                parts.append(f"mean|a - b| / full-restoration effect {100 * value:.3g}%")
            else:
                parts.append(named[key].format(value) if key in named else f"{key} {value:.4g}")
        return head + ("\n  " + ", ".join(parts) if parts else "")

    def plot(self, title: str | None = None, units: str = "logits"):
        """Plotly scatter of ``a`` (y) against ``b`` (x), coloured by layer, with the y = x line; the
        agreement figures under the title; axes in ``units``."""
        from .figures import scatter_plotly

        return scatter_plotly(self, title, units)

    def figure(self, title: str | None = None, units: str = "logits"):
        """The static version of `plot`: a matplotlib ``Figure`` (no pyplot state touched)."""
        from .figures import scatter_figure

        return scatter_figure(self, title, units)

    def save(self, path: str | Path, title: str | None = None, units: str = "logits", *,
             html: bool = False) -> list[Path]:
        """Write ``path.png`` (`figure`) and, with ``html=True``, a self-contained ``path.html``."""
        from .figures import save_html, save_png

        paths = [save_png(self.figure(title, units), path)]
        if html:
            paths.append(save_html([self.plot(title, units)], Path(path).with_suffix(""),
                                   title=title or self.title or "comparison"))
        return paths


def nmae(a: Tensor, b: Tensor) -> float:
    """``100 * mean|a - b| / mean|b|`` (percent); 0 when both are zero."""
    denom = b.abs().mean()
    num = (a - b).abs().mean()
    if float(denom) == 0.0:
        return 0.0 if float(num) == 0.0 else float("inf")
    return float(100 * num / denom)


def check_bootstrap(n_boot: Any, seed: Any) -> None:
    """Raise `LNFreeError` unless ``n_boot`` is an integer >= 1 and ``seed`` an integer (numpy ints too)."""
    import numbers

    from .errors import LNFreeError

    for name, value, low in (("n_boot", n_boot, 1), ("seed", seed, None)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
            raise LNFreeError(f"{name}={value!r} must be an integer" + (f" >= {low}" if low is not None else "")
                              + " (bootstrap resamples over prompts, and their seed).")


def bootstrap_ci(a: Tensor, b: Tensor, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of `nmae` resampling the last axis (prompts) of ``[C, batch]``;
    ``(nan, nan)`` for a single prompt.

    Raises:
        LNFreeError: ``n_boot`` not an integer >= 1, or ``seed`` not an integer.
    """
    check_bootstrap(n_boot, seed)
    n_boot, seed = int(n_boot), int(seed)
    batch = a.shape[-1]
    if batch < 2:  # nothing to resample
        return (float("nan"), float("nan"))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, batch, (n_boot, batch), generator=gen)
    diffs = (a - b).abs()[..., idx].flatten(0, -3).mean(0).mean(-1)  # [n_boot]
    denom = b.abs()[..., idx].flatten(0, -3).mean(0).mean(-1)
    vals = 100 * diffs / denom.clamp_min(1e-300)
    lo, hi = torch.quantile(vals.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return (lo, hi)
