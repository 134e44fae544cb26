"""Calibration and output agreement: expected calibration error, entropy, and the divergence
between two models' next-token distributions (arXiv 2507.02559, section 5: GPT-2 small ECE 0.0193
original / 0.0263 vanilla fine-tune / 0.0354 LN-free; JSD original vs LN-free 0.039 nats).

Conventions follow the authors' ``mech_interp/inference_analysis/analyse_models.py``: a token's
*confidence* is its top-1 probability, it is *correct* when the top-1 token is the next token; ECE
uses 10 equal-width bins on [0, 1] (``np.digitize`` on the edges, the last bin closed at 1) and
``sum_b n_b / N * |mean confidence_b - accuracy_b|``; the 95% interval is the percentile bootstrap
over tokens (the authors draw 10,000 resamples with seed 42). Entropies and divergences are in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..backends import eval_mode, get_backend
from ..errors import LNFreeError
from ..inputs import get_tokenizer
from .windows import batches, check_fraction, logits_of, token_windows

#: the paper's choices (authors' analysis code): equal-width bins, bootstrap resamples, seed
N_BINS = 10
N_BOOT = 10_000
SEED = 42


@dataclass(frozen=True)
class CalibrationReport:
    """Calibration of next-token prediction on a text.

    Attributes:
        ece: expected calibration error (probability units, 0-1).
        ci: percentile-bootstrap interval of ``ece`` at ``level`` (resampling tokens).
        accuracy: share of tokens whose top-1 prediction is the next token.
        mean_confidence: mean top-1 probability.
        mean_entropy: mean entropy of the next-token distribution (nats).
        median_entropy: its median (nats).
        n_tokens: scored tokens.
        n_bins, n_boot, level: the choices made.
        bins: ``pandas.DataFrame``: ``lower``, ``upper``, ``count``, ``confidence``, ``accuracy`` per bin.
        per_token: ``confidence``, ``correct`` and ``entropy`` per token ``[n]`` (when asked for).
    """

    ece: float
    ci: tuple[float, float]
    accuracy: float
    mean_confidence: float
    mean_entropy: float
    median_entropy: float
    n_tokens: int
    n_bins: int
    n_boot: int
    level: float
    bins: Any
    per_token: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        return (f"ECE {self.ece:.4f} ({100 * self.level:g}% CI {self.ci[0]:.4f}-{self.ci[1]:.4f}; {self.n_bins} "
                f"equal-width bins, {self.n_tokens} tokens), top-1 accuracy {self.accuracy:.4f}, "
                f"mean confidence {self.mean_confidence:.4f}, mean entropy {self.mean_entropy:.4f} nats")


def _bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    """Bin of each confidence: ``np.digitize(c, linspace(0, 1, n_bins + 1)) - 1`` clipped to
    ``[0, n_bins - 1]`` (bins ``[e_i, e_{i+1})``, the last one closed at 1)."""
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=confidence.device) / n_bins  # i / n exactly
    return (torch.bucketize(confidence.double(), edges, right=True) - 1).clamp(0, n_bins - 1)


def _ece_from_sums(count: Tensor, conf_sum: Tensor, correct_sum: Tensor) -> Tensor:
    """ECE from per-bin sums ``[..., n_bins]``: ``sum_b |conf_sum_b - correct_sum_b| / N``."""
    return (conf_sum - correct_sum).abs().sum(-1) / count.sum(-1)


def expected_calibration_error(
    confidence: Float[Tensor, "n"],
    correct: Bool[Tensor, "n"],
    *,
    n_bins: int = N_BINS,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = SEED,
) -> tuple[float, tuple[float, float], Any]:
    """Expected calibration error with equal-width bins and a percentile-bootstrap interval.

    ``ECE = sum_b (n_b / N) |mean confidence_b - accuracy_b|`` (Guo et al. 2017; the authors'
    ``calculate_ece_with_ci``).

    Args:
        confidence: predicted probability of the chosen class per sample ``[n]``, in [0, 1].
        correct: whether the chosen class was right ``[n]`` (bool or 0/1).
        n_bins: number of equal-width bins on [0, 1] (paper: 10).
        n_boot: bootstrap resamples of the samples (paper: 10,000); 0 for no interval (NaN).
        level: confidence level of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        ``(ece, (low, high), bins)`` with ``bins`` a DataFrame (``lower``, ``upper``, ``count``,
        ``confidence``, ``accuracy``; NaN for empty bins).

    Raises:
        LNFreeError: shapes differ, no samples, confidences outside [0, 1], ``n_bins < 1``,
            ``n_boot < 0``, ``level`` outside (0, 1).
    """
    import pandas as pd

    conf = torch.as_tensor(confidence).double().reshape(-1)
    corr = torch.as_tensor(correct).reshape(-1)
    if conf.numel() == 0 or conf.shape != corr.shape:
        raise LNFreeError(f"confidence and correct must be non-empty and of one shape, got {tuple(conf.shape)} "
                          f"and {tuple(corr.shape)}.")
    if bool(((conf < 0) | (conf > 1) | conf.isnan()).any()):
        raise LNFreeError("Confidences must be probabilities in [0, 1].")
    if int(n_bins) < 1 or int(n_boot) < 0:
        raise LNFreeError(f"n_bins={n_bins} must be at least 1 and n_boot={n_boot} at least 0.")
    level = check_fraction(level, "level")
    n_bins, n = int(n_bins), conf.numel()
    corr = corr.double()
    idx = _bin_index(conf, n_bins)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = torch.bincount(idx, weights=corr, minlength=n_bins)
    ece = float(_ece_from_sums(count, conf_sum, corr_sum))
    ci = (math.nan, math.nan)
    if n_boot > 0:
        gen = torch.Generator().manual_seed(int(seed))
        vals = []
        chunk = max(1, min(n_boot, 5_000_000 // n))
        for start in range(0, n_boot, chunk):
            rows = min(chunk, n_boot - start)
            draw = torch.randint(0, n, (rows, n), generator=gen)
            flat = (idx[draw] + n_bins * torch.arange(rows)[:, None]).reshape(-1)
            size = rows * n_bins
            sums = [torch.bincount(flat, weights=w, minlength=size).view(rows, n_bins)
                    for w in (None, conf[draw].reshape(-1), corr[draw].reshape(-1))]
            vals.append(_ece_from_sums(sums[0].double(), sums[1], sums[2]))
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        lo, hi = torch.quantile(torch.cat(vals), q).tolist()
        ci = (lo, hi)
    edges = (torch.arange(n_bins + 1, dtype=torch.float64) / n_bins).tolist()
    safe = count.clamp_min(1)
    bins = pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "count": count.long().tolist(),
                         "confidence": torch.where(count > 0, conf_sum / safe, math.nan).tolist(),
                         "accuracy": torch.where(count > 0, corr_sum / safe, math.nan).tolist()})
    return ece, ci, bins


def next_token_stats(model: Any, windows: Int[Tensor, "window pos"], *, batch_size: int | None = None,
                     progress: bool = True) -> dict[str, Tensor]:
    """Per scored token (every position but the last of each window): top-1 ``confidence``,
    ``correct`` (top-1 is the next token), ``entropy`` (nats) and ``ce`` (nats), each ``[n]``, float64."""
    backend = get_backend(model)
    out: dict[str, list[Tensor]] = {"confidence": [], "correct": [], "entropy": [], "ce": []}
    with torch.no_grad(), eval_mode(backend):
        for x in batches(windows, batch_size, "next-token statistics", progress, backend.d_vocab):
            logp = torch.log_softmax(logits_of(backend, x)[:, :-1], -1)
            target = x[:, 1:]
            top, arg = logp.max(-1)
            out["confidence"].append(top.exp().flatten().cpu())
            out["correct"].append((arg == target).flatten().cpu())
            out["entropy"].append(-(logp.exp() * logp).sum(-1).flatten().cpu())
            out["ce"].append(-logp.gather(-1, target[..., None])[..., 0].flatten().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def calibration(
    model: Any,
    text: str | Int[Tensor, "n"],
    *,
    n_bins: int = N_BINS,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    seed: int = SEED,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    return_per_token: bool = False,
    progress: bool = True,
) -> CalibrationReport:
    """Expected calibration error (with a bootstrap interval), accuracy and entropy of a model's
    next-token predictions on a text (arXiv 2507.02559, section 5; authors' ``analyse_models.py``).

    Args:
        model: anything the loaders return (LN baselines included); any backend.
        text: a string or 1-D token ids, cut into windows as `token_windows` does.
        n_bins: equal-width confidence bins (paper: 10).
        n_boot: bootstrap resamples over tokens (paper: 10,000).
        level: confidence level of the interval, in (0, 1).
        seed: seed of the bootstrap (paper: 42).
        seq_len: window length (default ``min(512, n_ctx)``).
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass (default: logits of a batch under ~4M numbers).
        return_per_token: keep ``confidence``, ``correct`` and ``entropy`` per token.
        progress: tqdm bar over batches.

    Returns:
        `CalibrationReport`.

    Raises:
        LNFreeError: a text shorter than one window, bad ``seq_len`` / ``n_bins`` / ``level``.
    """
    windows = token_windows(model, text, seq_len=seq_len, max_tokens=max_tokens)
    stats = next_token_stats(model, windows, batch_size=batch_size, progress=progress)
    ece, ci, bins = expected_calibration_error(stats["confidence"], stats["correct"], n_bins=n_bins,
                                               n_boot=n_boot, level=level, seed=seed)
    ent = stats["entropy"]
    return CalibrationReport(
        ece=ece, ci=ci, accuracy=float(stats["correct"].double().mean()),
        mean_confidence=float(stats["confidence"].mean()), mean_entropy=float(ent.mean()),
        median_entropy=float(ent.median()), n_tokens=ent.numel(), n_bins=int(n_bins), n_boot=int(n_boot),
        level=float(level), bins=bins,
        per_token={k: stats[k] for k in ("confidence", "correct", "entropy")} if return_per_token else {})


@dataclass(frozen=True)
class DivergenceReport:
    """Disagreement of two models' next-token distributions ``p`` (model A) and ``q`` (model B), in nats.

    Attributes:
        jsd: mean Jensen-Shannon divergence ``(KL(p||m) + KL(q||m)) / 2``, ``m = (p + q) / 2``.
        jsd_median: its median over tokens.
        kl_ab: mean ``KL(p || q)``.
        kl_ba: mean ``KL(q || p)``.
        top1_agreement: share of tokens where both models' top-1 tokens agree.
        n_tokens: scored tokens.
        per_token: ``jsd``, ``kl_ab``, ``kl_ba`` per token ``[n]`` (when asked for).
    """

    jsd: float
    jsd_median: float
    kl_ab: float
    kl_ba: float
    top1_agreement: float
    n_tokens: int
    per_token: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        return (f"JSD {self.jsd:.4f} nats (median {self.jsd_median:.4f}), KL(A||B) {self.kl_ab:.4f}, "
                f"KL(B||A) {self.kl_ba:.4f} nats, top-1 agreement {self.top1_agreement:.4f} "
                f"over {self.n_tokens} tokens")


def check_same_vocabulary(model_a: Any, model_b: Any) -> None:
    """Raise unless both models share one vocabulary (same size and, when both have tokenizers, the
    same token -> id map): divergences compare distributions over the same tokens.

    Raises:
        LNFreeError: different vocabulary sizes or tokenizers.
    """
    a, b = get_backend(model_a), get_backend(model_b)
    if a.d_vocab != b.d_vocab:
        raise LNFreeError(f"The models have different vocabularies ({a.d_vocab} vs {b.d_vocab} tokens): divergences "
                          "between next-token distributions need one shared tokenizer. Compare models of one family.")
    ta, tb = get_tokenizer(a.model), get_tokenizer(b.model)
    if ta is not None and tb is not None and ta.get_vocab() != tb.get_vocab():
        raise LNFreeError("The models' tokenizers map tokens to different ids: divergences between next-token "
                          "distributions need one shared tokenizer. Compare models of one family.")


def output_divergence(
    model_a: Any,
    model_b: Any,
    text: str | Int[Tensor, "n"],
    *,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    return_per_token: bool = False,
    progress: bool = True,
) -> DivergenceReport:
    """Jensen-Shannon divergence and both KL divergences between two models' next-token
    distributions on the same tokens (paper: JSD original vs LN-free GPT-2 small 0.039 nats).

    Computed exactly in float64 from log-probabilities (the authors add ``1e-8`` to every
    probability before renormalising; that changes the JSD by far less than its reported digits).
    The text is tokenized with model A's tokenizer; both models see the same windows.

    Args:
        model_a: a loaded model (``p``).
        model_b: a loaded model of the same vocabulary (``q``).
        text: a string or 1-D token ids.
        seq_len: window length (default ``min(512, n_ctx)`` of model A; must fit model B too).
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass (default: logits of a batch under ~4M numbers).
        return_per_token: keep the per-token divergences ``[n]``.
        progress: tqdm bar over batches.

    Returns:
        `DivergenceReport` (nats).

    Raises:
        LNFreeError: different vocabularies or tokenizers; a text shorter than one window; a window
            longer than either model's context.
    """
    check_same_vocabulary(model_a, model_b)
    a, b = get_backend(model_a), get_backend(model_b)
    seq_len = min(512, a.n_ctx, b.n_ctx) if seq_len is None else seq_len
    if int(seq_len) > b.n_ctx:
        raise LNFreeError(f"seq_len={seq_len} exceeds model B's context n_ctx={b.n_ctx}.")
    windows = token_windows(a, text, seq_len=seq_len, max_tokens=max_tokens)
    out: dict[str, list[Tensor]] = {"jsd": [], "kl_ab": [], "kl_ba": [], "agree": []}
    log2 = math.log(2.0)
    with torch.no_grad(), eval_mode(a), eval_mode(b):
        for x in batches(windows, batch_size, "divergence", progress, a.d_vocab):
            lp = torch.log_softmax(logits_of(a, x)[:, :-1], -1)
            lq = torch.log_softmax(logits_of(b, x.to(b.device))[:, :-1].to(lp.device), -1)
            p, q = lp.exp(), lq.exp()
            lm = torch.logaddexp(lp, lq) - log2
            kl = lambda pr, lpr, lo: (pr * (lpr - lo)).sum(-1)  # noqa: E731 (0 log 0 = 0: pr is exactly 0 there)
            out["jsd"].append((0.5 * (kl(p, lp, lm) + kl(q, lq, lm))).flatten().cpu())
            out["kl_ab"].append(kl(p, lp, lq).flatten().cpu())
            out["kl_ba"].append(kl(q, lq, lp).flatten().cpu())
            out["agree"].append((lp.argmax(-1) == lq.argmax(-1)).flatten().cpu())
    t = {k: torch.cat(v) for k, v in out.items()}
    return DivergenceReport(
        jsd=float(t["jsd"].mean()), jsd_median=float(t["jsd"].median()), kl_ab=float(t["kl_ab"].mean()),
        kl_ba=float(t["kl_ba"].mean()), top1_agreement=float(t["agree"].double().mean()),
        n_tokens=t["jsd"].numel(),
        per_token={k: t[k] for k in ("jsd", "kl_ab", "kl_ba")} if return_per_token else {})
