"""Builders for nnsight models over the folded HF model and over TransformerLens models.

nnsight 0.8 has ``TransformersModel`` for HF models (it needs a tokenizer) and no successor of the
``UnifiedTransformer`` it removed in 0.4. `UnifiedModel` is that successor: an
``nnsight.NNsight`` over a ``HookedTransformer`` / ``TransformerBridge`` whose invokes batch
together (strings or token ids, right-padded with an attention mask), so TL hook points can be read
and edited by TL name inside a trace: ``model.blocks[0].attn.hook_z.output``.

For analysis the attribution functions unwrap nnsight models and hook the modules they wrap (see
[`backends`][lnfree_interp.backends]); nothing here is needed for that.
"""

from __future__ import annotations

import copy
from typing import Any

import nnsight
import torch
from torch import Tensor


def build_transformers_model(hf_model: torch.nn.Module, tokenizer: Any) -> Any:
    """``nnsight.TransformersModel`` over ``hf_model`` (given a copy of ``tokenizer``: nnsight edits
    it); without a tokenizer, which ``TransformersModel`` cannot do without, a `BatchedNNsight`
    that batches token-id invokes."""
    if tokenizer is None:
        return BatchedNNsight(hf_model)
    model = nnsight.TransformersModel(hf_model, tokenizer=copy.deepcopy(tokenizer))
    model._module.tokenizer = model.tokenizer
    return model


class BatchedNNsight(nnsight.NNsight):
    """An ``nnsight.NNsight`` whose invokes batch together (nnsight's generic class cannot).

    Each invoke takes a string, a list of strings, or token ids ``[pos]`` / ``[batch, pos]``; invokes
    are right-padded into one batch with an attention mask (right padding leaves the real tokens'
    positions and causal attention unchanged). Strings are tokenized with the wrapped model's
    tokenizer as everywhere in lnfree_interp. Over a TransformerLens model this is
    `UnifiedModel`.
    """

    def _rows(self, inputs: tuple) -> list[Tensor]:
        x = inputs[0] if inputs else None
        if x is None:
            return []
        if isinstance(x, str) or (isinstance(x, list) and x and isinstance(x[0], str)):
            from ..inputs import tokenize

            tokens, mask = tokenize(self._module, [x] if isinstance(x, str) else x)
            return [t[m.bool()] for t, m in zip(tokens, mask)]
        x = torch.as_tensor(x)
        return list(x if x.ndim > 1 else x[None])

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        return len(self._rows(inputs))

    def _batch(self, invokes: list, fn: Any) -> tuple:
        rows = [r for inputs, _ in invokes for r in self._rows(inputs)]
        if not rows:
            return invokes[0]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            mask[i, : len(r)] = 1
        kwargs = dict(invokes[0][1])
        kwargs["attention_mask"] = mask
        return (tokens,), kwargs


class UnifiedModel(BatchedNNsight):
    """nnsight over a TransformerLens model: the successor of nnsight's removed ``UnifiedTransformer``.

    TL hook points by TL name inside traces (``model.blocks[0].attn.hook_z.output``), several invokes
    per trace (see `BatchedNNsight`).
    """


def build_unified(tl_model: Any) -> UnifiedModel:
    return UnifiedModel(tl_model)
