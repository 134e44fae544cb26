"""Held-out loss with the statistics the paper reports (mean, median, percentile ranges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import LNFreeError


@dataclass(frozen=True)
class LossReport:
    """Per-token cross-entropy statistics, in nats.

    ``range_95`` is the (2.5, 97.5) percentile pair, ``range_999`` the (0.05, 99.95) pair: the LN-free
    GPT-2 XL has mean 130 on The Pile but median 1.09 (arXiv 2507.02559, section 4), so the mean alone
    misleads.
    """

    mean: float
    median: float
    range_95: tuple[float, float]
    range_999: tuple[float, float]
    n_tokens: int
    per_token: Float[Tensor, "n"] | None = None

    def __str__(self) -> str:
        return (f"CE over {self.n_tokens} tokens (nats): mean {self.mean:.4f}, median {self.median:.4f}, "
                f"95% [{self.range_95[0]:.3f}, {self.range_95[1]:.3f}], "
                f"99.9% [{self.range_999[0]:.3f}, {self.range_999[1]:.3f}]")

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "median": self.median, "p2.5": self.range_95[0], "p97.5": self.range_95[1],
                "p0.05": self.range_999[0], "p99.95": self.range_999[1], "n_tokens": self.n_tokens}


def evaluate_loss(
    model: Any,
    text_or_tokens: str | Int[Tensor, "n"],
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    return_per_token: bool = False,
    progress: bool = True,
) -> LossReport:
    """Cross-entropy of next-token prediction on a text, for any loaded model (any backend, LN
    baselines included).

    The text is tokenized as one stream (no BOS) and cut into non-overlapping windows of
    ``seq_len`` tokens; every token after the first of a window is scored.

    Args:
        model: anything the loaders return.
        text_or_tokens: a string, or a 1-D tensor of token ids.
        seq_len: window length (default: the model's ``n_ctx``).
        batch_size: windows per forward pass.
        max_tokens: only use the first ``max_tokens`` tokens of the stream.
        return_per_token: keep the per-token losses ``[n]`` (nats) in the report.
        progress: show a tqdm bar when there is more than one batch.

    Returns:
        [`LossReport`][lnfree_interp.LossReport] (mean, median, 95% and 99.9% percentile ranges, in nats).

    Raises:
        LNFreeError: text without a tokenizer, a list of texts, non-integer ids, too few tokens,
            ``seq_len`` outside ``[2, n_ctx]``, ``batch_size < 1``.
    """
    from tqdm.auto import tqdm

    from .backends import eval_mode, get_backend
    from .inputs import get_tokenizer

    backend = get_backend(model)
    if isinstance(text_or_tokens, str):
        tok = get_tokenizer(backend.model)
        if tok is None:
            raise LNFreeError("evaluate_loss got text but the model has no tokenizer; pass token ids.")
        # verbose=False: no "Token indices sequence length is longer than..." (we cut windows)
        ids = tok(text_or_tokens, add_special_tokens=False, verbose=False)["input_ids"]
        stream = torch.as_tensor(ids, dtype=torch.long)
    elif isinstance(text_or_tokens, (list, tuple)) and any(isinstance(t, str) for t in text_or_tokens):
        raise LNFreeError("evaluate_loss takes one text (a string) or token ids; join several documents first, "
                          "e.g. '\\n\\n'.join(texts).")
    else:
        stream = torch.as_tensor(text_or_tokens)
        if stream.is_floating_point() or stream.dtype == torch.bool:
            raise LNFreeError(f"Token ids must be integers, got {stream.dtype}.")
        stream = stream.long().reshape(-1)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    seq_len = backend.n_ctx if seq_len is None else int(seq_len)
    if seq_len > backend.n_ctx or seq_len < 2:
        raise LNFreeError(f"seq_len={seq_len} must be between 2 and n_ctx={backend.n_ctx}.")
    if batch_size < 1:
        raise LNFreeError(f"batch_size={batch_size} must be at least 1.")
    n_windows = stream.numel() // seq_len
    if n_windows == 0:
        raise LNFreeError(f"Need at least seq_len={seq_len} tokens, got {stream.numel()}.")
    if bool((stream < 0).any()) or bool((stream >= backend.d_vocab).any()):
        raise LNFreeError(f"Token ids outside the vocabulary [0, {backend.d_vocab}).")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    losses = []
    starts = range(0, n_windows, batch_size)
    with torch.no_grad(), eval_mode(backend):
        for start in tqdm(starts, desc="evaluating", disable=not progress or len(starts) < 2, mininterval=1.0):
            x = windows[start : start + batch_size].to(backend.device)
            logits = backend.forward(x, None).double()
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            losses.append(ce.cpu())
    per_token = torch.cat(losses)
    q = torch.quantile(per_token, torch.tensor([0.025, 0.975, 0.0005, 0.9995], dtype=per_token.dtype)).tolist()
    return LossReport(
        mean=float(per_token.mean()), median=float(per_token.median()), range_95=(q[0], q[1]),
        range_999=(q[2], q[3]), n_tokens=per_token.numel(), per_token=per_token if return_per_token else None,
    )
