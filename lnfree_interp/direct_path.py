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
             answer: Tensor, wrong: Tensor | None, sums: bool = False) -> Capture:
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
                sums: bool = False, count: int = 1, fold_value_bias: bool = False) -> Components:
    """Assemble the components from captured activations (``sums=True``: from token sums / count)."""
    w = backend.weights()
    get = (lambda n: acts[n] / count) if sums else (lambda n: acts[n])
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


def dots(comp: Components, delta: Components | None, direction: Tensor, centred_r: Tensor | None,
          vectors: bool = True):
    """Per component and prompt: ``a = du . u0`` and, for LN models, ``b = Cr . du``, ``c = |C du|^2``.

    ``du`` is the component itself (``delta=None``) or its change to the ablated value;
    ``direction`` [B, d] is ``u`` (LN-free) or ``C u``. ``vectors=False``: neuron groups only.
    """
    a, b, c = [], [], []
    if vectors:
        vec = comp.vectors if delta is None else comp.vectors - delta.vectors
        a.append(torch.einsum("cbd,bd->cb", vec, direction))
        if centred_r is not None:
            cvec = vec - vec.mean(-1, keepdim=True)
            b.append(torch.einsum("cbd,bd->cb", cvec, centred_r))
            c.append(cvec.pow(2).sum(-1))
    for i, (act, W) in enumerate(zip(comp.neuron_acts, comp.neuron_W)):
        dact = (act if delta is None else act - delta.neuron_acts[i]).T  # [N, B]
        a.append(dact * (W @ direction.T))
        if centred_r is not None:
            cW = W - W.mean(-1, keepdim=True)
            b.append(dact * (cW @ centred_r.T))
            c.append(dact.pow(2) * cW.pow(2).sum(-1, keepdim=True))
    cat = lambda xs: torch.cat(xs, 0) if xs else None  # noqa: E731
    return cat(a), cat(b), cat(c)


def top_k(labels: list[str], values: list[Tensor], k: int | None, comp: Components) -> tuple[list[str], list[Tensor]]:
    """Keep the ``k`` neurons with the largest mean |value| (over the first tensor); fold the rest
    into one ``{l}_mlp_rest`` row per layer so sums stay exact."""
    n_fixed = len(comp.labels)
    neuron_labels = [lab for group in comp.neuron_labels for lab in group]
    if k is None or k >= len(neuron_labels):
        return labels, values
    score = values[0][n_fixed:].abs().mean(-1)
    keep = set(score.topk(k).indices.tolist())
    out_labels = labels[:n_fixed]
    keep_idx = [n_fixed + i for i in sorted(keep)]
    rest_rows = []
    offset = n_fixed
    for group in comp.neuron_labels:
        idx = [offset + i for i in range(len(group)) if (offset - n_fixed + i) not in keep]
        rest_rows.append((f"{label_layer(group[0])}_mlp_rest", idx))
        offset += len(group)
    out_labels = out_labels + [labels[i] for i in keep_idx] + [name for name, _ in rest_rows]
    out_values = []
    for v in values:
        rest = [v[idx].sum(0) if idx else torch.zeros_like(v[0]) for _, idx in rest_rows]
        out_values.append(torch.cat([v[:n_fixed], v[keep_idx], torch.stack(rest)], 0))
    return out_labels, out_values
