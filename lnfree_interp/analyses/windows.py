"""Cutting a text into the token windows every text-level analysis runs on.

The same convention as [`evaluate_loss`][lnfree_interp.evaluate_loss]: the text is tokenized as one stream (no
BOS) and cut into non-overlapping windows of ``seq_len`` tokens; the remainder is dropped. Position 0
of each window is therefore an ordinary token, as in the paper's Pile evaluation (the authors' data
loaders use ``prepend_bos=False``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ..backends import Backend, get_backend
from ..errors import LNFreeError
from ..inputs import get_tokenizer

#: default window length: the authors' entropy-neuron and sink-rate scripts use 512-token contexts;
#: models with a shorter context use their ``n_ctx``.
DEFAULT_SEQ_LEN = 512


def token_windows(
    model: Any,
    text: str | Int[Tensor, "n"],
    *,
    seq_len: int | None = None,
    max_tokens: int | None = None,
) -> Int[Tensor, "window seq_len"]:
    """Non-overlapping windows ``[n_windows, seq_len]`` of a text's tokens (on the model's device).

    Args:
        model: anything the loaders return (or a [`Backend`][lnfree_interp.backends.Backend]).
        text: a string, or a 1-D tensor / list of token ids.
        seq_len: window length; default ``min(512, n_ctx)``. Must lie in ``[2, n_ctx]``.
        max_tokens: use only the first ``max_tokens`` tokens of the stream.

    Raises:
        LNFreeError: no tokenizer for a string; non-integer or out-of-vocabulary ids; ``seq_len``
            outside ``[2, n_ctx]``; a text shorter than one window.
    """
    backend = get_backend(model)
    if isinstance(text, str):
        tok = get_tokenizer(backend.model)
        if tok is None:
            raise LNFreeError("Got a text but the model has no tokenizer; pass token ids instead.")
        stream = torch.as_tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    else:
        try:
            stream = torch.as_tensor(text)
        except (TypeError, ValueError) as err:
            raise LNFreeError(f"text must be a string or token ids, got {type(text).__name__}.") from err
        if stream.is_floating_point() or stream.dtype == torch.bool:
            raise LNFreeError(f"Token ids must be integers, got {stream.dtype}.")
        stream = stream.long().reshape(-1)
    if max_tokens is not None:
        if int(max_tokens) < 2:
            raise LNFreeError(f"max_tokens={max_tokens} must be at least 2.")
        stream = stream[: int(max_tokens)]
    seq_len = min(DEFAULT_SEQ_LEN, backend.n_ctx) if seq_len is None else int(seq_len)
    if not 2 <= seq_len <= backend.n_ctx:
        raise LNFreeError(f"seq_len={seq_len} must be between 2 and the model's n_ctx={backend.n_ctx}.")
    n = stream.numel() // seq_len
    if n == 0:
        raise LNFreeError(f"The text has {stream.numel()} tokens, shorter than one window of seq_len={seq_len}; "
                          "pass a longer text or a smaller seq_len.")
    if bool((stream < 0).any()) or bool((stream >= backend.d_vocab).any()):
        raise LNFreeError(f"Token ids outside the vocabulary [0, {backend.d_vocab}).")
    return stream[: n * seq_len].view(n, seq_len).to(backend.device)


#: default batch: as many windows as keep one batch's logits under this many numbers (32 MB in float64)
LOGIT_BUDGET = 2**22


def batches(windows: Tensor, batch_size: int | None, desc: str, progress: bool, d_vocab: int = 1) -> Iterator[Tensor]:
    """``windows`` in chunks of ``batch_size`` rows, with a tqdm bar when there is more than one.

    ``batch_size=None``: as many windows as keep ``rows x seq_len x d_vocab`` under
    `LOGIT_BUDGET` (at least one): 16 windows of the embedded models, one of GPT-2's 512 tokens.

    Raises:
        LNFreeError: ``batch_size < 1``.
    """
    from tqdm.auto import tqdm

    if batch_size is None:
        batch_size = max(1, LOGIT_BUDGET // (windows.shape[1] * max(1, int(d_vocab))))
    if int(batch_size) < 1:
        raise LNFreeError(f"batch_size={batch_size} must be at least 1.")
    starts = range(0, windows.shape[0], int(batch_size))
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, mininterval=1.0, leave=False):
        yield windows[start : start + int(batch_size)]


def check_fraction(value: float, name: str) -> float:
    """``value`` as a float strictly inside (0, 1).

    Raises:
        LNFreeError: anything else.
    """
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise LNFreeError(f"{name}={value!r} must be a number in (0, 1).") from None
    if not 0.0 < out < 1.0:
        raise LNFreeError(f"{name}={value} must lie strictly between 0 and 1.")
    return out


def logits_of(backend: Backend, tokens: Tensor) -> Tensor:
    """Logits ``[batch, pos, d_vocab]`` in float64 (no padding)."""
    return backend.forward(tokens, None).double()
