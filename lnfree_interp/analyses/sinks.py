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
    batch_size: int = 8,
    progress: bool = True,
) -> SinkReport:
    """Attention-sink rate per layer and each head's mean attention to position 0, on a text.

    Args:
        model: anything the loaders return (LN baselines included); any backend with
            ``blocks.{l}.attn.hook_pattern``.
        text: a string or 1-D token ids, cut into windows as :func:`token_windows` does.
        threshold: attention weight above which a (head, query) pair or a head counts as a sink
            (paper: 0.3), in (0, 1).
        seq_len: window length (default ``min(512, n_ctx)``; the authors use 512).
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass.
        progress: tqdm bar over batches.

    Returns:
        :class:`SinkReport` (``first_attention [layer, head]``, ``sink_rate [layer]``, ``sink_heads [layer]``).

    Raises:
        LNFreeError: ``threshold`` outside (0, 1); a text shorter than one window; a backend without
            attention-pattern hooks.
    """
    threshold = check_fraction(threshold, "threshold")
    backend = get_backend(model)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(backend.n_layers)]
    _need_hooks(backend, names, "attention_sinks")
    windows = token_windows(backend, text, seq_len=seq_len, max_tokens=max_tokens)
    L, H, T = backend.n_layers, backend.n_heads, windows.shape[1]
    first = torch.zeros(L, H, dtype=torch.float64)  # sum over windows and queries 1..T-1
    above = torch.zeros(L, dtype=torch.float64)  # count of (window, head, query) pairs above threshold

    def keep(layer: int):
        def fn(pattern: Tensor) -> None:
            col = pattern[..., 0].detach().double().cpu()  # [b, head, query]
            first[layer] += col[..., 1:].sum((0, 2))
            above[layer] += (col > threshold).sum()
        return fn

    with torch.no_grad(), eval_mode(backend):
        for x in batches(windows, batch_size, "attention sinks", progress):
            with backend.hooks({n: keep(i) for i, n in enumerate(names)}):
                backend.forward(x, None)
    n = windows.shape[0]
    first_attention = first / (n * (T - 1)) if T > 1 else first
    return SinkReport(first_attention=first_attention, sink_rate=above / (n * H * T),
                      sink_heads=(first_attention > threshold).double().mean(-1), threshold=threshold,
                      n_windows=n, seq_len=T)


def residual_norms(
    model: Any,
    text: str | Int[Tensor, "n"],
    *,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
):
    """L2 norm of the residual stream per layer at position 0 vs the other positions, on a text.

    Rows: ``blocks.{l}.hook_resid_pre`` for every layer (layer 0's is the embedding plus the
    position embedding) and the last ``blocks.{L-1}.hook_resid_post`` (what the unembedding reads).
    Norms are of the stream as the model computes it (the fold leaves writers alone unless
    ``center_writing_weights`` was asked for, which removes the stream's mean component).

    Args:
        model: anything the loaders return (LN baselines included); any backend.
        text: a string or 1-D token ids, cut into windows as :func:`token_windows` does.
        seq_len: window length (default ``min(512, n_ctx)``).
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass.
        progress: tqdm bar over batches.

    Returns:
        ``pandas.DataFrame``, one row per hook: ``hook``, ``layer``, ``first`` (mean norm at position
        0), ``rest`` (mean norm at positions 1..T-1), ``ratio`` (``first / rest``); residual-stream units.

    Raises:
        LNFreeError: a text shorter than one window (or ``seq_len < 2``).
    """
    import pandas as pd

    backend = get_backend(model)
    L = backend.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    windows = token_windows(backend, text, seq_len=seq_len, max_tokens=max_tokens)
    first = torch.zeros(len(names), dtype=torch.float64)
    rest = torch.zeros(len(names), dtype=torch.float64)

    def keep(i: int):
        def fn(resid: Tensor) -> None:
            norms = resid.detach().double().norm(dim=-1).cpu()  # [b, pos]
            first[i] += norms[:, 0].sum()
            rest[i] += norms[:, 1:].sum()
        return fn

    with torch.no_grad(), eval_mode(backend):
        for x in batches(windows, batch_size, "residual norms", progress):
            with backend.hooks({n: keep(i) for i, n in enumerate(names)}):
                backend.forward(x, None)
    n, T = windows.shape
    first, rest = first / n, rest / (n * (T - 1))
    return pd.DataFrame({"hook": names, "layer": list(range(L)) + [L - 1], "first": first.tolist(),
                         "rest": rest.tolist(), "ratio": (first / rest).tolist()})
