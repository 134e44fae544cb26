"""Turning user inputs (strings, token tensors, tokenizer batches, answers) into tensors.

One tokenization for every backend: a string becomes ``tokenizer(text)["input_ids"]`` (GPT-2's
tokenizer adds no BOS), plus a BOS in front only for TransformerLens models whose
``cfg.default_prepend_bos`` is set. Batches are right-padded with an attention mask; every position
argument is resolved per prompt against the mask, so ``pos=-1`` is each prompt's last real token for
left and right padding alike.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import LNFreeError


def get_tokenizer(model: Any) -> Any:
    for obj in (model, getattr(model, "_module", None)):
        tok = getattr(obj, "tokenizer", None)
        if tok is not None:
            return tok
    return None


def _prepend_bos(model: Any) -> bool:
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "_module", None), "cfg", None)
    return bool(getattr(cfg, "default_prepend_bos", False))


def tokenize(model: Any, texts: Sequence[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Token ids and attention mask (right-padded) for ``texts``.

    Raises:
        LNFreeError: the model has no tokenizer, or a text is empty.
    """
    tok = get_tokenizer(model)
    if tok is None:
        raise LNFreeError("This model has no tokenizer, so it cannot take strings; pass token ids "
                          "[batch, pos], or load it with tokenizer=....")
    bos = [tok.bos_token_id] if _prepend_bos(model) and tok.bos_token_id is not None else []
    rows = [bos + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for t, r in zip(texts, rows):
        if not r:
            raise LNFreeError(f"Text {t!r} has no tokens.")
    return pad(rows)


def pad(rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return tokens, mask


def prepare(backend: Any, inputs: Any, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(tokens [batch, pos], attention_mask [batch, pos])`` on the model's device, validated.

    ``inputs``: a string, a list of strings, token ids ``[pos]`` / ``[batch, pos]``, or a tokenizer
    batch (a mapping with ``input_ids`` and optionally ``attention_mask``).

    Raises:
        LNFreeError: empty inputs, token ids outside ``[0, d_vocab)``, sequences longer than
            ``n_ctx``, a mask of the wrong shape, with values other than 0/1, or with gaps.
    """
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise LNFreeError("A tokenizer batch must contain 'input_ids'.")
        attention_mask = inputs.get("attention_mask", attention_mask)
        inputs = inputs["input_ids"]
    if isinstance(inputs, str):
        inputs = [inputs]
    if type(inputs).__module__.startswith("datasets"):  # a Hugging Face datasets Column: its values, as a list
        inputs = list(inputs)
    if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
        raise LNFreeError("Empty inputs: pass at least one prompt.")
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs):
        if attention_mask is not None:
            raise LNFreeError("attention_mask is only meaningful with token ids, not strings.")
        tokens, mask = tokenize(backend.model, list(inputs))
    else:
        if isinstance(inputs, torch.utils.data.DataLoader):
            raise LNFreeError("This function takes one batch of prompts, not a DataLoader; the attribution "
                              "functions with a batch_size= argument stream DataLoaders.")
        try:
            tokens = torch.as_tensor(inputs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise LNFreeError(f"Cannot read inputs of type {type(inputs).__name__}: pass strings or token "
                              "ids [batch, pos].") from err
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise LNFreeError(f"Token ids must be integers, got {tokens.dtype}.")
        tokens = tokens.long()
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise LNFreeError(f"Token ids must have shape [batch, pos] with both > 0, got {tuple(tokens.shape)}.")
        if attention_mask is None:
            mask = torch.ones_like(tokens)
        else:
            mask = torch.as_tensor(attention_mask)
            if not bool(((mask == 0) | (mask == 1)).all()):  # before any cast: 0.5 must not become 0
                raise LNFreeError(f"attention_mask must hold only 0 and 1, got values {mask.unique().tolist()[:5]}.")
            mask = mask.long()
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != tokens.shape:
                raise LNFreeError(f"attention_mask has shape {tuple(mask.shape)} but tokens {tuple(tokens.shape)}.")
            if not bool(mask.bool().any(1).all()):
                raise LNFreeError("A prompt's attention_mask is all zeros (no real tokens).")
            padded = torch.nn.functional.pad(mask, (1, 0))  # pragma: no mutate (any zero columns first count alike)
            starts = (padded.diff(dim=1) == 1).sum(1)  # blocks of real tokens per prompt
            if bool((starts != 1).any()):
                rows = torch.nonzero(starts != 1).flatten().tolist()
                raise LNFreeError(f"attention_mask rows {rows[:5]} have gaps: each prompt's real tokens must be one "
                                  "contiguous block (left or right padding).")
    real = tokens[mask.bool()]
    if bool((real < 0).any()) or bool((real >= backend.d_vocab).any()):
        bad = real[(real < 0) | (real >= backend.d_vocab)][:5].tolist()
        raise LNFreeError(f"Token ids {bad} are outside the vocabulary [0, {backend.d_vocab}).")
    if tokens.shape[1] > backend.n_ctx:
        raise LNFreeError(f"Sequence length {tokens.shape[1]} exceeds the model's context n_ctx={backend.n_ctx}; "
                          "truncate the prompts.")
    tokens = tokens.masked_fill(~mask.bool(), 0)  # pragma: no mutate (padding ids are arbitrary: any valid id)
    return tokens.to(backend.device), mask.to(backend.device)


def positions(pos: Any, mask: Tensor) -> Int[Tensor, "batch"]:
    """Resolve ``pos`` (int or one int per prompt; negative counts from each prompt's last real
    token) to absolute indices ``[batch]``.

    Raises:
        LNFreeError: a position outside a prompt's real tokens, the wrong number of positions, or
            something that is not an int / ints.
    """
    import numpy as np

    batch = mask.shape[0]
    try:  # numpy arrays and pandas Series (whose index torch would trip on) as plain arrays
        pos_t = torch.as_tensor(np.array(pos) if hasattr(pos, "__array__") and not torch.is_tensor(pos) else pos)
    except (TypeError, ValueError, RuntimeError):
        pos_t = None
    if pos_t is None or pos_t.is_floating_point() or pos_t.dtype == torch.bool or pos_t.ndim > 1 or not pos_t.numel():
        raise LNFreeError(f"pos={pos!r}: pass an int (negative counts from each prompt's last real token) or "
                          "one int per prompt.")
    pos_t = pos_t.long().reshape(-1)
    if pos_t.numel() == 1:
        pos_t = pos_t.expand(batch)
    if pos_t.numel() != batch:
        raise LNFreeError(f"Got {pos_t.numel()} positions for {batch} prompts; pass one int or one per prompt.")
    pos_t = pos_t.to(mask.device)
    lengths = mask.sum(1)
    real_idx = torch.where(pos_t < 0, lengths + pos_t, pos_t)  # index among real tokens
    if bool(((real_idx < 0) | (real_idx >= lengths)).any()):
        raise LNFreeError(f"pos={pos} is outside the prompt(s) (real lengths {lengths.tolist()}).")
    # map the k-th real token to its column (handles left and right padding)
    cum = mask.long().cumsum(1) - 1
    hit = (cum == real_idx[:, None]) & mask.bool()
    return hit.float().argmax(1)


def as_list(token: Any, what: str = "answer") -> list:
    """A token spec (an id, a single-token string, or a list / 1-D tensor / array of them) as a list.

    Raises:
        LNFreeError: anything else (``None``, floats, a 2-D tensor...).
    """
    if torch.is_tensor(token) or hasattr(token, "__array__"):  # tensors, numpy arrays, pandas Series
        import numpy as np

        arr = token if torch.is_tensor(token) else np.array(token)  # a copy: pandas hands out read-only views
        if isinstance(arr, np.ndarray) and arr.dtype.kind in "OUS":  # strings: one per prompt, or one for all
            if arr.ndim > 1:
                raise LNFreeError(f"{what} must be one token per prompt: got an array of shape {arr.shape}; pass "
                                  "a 1-D array (or one string).")
            items = arr.tolist() if arr.ndim else [arr.item()]
        else:
            t = torch.as_tensor(arr)
            if t.is_floating_point() or t.dtype == torch.bool or t.ndim > 1:
                raise LNFreeError(f"{what} must be one token id per prompt: got a {t.dtype} tensor of shape "
                                  f"{tuple(t.shape)}; pass integer ids of shape [batch] (or one id).")
            items = t.reshape(-1).tolist()
    elif isinstance(token, (list, tuple)):  # 0-d integer tensors in a list read as their ids
        items = [int(x) if torch.is_tensor(x) and x.ndim == 0 and not x.is_floating_point() and x.dtype != torch.bool
                 else x for x in token]
    else:
        items = [token]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, numbers.Integral)):
            raise LNFreeError(f"{what}={item!r} ({type(item).__name__}) is not a token id or a single-token "
                              "string; pass e.g. ' Mary' or 5, or one per prompt.")
    return items


def token_ids(backend: Any, token: Any, batch: int, what: str) -> Int[Tensor, "batch"]:
    """One vocabulary id per prompt from ids or single-token strings.

    Raises:
        LNFreeError: a string that is not exactly one token (naming the split), an id outside the
            vocabulary, a count that is neither 1 nor ``batch``, or something that is neither.
    """
    ids = []
    for item in as_list(token, what):
        if isinstance(item, str):
            tok = get_tokenizer(backend.model)
            if tok is None:
                raise LNFreeError(f"{what}={item!r} is a string but the model has no tokenizer; pass a token id.")
            split = tok(item, add_special_tokens=False)["input_ids"]
            if len(split) != 1:
                pieces = [tok.decode([i]) for i in split]
                raise LNFreeError(f"{what}={item!r} is {len(split)} tokens {pieces}, not one. Use a single-token "
                                  "string (often with a leading space, e.g. ' Mary') or a token id.")
            ids.append(split[0])
        else:
            ids.append(int(item))
    return check_ids(ids, batch, backend.d_vocab, what).to(backend.device)


def check_ids(ids: Sequence[int], batch: int, d_vocab: int, what: str) -> Int[Tensor, "batch"]:
    """``ids`` as one id per prompt, checked against the vocabulary and the batch size."""
    out = torch.as_tensor(list(ids), dtype=torch.long)
    if bool(((out < 0) | (out >= d_vocab)).any()):
        raise LNFreeError(f"{what} ids {out.tolist()} are outside the vocabulary [0, {d_vocab}).")
    if out.numel() == 1:
        out = out.expand(batch)
    if out.numel() != batch:
        raise LNFreeError(f"Got {out.numel()} {what} tokens for {batch} prompts; pass one, or one per prompt.")
    return out


def pair_inputs(backend: Any, clean: Any, corrupted: Any, attention_mask: Tensor | None = None,
                corrupted_attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clean and corrupted prompts as ``(tokens, mask, c_tokens, c_mask)``, each ``[batch, pos]``.

    Raises:
        LNFreeError: different numbers of prompts or shapes, or a prompt pair whose token lengths / padding differ
            (patching swaps activations position by position).
    """
    tokens, mask = prepare(backend, clean, attention_mask)
    c_tokens, c_mask = prepare(backend, corrupted, corrupted_attention_mask)
    if tokens.shape[0] != c_tokens.shape[0]:
        raise LNFreeError(f"{tokens.shape[0]} clean prompt(s) but {c_tokens.shape[0]} corrupted: pass one corrupted "
                          "prompt per clean prompt.")
    if tokens.shape != c_tokens.shape:
        raise LNFreeError(f"clean and corrupted inputs have different shapes {tuple(tokens.shape)} vs "
                          f"{tuple(c_tokens.shape)}: patching needs prompt pairs of equal token length.")
    if not torch.equal(mask, c_mask):
        bad = [i for i in range(mask.shape[0]) if not torch.equal(mask[i], c_mask[i])]
        lengths = [(int(mask[i].sum()), int(c_mask[i].sum())) for i in bad[:3]]
        raise LNFreeError(f"Prompt pair(s) {bad[:5]} have different token lengths or padding (clean, corrupted: "
                          f"{lengths}): patching swaps activations position by position, so each corrupted prompt "
                          "must have exactly its clean prompt's token length.")
    return tokens, mask, c_tokens, c_mask


def prepare_count(backend: Any, inputs: Any, attention_mask: Tensor | None = None) -> int:
    """Number of prompts in ``inputs`` (without tokenizing a list of strings)."""
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    tokens, _ = prepare(backend, inputs, attention_mask)
    return len(tokens)
