"""An exact logit lens and the attention-score decomposition into (query writer, key writer) pairs.

LN-free, each reader's input is exactly the sum of the writers before it (plus constant biases), so

* the logit lens after layer ``l`` - the residual stream read out through the unembedding - *is* the
  cumulative direct logit attribution of everything written up to ``l`` (no final-LayerNorm scale to
  guess: TransformerLens's ``logit_lens`` and ``accumulated_resid(apply_ln=True)`` use the scale of
  the layer's own residual, which the model never applies there);
* a head's pre-softmax attention score ``q . k * scale`` is bilinear in the writers:
  ``sum_{i, j} (w_i W_Q) . (w_j W_K) * scale`` plus bias terms, exactly. This shows K-composition:
  a previous-token head's output feeding an induction head's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .backends import get_backend
from .errors import LNFreeError
from .inputs import positions, prepare, token_ids
from .nodes import Node


@dataclass
class LensResult:
    """Logit-lens readouts per layer.

    Attributes:
        logits: ``[layer + 1, batch, d_vocab]`` readout after ``embed`` (row 0) and after each layer.
        labels: ``["embed", "0", "1", ...]`` (after layer l).
        metric: ``[layer + 1, batch]`` the logit difference (or logit) of the answer at each readout,
            ``None`` without an answer.
        exact: ``ln_final`` is the identity: each readout equals the cumulative DLA (tested).
    """

    logits: Tensor
    labels: list[str]
    metric: Tensor | None
    exact: bool

    def to_dataframe(self):
        """Batch-mean metric per readout (``after``, ``metric``) as a DataFrame."""
        import pandas as pd

        if self.metric is None:
            raise LNFreeError("This lens was computed without an answer; pass answer= (and wrong=).")
        m = self.metric.detach().double().cpu()
        return pd.DataFrame({"after": self.labels, "metric": m.mean(-1).tolist(), "std": m.std(-1).tolist()
                             if m.shape[-1] > 1 else [0.0] * len(self.labels)})

    def plot(self, title: str | None = None):
        """Metric against depth (matplotlib), one line per prompt and the mean."""
        import matplotlib.pyplot as plt

        df = self.to_dataframe()
        fig, ax = plt.subplots(figsize=(7, 4))
        m = self.metric.detach().double().cpu()  # type: ignore[union-attr]
        for row in m.T:
            ax.plot(range(len(self.labels)), row.tolist(), color="0.8", lw=0.8)
        ax.plot(range(len(self.labels)), df["metric"], color="tab:blue", lw=2, label="mean")
        ax.set_xticks(range(len(self.labels)), self.labels)
        ax.set_xlabel("readout after")
        ax.set_ylabel("logit difference (logits)")
        ax.set_title(title or f"Logit lens ({'exact, LN-free' if self.exact else 'LN model: approximate'})")
        ax.legend()
        fig.tight_layout()
        return fig


def logit_lens(
    model: Any,
    inputs: Any,
    answer: Any = None,
    wrong: Any = None,
    *,
    pos: int | list[int] = -1,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> LensResult:
    """The residual stream after ``embed`` and after each layer, read out through ``ln_final`` and the
    unembedding at position ``pos`` (the logit lens, nostalgebraist 2020; TL ``logit_lens``).

    LN-free the readout is linear: after layer ``l`` it equals ``b_U`` plus the direct logit
    attribution of every component up to ``l`` (``exact=True``); the last readout equals the model's
    logits. With LayerNorm each readout normalises by its own residual's scale (the usual lens), an
    approximation the model never computes.

    Args:
        model: anything the loaders return.
        inputs: prompts (strings, token ids ``[batch, pos]``).
        answer: optional token(s); with ``wrong``, ``metric`` is the logit difference in logits.
        wrong: optional wrong-answer token(s).
        pos: position per prompt (negative from each prompt's last real token).
        attention_mask: for padded token ids.

    Returns:
        `LensResult` (``logits [layer + 1, batch, d_vocab]``).

    Raises:
        LNFreeError: bad inputs, positions or answers (as `direct_logit_attribution`).
    """
    backend = get_backend(model)
    tokens, mask = prepare(backend, inputs, attention_mask)
    pos_idx = positions(pos, mask)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    L = backend.n_layers
    names = ["hook_embed", "hook_pos_embed"] + [f"blocks.{layer}.hook_resid_post" for layer in range(L)]
    with torch.no_grad():
        run = backend.run(tokens, mask, capture={n: (lambda a: a[rows, pos_idx]) for n in names})
        resid = [run.acts["hook_embed"] + run.acts["hook_pos_embed"]]
        resid += [run.acts[f"blocks.{layer}.hook_resid_post"] for layer in range(L)]
        stack = torch.stack(resid)  # [L + 1, B, d]
        w, norm = backend.weights(), backend.norms().ln_final
        logits = norm(stack) @ w.W_U + w.b_U
    metric = None
    if answer is not None:
        a = token_ids(backend, answer, tokens.shape[0], "answer")
        metric = logits[:, rows, a]
        if wrong is not None:
            metric = metric - logits[:, rows, token_ids(backend, wrong, tokens.shape[0], "wrong")]
    return LensResult(logits, ["embed"] + [str(layer) for layer in range(L)], metric, norm.is_identity)


@dataclass
class AttentionScores:
    """A head's pre-softmax attention score split into (query-side source, key-side source) pairs.

    Attributes:
        values: ``[query_source, key_source, batch, key_pos]`` in score units (``q . k * scale``, the
            logits of the attention softmax); ``values.sum((0, 1))`` == the model's score (tested).
        query_labels: writers before the head's layer, then ``resid_bias`` (the residual's constant:
            every earlier ``b_O``), then ``b_Q``.
        key_labels: the same with ``b_K``.
        scores: ``[batch, key_pos]`` the model's own scores from ``hook_q``/``hook_k`` (masked keys
            are ``nan``).
        head: the head's label; ``query_pos`` ``[batch]``.
    """

    values: Tensor
    query_labels: list[str]
    key_labels: list[str]
    scores: Tensor
    head: str
    query_pos: Tensor

    def at(self, key_pos: int | list[int]) -> Tensor:
        """``[query_source, key_source, batch]`` at one key position per prompt (``nan`` for keys after the
        query: masked).

        Raises:
            LNFreeError: positions outside the sequence, or a count that is neither 1 nor the batch size.
        """
        batch, n_keys = self.values.shape[2], self.values.shape[3]
        k = torch.as_tensor(key_pos).long().reshape(-1)
        if k.numel() == 1:
            k = k.expand(batch)
        if k.numel() != batch or bool(((k < -n_keys) | (k >= n_keys)).any()):
            raise LNFreeError(f"key_pos={key_pos!r}: pass one key position, or one per prompt ({batch}), in "
                              f"[{-n_keys}, {n_keys}).")
        return self.values[:, :, torch.arange(batch), k % n_keys]

    def top(self, key_pos: int | list[int], k: int = 10):
        """The ``k`` (query source, key source) pairs with the largest |batch-mean| contribution."""
        import pandas as pd

        v = self.at(key_pos).mean(-1).detach().double().cpu()
        flat = v.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices.tolist()
        nk = v.shape[1]
        return pd.DataFrame([{"query_source": self.query_labels[i // nk], "key_source": self.key_labels[i % nk],
                              "score": float(flat[i])} for i in idx])

    def plot(self, key_pos: int | list[int], title: str | None = None):
        """Heatmap of the batch-mean contributions at ``key_pos`` (query sources down, key sources across)."""
        import matplotlib.pyplot as plt

        v = self.at(key_pos).mean(-1).detach().double().cpu().numpy()
        lim = float(abs(v).max()) or 1.0
        fig, ax = plt.subplots(figsize=(0.35 * len(self.key_labels) + 3, 0.3 * len(self.query_labels) + 2))
        im = ax.imshow(v, cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(self.key_labels)), self.key_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(self.query_labels)), self.query_labels, fontsize=7)
        ax.set_xlabel("key-side writer")
        ax.set_ylabel("query-side writer")
        fig.colorbar(im, ax=ax, label="contribution to the attention score (pre-softmax)")
        ax.set_title(title or f"{self.head} attention score at key {key_pos}, split by writer pair")
        fig.tight_layout()
        return fig


def attention_scores(
    model: Any,
    inputs: Any,
    head: str | Node,
    *,
    query_pos: int | list[int] = -1,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> AttentionScores:
    """Split head ``head``'s pre-softmax score from ``query_pos`` to every key exactly into writer pairs.

    ``score[k] = (sum_i q_i) . (sum_j k_j) * scale`` with ``q_i = w_i(query) W_Q`` for each writer ``i``
    before the head's layer (and the residual's constant bias), plus ``b_Q``; likewise keys. LN-free the
    pairs sum to the model's score exactly (float64 to 1e-10, tested): K-composition is the key-side
    column of a previous-token head. (Elhage et al. 2021, "A Mathematical Framework", QK circuit.)

    Args:
        model: an LN-free model from the loaders.
        inputs: prompts; ``head`` a label like ``"L1H2"`` or a `Node`.
        head: which head.
        query_pos: query position per prompt (negative from the last real token).
        attention_mask: for padded token ids.

    Returns:
        `AttentionScores`.

    Raises:
        LNFreeError: the head's ``ln_1`` is a LayerNorm (the score is not bilinear in the writers then:
            refused rather than approximated), an unknown head, bad positions.
    """
    backend = get_backend(model)
    node = Node.parse(head)
    if node.kind != "head" or not (0 <= int(node.layer) < backend.n_layers and  # type: ignore[arg-type]
                                   0 <= int(node.head) < backend.n_heads):  # type: ignore[arg-type]
        raise LNFreeError(f"head={head!r}: pass a head label L{{l}}H{{h}} of this model "
                          f"({backend.n_layers} layers x {backend.n_heads} heads).")
    layer, h = int(node.layer), int(node.head)  # type: ignore[arg-type]
    norms = backend.norms()
    if not norms.ln1[layer].is_identity:
        raise LNFreeError(f"attention_scores needs an LN-free model: blocks.{layer}.ln1 is a LayerNorm, so the score "
                          "is not a sum over writer pairs (its scale mixes them). Use an LN-free checkpoint.")
    tokens, mask = prepare(backend, inputs, attention_mask)
    qpos = positions(query_pos, mask)
    B = tokens.shape[0]
    rows = torch.arange(B, device=tokens.device)
    names = ["hook_embed", "hook_pos_embed", f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k",
             f"blocks.{layer}.attn.hook_pattern"]
    names += [f"blocks.{x}.attn.hook_z" for x in range(layer)] + [f"blocks.{x}.hook_mlp_out" for x in range(layer)]
    with torch.no_grad():
        acts = backend.run(tokens, mask, capture=names).acts
        w = backend.weights()
        sources = [acts["hook_embed"] + acts["hook_pos_embed"]]
        labels = ["embed"]
        for x in range(layer):
            heads = torch.einsum("bphk,hkd->hbpd", acts[f"blocks.{x}.attn.hook_z"], w.W_O[x])
            sources += list(heads) + [acts[f"blocks.{x}.hook_mlp_out"]]
            labels += [f"L{x}H{i}" for i in range(backend.n_heads)] + [f"{x}_mlp_out"]
        bias = sum((w.b_O[x] for x in range(layer)), torch.zeros_like(w.b_U[:1].expand(backend.d_model)))
        sources.append(bias.expand_as(sources[0]))
        labels.append("resid_bias")
        S = torch.stack(sources)  # [n, B, P, d]
        qs = torch.einsum("nbd,dk->nbk", S[:, rows, qpos], w.W_Q[layer][h])  # [n, B, dh]
        qs = torch.cat([qs, w.b_Q[layer][h].expand(1, B, -1)])
        ks = torch.einsum("nbpd,dk->nbpk", S, w.W_K[layer][h])
        ks = torch.cat([ks, w.b_K[layer][h].expand(1, B, ks.shape[2], -1)])
        scale = backend.d_head ** -0.5  # GPT-2's score scale; checked against the model's pattern below
        values = torch.einsum("ibk,jbpk->ijbp", qs, ks) * scale
        q = acts[f"blocks.{layer}.attn.hook_q"][rows, qpos, h]  # [B, dh]
        k = acts[f"blocks.{layer}.attn.hook_k"][:, :, h]  # [B, P, dh]
        scores = torch.einsum("bk,bpk->bp", q, k) * scale
        keys = torch.arange(tokens.shape[1], device=tokens.device)
        allowed = (keys[None] <= qpos[:, None]) & mask.bool()
        scores = scores.masked_fill(~allowed, float("nan"))
        values = values.masked_fill(~allowed[None, None], float("nan"))
        pattern = acts[f"blocks.{layer}.attn.hook_pattern"][rows, h, qpos]  # [B, P], the model's own
        ours = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        tol = 1e-9 if scores.dtype == torch.float64 else 1e-3
        if float((ours - pattern).abs().max()) > tol:
            raise LNFreeError(f"The model's attention pattern of {node.label} is not softmax(q . k / sqrt(d_head)) "
                              "(a config that rescales attention scores?): refusing to decompose it.")
    return AttentionScores(values, labels + ["b_Q"], labels + ["b_K"], scores, node.label, qpos)
