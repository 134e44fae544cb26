"""Metrics for patching: callables on logits returning one value per prompt, padding-aware.

A metric is any callable ``metric(logits) -> [batch]`` on logits ``[batch, pos, d_vocab]``. The two
shipped here resolve single-token strings and positions against the model and the batch's
attention mask when a patching function binds them, so ``pos=-1`` is each prompt's last real token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import LNFreeError

Metric = Callable[[Tensor], Tensor]


class TokenMetric:
    """Base of `logit_diff` and `logprob`: reads each prompt's logits at one position."""

    #: linear in the logits (then AtP's direct part is exact on an LN-free model)
    linear = False

    def __init__(self, answer: Any, wrong: Any, pos: int | list[int]):
        self.answer, self.wrong, self.pos = answer, wrong, pos

    def take(self, start: int, stop: int, n: int) -> TokenMetric:
        """This metric for prompts ``start:stop`` of ``n`` (per-prompt tokens and positions cut alongside)."""
        from .streaming import take

        return type(self)(take(self.answer, start, stop, n), take(self.wrong, start, stop, n),
                          take(self.pos, start, stop, n))

    def bind(self, backend: Any, attention_mask: Tensor) -> Metric:
        """The metric for one batch: token strings resolved, positions resolved against the mask."""
        from .inputs import positions, token_ids

        batch = attention_mask.shape[0]
        pos = positions(self.pos, attention_mask)
        answer = token_ids(backend, self.answer, batch, "answer")
        wrong = None if self.wrong is None else token_ids(backend, self.wrong, batch, "wrong")
        return BoundMetric(lambda final: self._compute(final, answer, wrong), pos)

    def __call__(self, logits: Float[Tensor, "batch pos vocab"], attention_mask: Tensor | None = None) -> Tensor:
        """Evaluate directly on logits (token ids only; strings need `bind`)."""
        from .inputs import as_list, check_ids, positions

        batch, d_vocab = logits.shape[0], logits.shape[-1]
        wrong_list = [] if self.wrong is None else as_list(self.wrong, "wrong")
        if any(isinstance(t, str) for t in as_list(self.answer) + wrong_list):
            raise LNFreeError("This metric has string tokens: pass it to a patching function (which knows the "
                              "tokenizer), or use token ids.")
        mask = torch.ones(logits.shape[:2], dtype=torch.long, device=logits.device) if attention_mask is None \
            else attention_mask
        pos = positions(self.pos, mask)
        answer = check_ids(as_list(self.answer), batch, d_vocab, "answer").to(logits.device)
        wrong = None if self.wrong is None else check_ids(wrong_list, batch, d_vocab, "wrong").to(logits.device)
        return self._compute(logits[torch.arange(batch, device=logits.device), pos], answer, wrong)

    def _compute(self, final: Tensor, answer: Tensor, wrong: Tensor | None) -> Tensor:
        raise NotImplementedError


class BoundMetric:
    """A token metric bound to one batch: reads each prompt's logits at one position ``positions [batch]``.

    Called on full logits ``[batch, pos, vocab]`` like any metric; `selected` takes only the logits at
    ``positions`` (``[batch, 1, vocab]``), which `Backend.run` computes alone when given the positions
    (see `readout`).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], positions: Tensor):
        self.fn, self.positions = fn, positions

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return self.fn(logits[rows, self.positions.to(logits.device)])

    def selected(self, logits: Float[Tensor, "batch 1 vocab"]) -> Tensor:
        """The metric from the logits at ``positions`` only."""
        return self.fn(logits[:, 0])


def readout(metric: Metric, copies: int = 1) -> dict[str, Any]:
    """``Backend.run`` keyword arguments (``metric``, and ``positions`` where it pays) for a run whose logits
    serve only ``metric``: ``backend.run(tokens, mask, ..., **readout(f))``.

    A bound token metric reads one position per prompt, so the run unembeds those positions only
    (``positions`` repeated for ``copies`` stacked copies of the batch) and ``metric`` takes the
    ``[rows, 1, vocab]`` logits (apply it to each copy's rows). Any other metric: ``{"metric": metric}``,
    full logits.
    """
    if isinstance(metric, BoundMetric):
        return {"metric": metric.selected, "positions": metric.positions.repeat(copies)}
    return {"metric": metric}


class LogitDiff(TokenMetric):
    linear = True

    def _compute(self, final: Tensor, answer: Tensor, wrong: Tensor | None) -> Tensor:
        out = final.gather(1, answer[:, None])[:, 0]
        return out if wrong is None else out - final.gather(1, wrong[:, None])[:, 0]

    def __repr__(self) -> str:
        return f"logit_diff(answer={self.answer!r}, wrong={self.wrong!r}, pos={self.pos!r})"


class LogProb(TokenMetric):
    def _compute(self, final: Tensor, answer: Tensor, wrong: Tensor | None) -> Tensor:
        return final.log_softmax(-1).gather(1, answer[:, None])[:, 0]  # pragma: no mutate (-1 is 1 on [batch, vocab])

    def __repr__(self) -> str:
        return f"logprob(answer={self.answer!r}, pos={self.pos!r})"


def logit_diff(answer: Any, wrong: Any = None, pos: int | list[int] = -1) -> LogitDiff:
    """``logit[answer] - logit[wrong]`` at ``pos`` (``logit[answer]`` without ``wrong``), in logits.

    Args:
        answer: token id or single-token string, one shared or one per prompt.
        wrong: the same for the wrong answer (``None``: ``logit[answer]`` alone).
        pos: position, or one per prompt; negative counts from each prompt's last real token.

    Returns:
        A metric ``[batch, pos, d_vocab] -> [batch]``, linear in the logits.
    """
    return LogitDiff(answer, wrong, pos)


def logprob(answer: Any, pos: int | list[int] = -1) -> LogProb:
    """``log softmax(logits)[answer]`` at ``pos``, in nats (not linear in the logits).

    Args:
        answer: token id or single-token string, one shared or one per prompt.
        pos: position, or one per prompt; negative counts from each prompt's last real token.
    """
    return LogProb(answer, None, pos)


def bind_metric(metric: Any, backend: Any, mask: Tensor) -> Metric:
    """``metric`` as a function of logits alone: token metrics resolve their ids and positions for
    this model and attention mask; plain callables are used as they are.

    Raises:
        LNFreeError: ``metric`` is not callable.
    """
    if hasattr(metric, "bind"):
        return metric.bind(backend, mask)
    if not callable(metric):
        raise LNFreeError(f"metric must be callable on logits [batch, pos, vocab], got {type(metric).__name__}.")

    def plain(logits: Tensor) -> Tensor:
        try:
            return metric(logits)
        except (IndexError, RuntimeError) as e:  # a shape mismatch inside the user's callable
            if not any(w in str(e) for w in ("size", "shape", "index", "dimension")):
                raise
            raise LNFreeError(
                f"The metric failed on logits of shape {tuple(logits.shape)} ({type(e).__name__}: {e}). If it holds "
                "per-prompt tensors (answer ids, positions) for all prompts while the prompts run in batches "
                "(batch_size=, a DataLoader), each call sees only its batch: use logit_diff(answer, wrong) with "
                "per-prompt ids (cut alongside the prompts) or give the callable a take(start, stop, n) method."
            ) from e

    return plain
