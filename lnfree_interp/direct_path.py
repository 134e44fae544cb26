"""The direct path's components: what each writer adds to the final residual stream, captured in one forward.

Used by ``lnfree_interp.dla`` (DLA and the direct effect). A forward keeps only each hook's activation at
the attributed position of each prompt (``[B, ...]``, never a ``[B, pos, ...]`` cache); components are the
embeddings, each head ``L{l}H{h}`` (``hook_z @ W_O``) or layer ``{l}_attn_out``, each MLP ``{l}_mlp_out`` or
its neurons ``L{l}N{n}`` (kept factored as activation times a row of ``W_out``), and the constant biases, so
that they sum to ``blocks.{L-1}.hook_resid_post`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from .backends import Backend
from .results import label_layer


@dataclass
class Capture:
    """What one forward pass leaves behind at the attributed positions (``B`` prompts)."""

    metric: Float[Tensor, "batch"]
    acts: dict[str, Tensor]  #: hook name -> activation at each prompt's position [B, ...]
    sums: dict[str, Tensor]  #: hook name -> sum over all real tokens (for mean ablation)
    n_tokens: int


def hook_names(backend: Backend, by: str, layers: list[int]) -> list[str]:
    names = ["hook_embed", "hook_pos_embed", f"blocks.{backend.n_layers - 1}.hook_resid_post"]
    for layer in range(backend.n_layers):
        names.append(f"blocks.{layer}.attn.hook_z" if by == "head" else f"blocks.{layer}.hook_attn_out")
        names.append(f"blocks.{layer}.mlp.hook_post" if by == "neuron" and layer in layers
                     else f"blocks.{layer}.hook_mlp_out")
    return names


def capture(backend: Backend, tokens: Tensor, mask: Tensor, pos: Tensor, names: list[str],
             answer: Tensor, wrong: Tensor | None,
             sums: bool = False) -> Capture:  # pragma: no mutate (True only adds unread totals)
    """One no-grad forward, keeping only each hook's activation at ``pos`` (and optionally its sum
    over real tokens): memory is O(batch * d) per hook, never a full cache."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    acts: dict[str, Tensor] = {}
    totals: dict[str, Tensor] = {}
    weight = mask.to(backend.dtype)

    def keep(name: str):
        def fn(act: Tensor) -> None:
            acts[name] = act[rows, pos].detach().clone()
            if sums:
                totals[name] = torch.einsum("bp...,bp->...", act.detach(), weight.to(act.dtype))
        return fn

    with torch.no_grad():
        logits = backend.run(tokens, mask, hooks={n: keep(n) for n in names}).logits
    final = logits[rows, pos]
    metric = final.gather(1, answer[:, None])[:, 0]
    if wrong is not None:
        metric = metric - final.gather(1, wrong[:, None])[:, 0]
    return Capture(metric, acts, totals, int(mask.sum()))


@dataclass
class Components:
    """Components' writes to the final residual, in factored form.

    ``vectors`` [C, B, d] are materialised; neuron groups are kept as activations [B, N] times
    rows of ``W_out`` [N, d], so per-neuron work never builds a [neurons, batch, d_model] stack.
    """

    labels: list[str]
    vectors: Tensor  # [C, B, d]
    neuron_labels: list[list[str]]
    neuron_acts: list[Tensor]  # each [B, N]
    neuron_W: list[Tensor]  # each [N, d]


def components(backend: Backend, by: str, layers: list[int], acts: dict[str, Tensor],
               fold_value_bias: bool) -> Components:
    """Assemble the components from captured activations ``[B, ...]`` (or their means ``[...]``)."""
    w = backend.weights()
    get = acts.__getitem__
    first = get("hook_embed")
    lead = first.shape[:-1]  # [B] or [] for means
    labels, vecs = ["embed", "pos_embed"], [first, get("hook_pos_embed")]
    n_labels, n_acts, n_W = [], [], []
    for layer in range(backend.n_layers):
        if by == "head":
            z = get(f"blocks.{layer}.attn.hook_z")  # [B, H, dh]
            b_O = w.b_O[layer]
            if fold_value_bias:  # TL's fold_value_biases: softmax rows sum to 1, so b_V passes through whole
                z = z - w.b_V[layer]
                b_O = b_O + torch.einsum("hk,hkd->d", w.b_V[layer], w.W_O[layer])
            heads = torch.einsum("...hk,hkd->h...d", z, w.W_O[layer])
            labels += [f"L{layer}H{h}" for h in range(backend.n_heads)] + [f"{layer}_attn_bias"]
            vecs += list(heads) + [b_O.expand(*lead, -1)]
        else:
            labels.append(f"{layer}_attn_out")
            vecs.append(get(f"blocks.{layer}.hook_attn_out"))
        if by == "neuron" and layer in layers:
            n_labels.append([f"L{layer}N{n}" for n in range(backend.d_mlp)])
            n_acts.append(get(f"blocks.{layer}.mlp.hook_post"))
            n_W.append(w.W_out[layer])
            labels.append(f"{layer}_mlp_bias")
            vecs.append(w.b_out[layer].expand(*lead, -1))
        else:
            labels.append(f"{layer}_mlp_out")
            vecs.append(get(f"blocks.{layer}.hook_mlp_out"))
    return Components(labels, torch.stack(vecs), n_labels, n_acts, n_W)


def neuron_dots(comp: Components, delta: Components | None, direction: Tensor, centred_r: Tensor | None):
    """Per neuron and prompt: ``a = du . u0`` and, for LN models, ``b = Cr . du``, ``c = |C du|^2``.

    ``du`` is the neuron's write (``delta=None``) or its change to the ablated value, kept factored as
    activation times a row of ``W_out`` (no ``[neurons, batch, d_model]`` stack); ``direction`` [B, d]
    is ``u`` (LN-free) or ``C u``. ``b``/``c`` are ``None`` without ``centred_r`` (LN-free).
    """
    a, b, c = [], [], []
    for i, (act, W) in enumerate(zip(comp.neuron_acts, comp.neuron_W)):
        dact = (act if delta is None else act - delta.neuron_acts[i]).T  # [N, B]
        a.append(dact * (W @ direction.T))
        if centred_r is not None:
            cW = W - W.mean(1, keepdim=True)  # [N, d]
            b.append(dact * (cW @ centred_r.T))
            c.append(dact.pow(2) * cW.pow(2).sum(1, keepdim=True))
    cat = lambda xs: torch.cat(xs, 0) if xs else None  # noqa: E731
    return cat(a), cat(b), cat(c)


def top_k(labels: list[str], values: Tensor, k: int | None, comp: Components) -> tuple[list[str], Tensor]:
    """Keep the ``k`` neurons with the largest mean |value| over prompts (``values [C, B]``); fold the
    rest into one ``{l}_mlp_rest`` row per layer so sums stay exact."""
    n_fixed = len(comp.labels)
    if k is None or k >= values.shape[0] - n_fixed:
        return labels, values
    score = values[n_fixed:].abs().mean(-1)  # pragma: no mutate (a sum over prompts ranks alike)
    keep = set(score.topk(k).indices.tolist())
    keep_idx = [n_fixed + i for i in sorted(keep)]
    rest_labels, rest = [], []
    offset = n_fixed
    for group in comp.neuron_labels:
        idx = [offset + i for i in range(len(group)) if (offset - n_fixed + i) not in keep]
        rest_labels.append(f"{label_layer(group[0])}_mlp_rest")
        rest.append(values[idx].sum(0))  # a layer whose neurons are all kept: a row of zeros
        offset += len(group)
    return (labels[:n_fixed] + [labels[i] for i in keep_idx] + rest_labels,
            torch.cat([values[:n_fixed], values[keep_idx], torch.stack(rest)], 0))
