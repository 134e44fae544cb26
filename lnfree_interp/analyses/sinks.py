"""First-token behaviour: attention sinks and residual-stream norms at position 0 vs the rest.

The paper (arXiv 2507.02559, section 5) finds that removing LayerNorm weakens the first-token
"attention sink" and shrinks the first token's residual-stream norm (GPT-2 small: ~3100 with LN,
~300 LN-free). The authors measure the sink rate of Gu et al. 2024 ("When attention sink emerges",
``utils.calculate_sink_rate``: the share of (head, query position) pairs whose attention to
position 0 exceeds ``eps = 0.3``, all query positions counted) and the L2 norm of the residual
stream per layer at the first position vs the others (``mech_interp/residual_stream/residual_norms.py``).

Both read TransformerLens hook names through the backend seam, so every backend works:
``blocks.{l}.attn.hook_pattern`` (``[batch, head, query_pos, key_pos]``) and
``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``. Windows never start with a BOS token (the
authors' setting): position 0 is an ordinary token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..backends import Backend, eval_mode, get_backend
from ..errors import LNFreeError
from .windows import batches, check_fraction, token_windows

#: the paper's sink threshold (authors' ``calculate_sink_rate(eps=0.3)``, after Gu et al. 2024)
SINK_THRESHOLD = 0.3


@dataclass(frozen=True)
class SinkReport:
    """Attention to position 0, per layer and head.

    Attributes:
        first_attention: ``[n_layers, n_heads]``: mean attention weight from query positions
            ``1..T-1`` to position 0 (query 0 can only attend to itself and is left out).
        sink_rate: ``[n_layers]``: Gu et al.'s sink rate per layer, the share of (head, query) pairs,
            all queries counted, whose attention to position 0 is above ``threshold`` (the authors').
        sink_heads: ``[n_layers]``: the share of heads whose ``first_attention`` is above ``threshold``.
        threshold: the threshold used, in (0, 1).
        n_windows: windows of ``seq_len`` tokens averaged over.
        seq_len: window length.
    """

    first_attention: Float[Tensor, "layer head"]
    sink_rate: Float[Tensor, "layer"]
    sink_heads: Float[Tensor, "layer"]
    threshold: float
    n_windows: int
    seq_len: int

    @property
    def overall_sink_rate(self) -> float:
        """Sink rate over all layers (the authors' single number)."""
        return float(self.sink_rate.mean())

    def to_dataframe(self):
        """One row per layer: ``layer``, ``sink_rate``, ``sink_heads``, ``max_first_attention``."""
        import pandas as pd

        return pd.DataFrame({"layer": range(len(self.sink_rate)), "sink_rate": self.sink_rate.tolist(),
                             "sink_heads": self.sink_heads.tolist(),
                             "max_first_attention": self.first_attention.max(-1).values.tolist()})


def _need_hooks(backend: Backend, names: list[str], what: str) -> None:
    missing = [n for n in names if n not in set(backend.hook_names())]
    if missing:
        raise LNFreeError(f"{what} needs the hook {missing[0]} (TransformerLens naming), which this {backend.name} "
                          "backend does not provide; load the model with another loader (load_hf, load_hooked).")


def attention_sinks(
    model: Any,
    text: str | Int[Tensor, "n"],
    *,
    threshold: float = SINK_THRESHOLD,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> SinkReport:
    """Attention-sink rate per layer and each head's mean attention to position 0, on a text.

    Args:
        model: anything the loaders return (LN baselines included); any backend with
            ``blocks.{l}.attn.hook_pattern``.
        text: a string or 1-D token ids, cut into windows as `token_windows` does.
        threshold: attention weight above which a (head, query) pair or a head counts as a sink
            (paper: 0.3), in (0, 1).
        seq_len: window length (default ``min(512, n_ctx)``; the authors use 512).
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass (default: logits of a batch under ~4M numbers).
        progress: tqdm bar over batches.

    Returns:
        `SinkReport` (``first_attention [layer, head]``, ``sink_rate [layer]``, ``sink_heads [layer]``).

    Raises:
        LNFreeError: ``threshold`` outside (0, 1); a text shorter than one window; a backend without
            attention-pattern hooks.
    """
    sinks, _ = _first_token_pass(model, text, threshold, seq_len, max_tokens, batch_size, progress, norms=False)
    return sinks


def residual_norms(
    model: Any,
    text: str | Int[Tensor, "n"],
    *,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
):
    """L2 norm of the residual stream per layer at position 0 vs the other positions, on a text.

    Rows: ``blocks.{l}.hook_resid_pre`` for every layer (layer 0's is the embedding plus the
    position embedding) and the last ``blocks.{L-1}.hook_resid_post`` (what the unembedding reads).
    Norms are of the stream as the model computes it (the fold leaves writers alone unless
    ``center_writing_weights`` was asked for, which removes the stream's mean component).

    Args:
        model: anything the loaders return (LN baselines included); any backend.
        text: a string or 1-D token ids, cut into windows as `token_windows` does.
        seq_len: window length (default ``min(512, n_ctx)``).
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass (default: logits of a batch under ~4M numbers).
        progress: tqdm bar over batches.

    Returns:
        ``pandas.DataFrame``, one row per hook: ``hook``, ``layer``, ``first`` (mean norm at position
        0), ``rest`` (mean norm at positions 1..T-1), ``ratio`` (``first / rest``); residual-stream units.

    Raises:
        LNFreeError: a text shorter than one window (or ``seq_len < 2``).
    """
    _, norms = _first_token_pass(model, text, None, seq_len, max_tokens, batch_size, progress, norms=True)
    return norms


def first_token_analysis(
    model: Any,
    text: str | Int[Tensor, "n"],
    *,
    threshold: float = SINK_THRESHOLD,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
):
    """`attention_sinks` and `residual_norms` from one forward pass per batch.

    Returns:
        ``(SinkReport, norms DataFrame)``, exactly what the two functions return.

    Raises:
        LNFreeError: as [`attention_sinks`][lnfree_interp.attention_sinks].
    """
    return _first_token_pass(model, text, threshold, seq_len, max_tokens, batch_size, progress, norms=True)


def _first_token_pass(model, text, threshold, seq_len, max_tokens, batch_size, progress, norms: bool):
    """One pass over the windows with the pattern hooks (``threshold`` given) and/or the residual
    hooks (``norms``); returns ``(SinkReport | None, DataFrame | None)``."""
    import pandas as pd

    want_sinks = threshold is not None
    if want_sinks:
        threshold = check_fraction(threshold, "threshold")
    backend = get_backend(model)
    L, H = backend.n_layers, backend.n_heads
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)] if want_sinks else []
    _need_hooks(backend, pattern_names, "attention_sinks")
    resid_names = ([f"blocks.{layer}.hook_resid_pre" for layer in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
                   if norms else [])
    windows = token_windows(backend, text, seq_len=seq_len, max_tokens=max_tokens)
    n, T = windows.shape
    first = torch.zeros(L, H, dtype=torch.float64)  # attention to position 0, summed over windows, queries 1..T-1
    above = torch.zeros(L, dtype=torch.float64)  # (window, head, query) pairs above threshold, all queries
    norm_first = torch.zeros(len(resid_names), dtype=torch.float64)
    norm_rest = torch.zeros(len(resid_names), dtype=torch.float64)

    def keep_pattern(layer: int):
        def fn(pattern: Tensor) -> None:
            col = pattern[..., 0].detach().double().cpu()  # [b, head, query]
            first[layer] += col[..., 1:].sum((0, 2))
            above[layer] += (col > threshold).sum()
        return fn

    def keep_resid(i: int):
        def fn(resid: Tensor) -> None:
            norm = resid.detach().double().norm(dim=-1).cpu()  # [b, pos]
            norm_first[i] += norm[:, 0].sum()
            norm_rest[i] += norm[:, 1:].sum()
        return fn

    hooks = {name: keep_pattern(i) for i, name in enumerate(pattern_names)}
    hooks.update({name: keep_resid(i) for i, name in enumerate(resid_names)})
    with torch.no_grad(), eval_mode(backend):
        for x in batches(windows, batch_size, "first-token analysis", progress, backend.d_vocab):
            with backend.hooks(hooks):
                backend.forward(x, None)
    sinks = frame = None
    if want_sinks:
        first_attention = first / (n * (T - 1))
        sinks = SinkReport(first_attention=first_attention, sink_rate=above / (n * H * T),
                           sink_heads=(first_attention > threshold).double().mean(-1), threshold=threshold,
                           n_windows=n, seq_len=T)
    if norms:
        norm_first, norm_rest = norm_first / n, norm_rest / (n * (T - 1))
        frame = pd.DataFrame({"hook": resid_names, "layer": list(range(L)) + [L - 1], "first": norm_first.tolist(),
                              "rest": norm_rest.tolist(), "ratio": (norm_first / norm_rest).tolist()})
    return sinks, frame
