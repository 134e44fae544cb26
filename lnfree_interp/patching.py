"""Attribution patching (AtP) with an exact direct term, activation patching, and their comparison.

AtP estimates the effect on ``metric`` of patching node ``a`` from the corrupted run into the clean
run by ``(a_corrupt - a_clean) . d metric / d a`` (Nanda 2023; Syed et al. 2023; Kramar et al. 2024,
"AtP*"), for every node and prompt from one corrupted forward and one clean forward + backward, all
prompt pairs in one batch (TransformerLens's ``tools.analysis.attribution_patch`` loops over pairs).

The gradient splits along the paths from the node to the metric. The *direct* part goes through
the node's linear write to the final residual stream and the unembedding:
``d metric / d r_final`` pulled back through ``W_O`` (heads), ``W_out`` (neurons) or the identity.
Without LayerNorm that path is linear, so for a metric linear in the logits ([`logit_diff`][lnfree_interp.logit_diff])
the direct part is the exact direct effect of the patch; only the *indirect* part (through later
attention and MLPs) is a first-order estimate. With LayerNorm both parts are first order.
``values == direct + indirect``.

`activation_patching` is the ground truth: every node (at every position, if asked) patched
one at a time, many patches per forward pass (the batch is replicated once per patch).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from .backends import Backend, check_metric, get_backend
from .edge_results import EdgeResult
from .errors import LNFreeError
from .inputs import pair_inputs, prepare_count
from .metrics import bind_metric, readout
from .results import AttributionResult, Comparison, bootstrap_ci, check_bootstrap, label_layer, nmae
from .streaming import is_loader, stream_pairs, wants_stream

Nodes = Literal["head", "attn_out", "mlp_out", "neuron", "resid_pre"]

#: node kind -> TransformerLens hook (per layer)
NODE_HOOKS = {"head": "attn.hook_z", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
              "neuron": "mlp.hook_post", "resid_pre": "hook_resid_pre"}


def _labels(backend: Backend, nodes: str, layer: int) -> list[str]:
    if nodes == "head":
        return [f"L{layer}H{h}" for h in range(backend.n_heads)]
    if nodes == "neuron":
        return [f"L{layer}N{n}" for n in range(backend.d_mlp)]
    return [f"{layer}_{nodes}"]


def _node_dot(x: Tensor, y: Tensor, nodes: str) -> Tensor:
    """Per-node inner product of two activation-shaped tensors: ``[B, P, k]``."""
    if nodes == "head":
        return (x * y).sum(-1)  # [B, P, H]
    if nodes == "neuron":
        return x * y  # [B, P, d_mlp]
    return (x * y).sum(-1, keepdim=True)  # [B, P, 1]


def attribution_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    nodes: Nodes = "head",
    per_position: bool = True,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    corrupted_attention_mask: Int[Tensor, "batch pos"] | None = None,
    batch_size: int | None = None,
    progress: bool = True,  # pragma: no mutate (the bar)
    per_prompt: bool = True,
) -> AttributionResult:
    """Attribution patching of every node, all prompt pairs in one batched pass.

    Cost: one corrupted forward (no grad) and one clean forward + backward, whatever the number of
    nodes. Runs in eval mode (restored afterwards); gradients are taken with ``torch.autograd.grad``
    with respect to the activations only, so no ``.grad`` is accumulated on the model's parameters.

    Args:
        model: anything the loaders return (or an LN baseline).
        clean: clean prompts: strings or token ids ``[batch, pos]``.
        corrupted: corrupted prompts, of the same token shape as ``clean``.
        metric: callable on logits ``[batch, pos, d_vocab]`` returning ``[batch]``, differentiable, e.g.
            [`logit_diff`][lnfree_interp.logit_diff] or [`logprob`][lnfree_interp.logprob].
        nodes: ``"head"`` (``L{l}H{h}``, each head's ``z``), ``"attn_out"``, ``"mlp_out"``,
            ``"neuron"`` (``L{l}N{n}``, MLP post-activations) or ``"resid_pre"``.
        per_position: keep positions separate (``values [node, pos, batch]``) or sum them
            (``[node, batch]``).
        attention_mask: mask for padded clean token ids.
        corrupted_attention_mask: mask for padded corrupted token ids.
        batch_size: stream the prompt pairs in batches of this many (any N, flat memory, same numbers;
            see `streaming`); ``clean`` may then be a DataLoader of pairs.
        progress: a tqdm bar over the batches when streaming.
        per_prompt: as in [`direct_logit_attribution`][lnfree_interp.direct_logit_attribution].

    Returns:
        `AttributionResult` (``kind="atp"``) in the metric's units, with ``direct`` and
        ``indirect`` (``values == direct + indirect``) and ``extra["metric_clean"]`` /
        ``extra["metric_corrupted"]`` ``[batch]``. Identical clean and corrupted inputs give exactly 0.

    Raises:
        LNFreeError: clean/corrupted of different shapes, a metric that is not ``[batch]`` or has no
            gradient, unknown ``nodes``, non-finite gradients (float16 overflow), a call inside
            ``torch.inference_mode()``.
    """
    if torch.is_inference_mode_enabled():
        raise LNFreeError("Attribution patching needs gradients, but torch.inference_mode() is active: call it "
                          "outside the inference_mode block (torch.no_grad() is fine).")
    backend = get_backend(model)
    if nodes not in NODE_HOOKS:
        raise LNFreeError(f"nodes={nodes!r}: use one of {list(NODE_HOOKS)}.")
    if (streams := wants_stream(clean, batch_size, per_prompt)) or not per_prompt:
        return stream_pairs(attribution_patching, model, clean, corrupted, metric, chunk=batch_size,
                            show_progress=progress and streams, attention_mask=attention_mask,
                            corrupted_attention_mask=corrupted_attention_mask, per_prompt=per_prompt, nodes=nodes,
                            per_position=per_position)
    tokens, mask, c_tokens, c_mask = pair_inputs(backend, clean, corrupted, attention_mask, corrupted_attention_mask)
    f_clean, f_corr = bind_metric(metric, backend, mask), bind_metric(metric, backend, c_mask)
    L = backend.n_layers
    names = [f"blocks.{layer}.{NODE_HOOKS[nodes]}" for layer in range(L)]
    final = f"blocks.{L - 1}.hook_resid_post"
    w = backend.weights()

    corr_run = backend.run(c_tokens, c_mask, capture=names, **readout(f_corr))
    corr, m_corr = corr_run.acts, corr_run.metric
    clean_run = backend.run(tokens, mask, capture=names, grad_of=names + [final], **readout(f_clean))
    acts, m = clean_run.acts, clean_run.metric
    grads = [clean_run.grads[n] for n in names + [final]]
    g_final = grads[-1]
    valid = (mask.bool() & c_mask.bool())[..., None].to(g_final.dtype)
    values, direct, labels = [], [], []
    with torch.no_grad():
        for layer, name in enumerate(names):
            delta = corr[name] - acts[name]
            total = _node_dot(delta, grads[layer], nodes)
            if nodes == "head":
                d_grad = torch.einsum("bpd,hkd->bphk", g_final, w.W_O[layer])
            elif nodes == "neuron":
                d_grad = g_final @ w.W_out[layer].T
            else:
                d_grad = g_final
            values.append(total * valid)
            direct.append(_node_dot(delta, d_grad, nodes) * valid)
            labels += _labels(backend, nodes, layer)
        # [B, P, k] per layer -> [node, pos, batch]
        values_t = torch.cat(values, -1).permute(2, 1, 0).contiguous()
        direct_t = torch.cat(direct, -1).permute(2, 1, 0).contiguous()
        if not per_position:
            values_t, direct_t = values_t.sum(1), direct_t.sum(1)
    linear = getattr(metric, "linear", False)
    note = ("direct part exact (LN-free model, metric linear in the logits); indirect part first order"
            if backend.lnfree and linear else "direct and indirect parts are first-order estimates")
    return AttributionResult(
        values=values_t, labels=labels, metric=m, kind="atp", n_layers=L, n_heads=backend.n_heads,
        exact=False, note=note, direct=direct_t, indirect=values_t - direct_t,
        positions=list(range(tokens.shape[1])) if per_position else None,
        extra={"metric_clean": m, "metric_corrupted": m_corr, "nodes": nodes, "backend": backend.name,
               "direct_exact": bool(backend.lnfree and linear)},
    )


def activation_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    nodes: Nodes = "head",
    per_position: bool = False,
    positions: list[int] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    corrupted_attention_mask: Int[Tensor, "batch pos"] | None = None,
    batch_size: int = 64,  # pragma: no mutate (a default: rows per pass)
    progress: bool = True,  # pragma: no mutate (the bar)
    per_prompt: bool = True,
) -> AttributionResult:
    """Activation patching of every node: the ground truth AtP estimates.

    For each node (at each position when ``per_position``), its activation from the corrupted run
    replaces the clean one and the metric is recomputed: ``value = metric(patched) - metric(clean)``.
    Patches are batched: the clean batch is replicated once per patch, ``batch_size`` rows per
    forward pass (TransformerLens's ``get_act_patch_*`` runs one forward per node).

    Args:
        model: as in [`attribution_patching`][lnfree_interp.attribution_patching].
        clean: as in [`attribution_patching`][lnfree_interp.attribution_patching].
        corrupted: as in [`attribution_patching`][lnfree_interp.attribution_patching].
        metric: as in [`attribution_patching`][lnfree_interp.attribution_patching].
        nodes: as in [`attribution_patching`][lnfree_interp.attribution_patching].
        attention_mask: as in [`attribution_patching`][lnfree_interp.attribution_patching].
        corrupted_attention_mask: as in [`attribution_patching`][lnfree_interp.attribution_patching].
        per_position: patch each position separately (``values [node, pos, batch]``); else a node
            is patched at all of ``positions`` at once (``[node, batch]``).
        positions: the positions to patch (default all), as column indices of the (padded) token
            batch; negative ones count from its end.
        batch_size: rows per forward pass; more prompts than that are streamed in batches of
            ``batch_size`` prompts (flat memory, same numbers), and ``clean`` may be a DataLoader.
        progress: tqdm bar over the forward passes.
        per_prompt: as in [`direct_logit_attribution`][lnfree_interp.direct_logit_attribution].

    Returns:
        `AttributionResult` (``kind="activation_patching"``), ``extra["metric_clean"]`` and
        ``extra["metric_corrupted"]``.

    Raises:
        LNFreeError: as [`attribution_patching`][lnfree_interp.attribution_patching]; positions outside the sequence.
    """
    from tqdm.auto import tqdm

    backend = get_backend(model)
    if nodes not in NODE_HOOKS:
        raise LNFreeError(f"nodes={nodes!r}: use one of {list(NODE_HOOKS)}.")
    wants_stream(clean, batch_size, per_prompt)  # validates
    n_prompts = None if is_loader(clean) else prepare_count(backend, clean, attention_mask)
    if n_prompts is None or n_prompts > batch_size or not per_prompt:  # more prompts than rows per pass: stream
        return stream_pairs(activation_patching, model, clean, corrupted, metric, chunk=batch_size,
                            show_progress=progress, attention_mask=attention_mask, per_prompt=per_prompt,
                            corrupted_attention_mask=corrupted_attention_mask, nodes=nodes, per_position=per_position,
                            positions=positions, batch_size=batch_size,
                            progress=False)  # pragma: no mutate (the inner bar)
    tokens, mask, c_tokens, c_mask = pair_inputs(backend, clean, corrupted, attention_mask, corrupted_attention_mask)
    batch, seq = tokens.shape
    f_clean, f_corr = bind_metric(metric, backend, mask), bind_metric(metric, backend, c_mask)
    L = backend.n_layers
    names = [f"blocks.{layer}.{NODE_HOOKS[nodes]}" for layer in range(L)]
    pos_list = list(range(seq)) if positions is None else [int(p) for p in positions]
    if not pos_list or any(not -seq <= p < seq for p in pos_list):
        raise LNFreeError(f"positions={positions} must be non-empty and lie in [-{seq}, {seq}) (the padded "
                          f"sequence length is {seq}).")
    pos_list = sorted({p % seq for p in pos_list})
    width = {"head": backend.n_heads, "neuron": backend.d_mlp}.get(nodes, 1)
    jobs = [(layer, k, p) for layer in range(L) for k in range(width)
            for p in (pos_list if per_position else [None])]
    copies = batch_size // batch  # >= 1: more prompts than batch_size were streamed above

    with torch.no_grad():
        m_clean = backend.run(tokens, mask, **readout(f_clean)).metric
        corr_run = backend.run(c_tokens, c_mask, capture=names, **readout(f_corr))
        corr, m_corr = corr_run.acts, corr_run.metric
        del corr_run
        assert m_clean is not None  # the run was given a metric
        effects = torch.empty(len(jobs), batch, dtype=m_clean.dtype, device=m_clean.device)
        chunks = range(0, len(jobs), copies)
        quiet = not progress or len(chunks) < 3  # pragma: no mutate (the bar)
        for start in tqdm(chunks, desc="activation patching", disable=quiet, mininterval=1.0):  # pragma: no mutate
            chunk = jobs[start : start + copies]
            J = len(chunk)
            hooks = {}
            for layer in sorted({j[0] for j in chunk}):
                name = names[layer]
                shape = corr[name].shape  # [B, P, ...]
                sel = torch.zeros((J, seq, width), dtype=torch.bool, device=tokens.device)
                for j, (lay, k, p) in enumerate(chunk):
                    if lay == layer:
                        sel[j, pos_list if p is None else p, k] = True
                # [J, 1, P, H, 1] against hook_z [B, P, H, d_head]; else [J, 1, P, width] against [B, P, width]
                sel = sel[:, None, :, :, None] if nodes == "head" else sel[:, None]

                def patch(act: Tensor, sel=sel, src=corr[name], shape=shape) -> Tensor:
                    act = act.view(J, *shape)
                    return torch.where(sel, src.unsqueeze(0), act).view(J * shape[0], *shape[1:])

                hooks[name] = patch
            out = readout(f_clean, J)
            logits = backend.run(tokens.repeat(J, 1), mask.repeat(J, 1), hooks=hooks,
                                 positions=out.get("positions")).logits
            logits = logits.view(J, batch, *logits.shape[1:])
            for j in range(J):
                effects[start + j] = check_metric(out["metric"](logits[j]), batch, need_grad=False) - m_clean
    labels = [lab for layer in range(L) for lab in _labels(backend, nodes, layer)]
    values = effects.view(len(labels), len(pos_list), batch) if per_position else effects
    return AttributionResult(
        values=values, labels=labels, metric=m_clean, kind="activation_patching", n_layers=L,
        n_heads=backend.n_heads, exact=True, note="ground truth: one node patched at a time",
        positions=pos_list if per_position else None,
        extra={"metric_clean": m_clean, "metric_corrupted": m_corr, "nodes": nodes, "backend": backend.name,
               "patched_positions": pos_list, "n_positions": seq},
    )


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank) for Spearman's correlation."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def _stats(a: Tensor, b: Tensor, scale: Tensor) -> dict[str, float]:
    """Agreement figures of flattened estimates ``a`` vs ground truth ``b`` (``scale``: per-element
    full-restoration effect for the paper's normalisation)."""
    an, bn = a / scale, b / scale
    significant = b.abs() > 1e-6 * b.abs().max().clamp_min(1e-30)  # pragma: no mutate (>= and the floor: alike)
    # no significant true effect: no sign to agree with (NaN, as Pearson's r of constant values)
    sign = (a.sign() == b.sign())[significant].double().mean() if bool(significant.any()) else torch.tensor(torch.nan)
    return {"pearson": _pearson(a, b), "spearman": _pearson(_ranks(a), _ranks(b)), "nmae": nmae(a, b),
            "sign_agreement": float(sign), "normalised_mae": float((an - bn).abs().mean()),
            "max_abs_error": float((a - b).abs().max())}


def _check_same_run(atp: AttributionResult, act: AttributionResult) -> None:
    """Raise unless ``atp`` and ``act`` estimate and measure the very same patches."""
    if atp.kind != "atp" or act.kind != "activation_patching":
        raise LNFreeError(f"compare_attribution(atp_result, act_result) takes the attribution_patching result first "
                          f"and the activation_patching result second; got {atp.kind!r}, {act.kind!r}.")
    if atp.labels != act.labels or atp.values.shape != act.values.shape:
        raise LNFreeError("The two results cover different nodes or shapes; run both with the same nodes, inputs "
                          f"and per_position ({tuple(atp.values.shape)} vs {tuple(act.values.shape)}).")
    everywhere = list(range(act.extra["n_positions"]))
    if atp.positions is None and act.extra["patched_positions"] != everywhere:
        raise LNFreeError(f"Activation patching patched positions {act.extra['patched_positions']} only, but "
                          "attribution patching with per_position=False sums over every position; drop positions= "
                          "(or compare per_position=True results).")
    if atp.positions is not None and atp.positions != act.positions:
        raise LNFreeError(f"The results cover positions {atp.positions} and {act.positions}; patch the same ones.")
    _check_same_metrics(atp, act)


def _check_same_metrics(est: Any, truth: Any) -> None:
    """Raise unless two results' clean and corrupted metrics agree to their dtype's tolerance."""
    from .results import TOLERANCE

    tol = TOLERANCE[est.values.dtype]
    for key in ("metric_clean", "metric_corrupted"):
        x, y = est.extra[key].detach().double().cpu(), truth.extra[key].detach().double().cpu()
        if x.shape != y.shape or not torch.allclose(x, y, rtol=tol, atol=tol):
            raise LNFreeError(f"The two results have different {key.replace('_', ' ')} values ({x.tolist()[:3]} vs "
                              f"{y.tolist()[:3]}...): they come from different models, inputs or metrics. Run "
                              "both on the same model with the same clean / corrupted prompts and metric.")


def compare_attribution(atp_result: AttributionResult, act_result: AttributionResult, *, n_boot: int = 1000,
                        seed: int = 0) -> Comparison:
    """How well attribution patching matches activation patching, globally and per layer.

    Figures: Pearson and Spearman correlation, normalised mean absolute error
    ``100 * mean|AtP - AP| / mean|AP|`` (with a bootstrap 95% interval over prompts), sign agreement
    (over nodes with a non-negligible true effect; NaN when there is none), and the paper's
    normalisation: both divided by the full-restoration effect ``metric(corrupted) - metric(clean)`` of
    each prompt, then the mean absolute error (``normalised_mae``).

    Args:
        atp_result: from [`attribution_patching`][lnfree_interp.attribution_patching].
        act_result: from `activation_patching` on the same model, inputs, metric and nodes
            (and the same ``per_position``).

    Returns:
        `Comparison`; ``per_component`` is a per-layer DataFrame; ``plot()`` is the scatter of
        AtP against activation patching coloured by layer.

    Raises:
        LNFreeError: a ``per_prompt=False`` summary; the arguments swapped, or results that do not
            describe the same patches: other
            nodes, shapes or positions, or other clean / corrupted metrics (another model, other
            inputs or another metric).

    Edge results work the same way: ``compare_attribution(edge_attribution(...), edge_patching(...))``
    gives the agreement per reader kind (``logits``, ``q``, ``k``, ``v``, ``mlp_in``) in
    ``per_component``.
    """
    import pandas as pd

    check_bootstrap(n_boot, seed)
    summaries = [name for name, r in (("atp_result", atp_result), ("act_result", act_result))
                 if not getattr(r, "per_prompt", True)]
    if summaries:
        raise LNFreeError(f"{' and '.join(summaries)} {'hold' if len(summaries) > 1 else 'holds'} only a mean over "
                          "prompts (per_prompt=False): the "
                          "comparison pairs each prompt's values (errors normalised per prompt, a bootstrap over "
                          "prompts). Run both with per_prompt=True (the default).")
    if isinstance(atp_result, EdgeResult) or isinstance(act_result, EdgeResult):
        return _compare_edges(atp_result, act_result, n_boot, seed)
    _check_same_run(atp_result, act_result)
    a = atp_result.values.detach().double().cpu()
    b = act_result.values.detach().double().cpu()
    restore = (act_result.extra["metric_corrupted"] - act_result.extra["metric_clean"]).double().cpu()
    scale = restore.where(restore.abs() > 1e-12, torch.ones_like(restore)).expand_as(a)  # pragma: no mutate (a floor)
    layers = [label_layer(lab) for lab in atp_result.labels]
    per_el_layers = [layer for layer in layers for _ in range(a.shape[1:].numel())]
    rows = []
    for layer in sorted({x for x in layers if x is not None}):
        idx = [i for i, x in enumerate(layers) if x == layer]
        s = _stats(a[idx].flatten(), b[idx].flatten(), scale[idx].flatten())
        rows.append({"layer": layer, **s})
    flat_a, flat_b = a.flatten(), b.flatten()
    boot_a, boot_b = a.flatten(0, -2), b.flatten(0, -2)
    return Comparison(
        nmae=nmae(flat_a, flat_b), ci=bootstrap_ci(boot_a, boot_b, n_boot, seed), per_component=pd.DataFrame(rows),
        stats=_stats(flat_a, flat_b, scale.flatten()), a=flat_a, b=flat_b, layers=per_el_layers,
        names=("attribution patching", "activation patching"),
        title=f"AtP vs activation patching ({atp_result.extra.get('nodes')})")


def _compare_edges(est: Any, truth: Any, n_boot: int, seed: int) -> Comparison:
    """`compare_attribution` for edge results: EAP / EAP-IG against edge patching, per reader kind."""
    import pandas as pd

    if est.kind not in ("eap", "eap-ig") or truth.kind != "edge_patching":  # kinds only edge results have
        raise LNFreeError("compare_attribution(edge_attribution(...), edge_patching(...)) takes the EAP / EAP-IG "
                          f"result first and the edge-patching result second; got {getattr(est, 'kind', est)!r}, "
                          f"{getattr(truth, 'kind', truth)!r}.")
    if est.positions is not None:
        raise LNFreeError("Compare a position-summed edge_attribution (per_position=False) with edge_patching.")
    index = {e: i for i, e in enumerate(est.edges)}
    missing = [e.label for e in truth.edges if e not in index]
    if missing:
        raise LNFreeError(f"The edge-patching result has edges the attribution lacks ({missing[:3]}...): "
                          "another model?")
    _check_same_metrics(est, truth)
    rows_idx = [index[e] for e in truth.edges]
    a = est.values[rows_idx].detach().double().cpu()
    b = truth.values.detach().double().cpu()
    restore = (truth.extra["metric_corrupted"] - truth.extra["metric_clean"]).double().cpu()
    scale = restore.where(restore.abs() > 1e-12, torch.ones_like(restore)).expand_as(a)  # pragma: no mutate (a floor)
    kinds = [e.reader.kind for e in truth.edges]
    rows = []
    for kind in ("logits", "q", "k", "v", "mlp_in"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            rows.append({"reader": kind, "edges": len(idx), **_stats(a[idx].flatten(), b[idx].flatten(),
                                                                      scale[idx].flatten())})
    layers = [e.reader.layer if e.reader.layer is not None else truth.n_layers for e in truth.edges
              for _ in range(a.shape[1])]
    return Comparison(nmae=nmae(a.flatten(), b.flatten()), ci=bootstrap_ci(a, b, n_boot, seed),
                      per_component=pd.DataFrame(rows), stats=_stats(a.flatten(), b.flatten(), scale.flatten()),
                      a=a.flatten(), b=b.flatten(), layers=layers, names=(est.kind.upper(), "edge patching"),
                      title=f"{est.kind.upper()} vs edge patching ({len(truth.edges)} edges; per reader kind)")
