"""Edge-level circuit discovery: EAP, EAP-IG and edge patching (circuit evaluation: `faithfulness`).

The graph (see `nodes`): writers ``embed``, every head ``L{l}H{h}`` and every MLP
``{l}_mlp_out``; readers every head's ``.q``, ``.k``, ``.v`` input, every ``{l}_mlp_in`` and ``logits``.
Each reader's input is the LayerNorm (``NormSpec``, the identity LN-free) of the residual stream,
and the residual stream is the sum of the writers' outputs plus constant biases. So the input of
reader ``r`` with the edge ``w -> r`` patched is ``norm(resid + delta_w)``, ``delta_w`` the change of
``w``'s output; every quantity below is built from that one identity.

* `edge_attribution` - EAP (Syed et al. 2023; Hanna et al. 2024):
  ``score(w -> r) = (w_corrupted - w_clean) . d metric / d (input of r)``; the gradient at a head's
  q/k/v input is the ``hook_q/k/v`` gradient times ``W_Q/W_K/W_V`` pulled back through the
  LayerNorm's vector-Jacobian product (nothing LN-free), at an MLP's input the ``hook_mlp_in``
  gradient (pulled back the same way), at the logits the final residual's gradient. One corrupted forward plus one
  clean forward and backward for all edges; ``method="eap-ig"`` averages the gradients over
  ``steps`` inputs interpolated between the corrupted and clean embeddings (EAP-IG-inputs).
* `edge_patching` - the ground truth: each edge patched alone, many per forward pass.
* `evaluate_circuit` / `faithfulness_curve` - every reader's input rebuilt from its
  writers: circuit edges from the running pass, all others from the ablated (corrupted or mean) run.

LN-free with a metric linear in the logits (``logit_diff``), EAP of every edge into ``logits`` equals
edge patching exactly; for edges into q/k/v/MLP inputs EAP is first order (measure it with
``compare_attribution(eap, edge_patching(...))``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .backends import get_backend
from .edge_results import EdgeResult
from .errors import LNFreeError
from .graph import Rebuild, graph_of, reader_grads, reader_hooks, writer_hooks, writer_outputs
from .inputs import pair_inputs, prepare_count
from .metrics import bind_metric, readout
from .nodes import Edge
from .streaming import is_loader, stream_pairs, wants_stream

Method = Literal["eap", "eap-ig"]




# --------------------------------------------------------------------------------------------
# EAP / EAP-IG
# --------------------------------------------------------------------------------------------


def edge_attribution(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    method: Method = "eap",
    steps: int = 5,
    per_position: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    attention_mask: Tensor | None = None,
    corrupted_attention_mask: Tensor | None = None,
    per_prompt: bool = True,
) -> EdgeResult:
    """EAP (or EAP-IG) score of every edge of the model's graph, all prompt pairs at once.

    ``score(w -> r) = (w_corrupted - w_clean) . d metric / d input_r`` summed over positions: a
    first-order estimate of ``metric(edge patched) - metric(clean)`` (the sign convention of
    [`attribution_patching`][lnfree_interp.attribution_patching]). Cost: one corrupted forward and one clean forward +
    backward (EAP), or ``steps`` forwards + backwards on inputs interpolated between the corrupted
    and clean embeddings (EAP-IG-inputs, Hanna et al. 2024, ``alpha = k / steps``, k = 1..steps; the
    last step is the clean run EAP uses).
    All scores are one batched contraction per reader layer.

    Args:
        model: anything the loaders return (LN-free or an LN baseline).
        clean: clean prompts (strings or token ids ``[batch, pos]``).
        corrupted: corrupted prompts, each of its clean prompt's token length.
        metric: logits ``[batch, pos, vocab]`` -> ``[batch]``, differentiable (e.g. ``logit_diff``).
        method: ``"eap"`` or ``"eap-ig"``.
        steps: EAP-IG interpolation steps (>= 1).
        per_position: keep positions (``values [edge, pos, batch]``) instead of summing them.
        batch_size: stream the prompt pairs in batches of this many (flat memory, same numbers; see
            `streaming`); ``clean`` may then be a DataLoader of pairs.
        progress: a tqdm bar over the batches when streaming.
        attention_mask: ``[batch, pos]`` mask for padded clean token ids.
        corrupted_attention_mask: the same for the corrupted token ids.
        per_prompt: keep every prompt's scores (the default); ``False``: their mean, std and count
            only, memory flat in N (as in [`direct_logit_attribution`][lnfree_interp.direct_logit_attribution]; at
            the GPT-2-small shape one prompt's scores are 32,491 floats).

    Returns:
        `EdgeResult` (``kind="eap"`` / ``"eap-ig"``), ``values [edge, batch]`` in the metric's
        units; ``exact_edges()`` are those into ``logits`` when the model is LN-free and the metric
        linear in the logits (there EAP and EAP-IG equal `edge_patching`).

    Raises:
        LNFreeError: unknown method, ``steps < 1``, clean/corrupted length mismatch, a metric that is not
            one differentiable scalar per prompt, ``torch.inference_mode()``.
    """
    if method not in ("eap", "eap-ig"):
        raise LNFreeError(f"method={method!r}: use 'eap' or 'eap-ig'.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LNFreeError(f"steps={steps!r} must be an integer >= 1.")
    if torch.is_inference_mode_enabled():
        raise LNFreeError("Edge attribution needs gradients, but torch.inference_mode() is active.")
    backend = get_backend(model)
    if (streams := wants_stream(clean, batch_size, per_prompt)) or not per_prompt:
        return stream_pairs(edge_attribution, model, clean, corrupted, metric, chunk=batch_size,
                            show_progress=progress and streams, attention_mask=attention_mask, per_prompt=per_prompt,
                            corrupted_attention_mask=corrupted_attention_mask, method=method, steps=steps,
                            per_position=per_position)
    graph = graph_of(backend)
    tokens, mask, c_tokens, c_mask = pair_inputs(backend, clean, corrupted, attention_mask, corrupted_attention_mask)
    r_clean, r_corr = readout(bind_metric(metric, backend, mask)), readout(bind_metric(metric, backend, c_mask))
    L = backend.n_layers
    wnames, rnames = writer_hooks(L), reader_hooks(L)
    grad_names = [n for n in rnames if not n.endswith(("hook_resid_pre", "hook_resid_mid"))]
    with torch.no_grad():
        corr = backend.run(c_tokens, c_mask, capture=wnames, **r_corr)
    # the clean run is EAP's only gradient pass and EAP-IG's last step (alpha = 1: the clean embeddings)
    clean_run = backend.run(tokens, mask, capture=list(dict.fromkeys(wnames + rnames)), grad_of=grad_names,
                            **r_clean)
    runs = [clean_run]
    if method == "eap-ig":
        e_clean, e_corr = clean_run.acts["hook_embed"], corr.acts["hook_embed"]
        # LN-free the reader gradients are linear in the hook gradients whatever the activations: sum those
        # as the steps come (one reader_grads per layer, one set of gradients in memory); an LN baseline's
        # vector-Jacobian product depends on each step's residual stream, so each step is kept.
        lnfree = backend.norms().lnfree
        for k in range(1, steps):
            mix = {"hook_embed": lambda act, a=k / steps: e_corr + a * (e_clean - e_corr)}
            run = backend.run(tokens, mask, hooks=mix, capture=[] if lnfree else rnames, grad_of=grad_names,
                              **r_clean)
            if lnfree:
                for name in grad_names:
                    clean_run.grads[name] = clean_run.grads[name] + run.grads[name]
            else:
                runs.append(run)
        if lnfree:
            for name in grad_names:
                clean_run.grads[name] = clean_run.grads[name] / steps
    valid_pos = (mask.bool() & c_mask.bool()).to(clean_run.acts["hook_embed"].dtype)  # [B, P]
    with torch.no_grad():
        delta = writer_outputs(backend, corr.acts, minus=clean_run.acts)  # [B, W, P, d]
        if not bool(valid_pos.all()):  # pragma: no mutate (padding's gradient is 0 today; kept as a guard)
            delta *= valid_pos[:, None, :, None]
        W, R = len(graph.writers), len(graph.readers)
        B, P = tokens.shape
        shape = (W, R, P, B) if per_position else (W, R, B)
        dense = torch.zeros(shape, dtype=delta.dtype, device=delta.device)
        # position-summed scores: one [writer, pos*d] x [pos*d, reader] product per prompt (both operands are
        # views of prompt-major tensors: no copy)
        for layer in [*range(L), None]:
            parts = reader_grads(backend, runs[0].acts, runs[0].grads, layer)  # [r, B, P, d] blocks
            if len(runs) > 1:  # pragma: no mutate (EAP-IG on an LN baseline: the mean over the steps, out of place)
                for run in runs[1:]:
                    parts = [p + q for p, q in zip(parts, reader_grads(backend, run.acts, run.grads, layer))]
                parts = [p / len(runs) for p in parts]
            start = R - 1 if layer is None else graph.reader_start(layer)
            n = W if layer is None else graph.mlp_writer(layer)  # only writers that can feed them
            for g in parts:
                stop = start + g.shape[0]
                if per_position:
                    dense[:n, start:stop] = torch.einsum("bwpd,rbpd->wrpb", delta[:, :n], g)
                else:  # per prompt [n, P*d] x [P*d, r]; both operands strided views (no copy)
                    scores = torch.bmm(delta[:, :n].reshape(B, n, -1), g.reshape(g.shape[0], B, -1).permute(1, 2, 0))
                    dense[:n, start:stop] = scores.permute(1, 2, 0)
                start = stop
        values = dense[graph.edge_index]  # [E, (P,) B]
    linear = bool(getattr(metric, "linear", False))
    # into the logits the gradient is constant for a linear metric on an LN-free model: EAP and EAP-IG are exact
    exact = backend.norms().ln_final.is_identity and linear
    return EdgeResult(
        values=values, edges=graph.edges, metric=clean_run.metric, kind=method, n_layers=L,
        n_heads=backend.n_heads, positions=list(range(P)) if per_position else None,
        exact_readers=("logits",) if exact else (),
        extra={"metric_clean": clean_run.metric, "metric_corrupted": corr.metric, "backend": backend.name,
               "steps": steps if method == "eap-ig" else 1, "lnfree": backend.lnfree},
    )


# --------------------------------------------------------------------------------------------
# Edge patching (ground truth)
# --------------------------------------------------------------------------------------------


def edge_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    edges: Sequence[Any] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    attention_mask: Tensor | None = None,
    corrupted_attention_mask: Tensor | None = None,
    per_prompt: bool = True,
) -> EdgeResult:
    """Patch each edge alone and measure ``metric(patched) - metric(clean)``: the ground truth for EAP.

    Patching edge ``w -> r`` gives reader ``r`` the input ``norm(resid + w_corrupted - w_clean)``;
    nothing else changes (every other reader keeps its clean input; the effect propagates through
    ``r``'s output). Many edges per forward pass: the batch is replicated once per edge, about
    ``batch_size`` rows per pass. (ACDC-style ground truth; one forward per edge in other tools.)

    Args:
        model: anything the loaders return.
        clean: clean prompts; ``corrupted`` of equal token lengths.
        corrupted: corrupted prompts.
        metric: logits -> ``[batch]`` (need not be differentiable).
        edges: labels (``"L0H1->L1H2.k"``), `Edge` s or ``(writer, reader)`` pairs; default all.
        batch_size: rows per forward pass; more prompts than that are streamed in batches.
        progress: a tqdm bar over the forward passes.
        attention_mask: ``[batch, pos]`` mask for padded clean token ids.
        corrupted_attention_mask: the same for the corrupted token ids.
        per_prompt: as in [`edge_attribution`][lnfree_interp.edge_attribution].

    Returns:
        `EdgeResult` (``kind="edge_patching"``), ``values [edge, batch]``.

    Raises:
        LNFreeError: unknown edges, edges from another model's graph, mismatched inputs, a bad metric,
            ``batch_size < 1``.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LNFreeError(f"batch_size={batch_size!r} must be an integer >= 1.")
    wants_stream(clean, batch_size, per_prompt)  # validates per_prompt
    backend = get_backend(model)
    graph = graph_of(backend)
    if isinstance(edges, (str, Edge)):
        edges = [edges]
    chosen = graph.edges if edges is None else [Edge.parse(e) for e in edges]
    if not chosen:
        raise LNFreeError("edges=[]: pass at least one edge (or None for every edge of the graph).")
    if len(set(chosen)) != len(chosen):
        raise LNFreeError("edges lists some edge more than once; pass each edge once.")
    graph.mask(chosen)  # validates
    if (is_loader(clean) or prepare_count(backend, clean) > batch_size  # pragma: no mutate (streams; same numbers)
            or not per_prompt):
        return stream_pairs(edge_patching, model, clean, corrupted, metric, chunk=batch_size, show_progress=progress,
                            per_prompt=per_prompt,
                            attention_mask=attention_mask, corrupted_attention_mask=corrupted_attention_mask,
                            edges=chosen, batch_size=batch_size, progress=False)
    tokens, mask, c_tokens, c_mask = pair_inputs(backend, clean, corrupted, attention_mask, corrupted_attention_mask)
    f_clean, f_corr = bind_metric(metric, backend, mask), bind_metric(metric, backend, c_mask)
    B = tokens.shape[0]
    wnames = writer_hooks(backend.n_layers)
    with torch.no_grad():
        corr = backend.run(c_tokens, c_mask, capture=wnames, **readout(f_corr))
        clean_run = backend.run(tokens, mask, capture=wnames, **readout(f_clean))
        delta = writer_outputs(backend, corr.acts, minus=clean_run.acts)  # [B, W, P, d]
        m_clean = clean_run.metric
        assert m_clean is not None  # the run was given a metric
        copies = max(1, batch_size // B)  # pragma: no mutate (edges per pass)
        effects = torch.empty(len(chosen), B, dtype=m_clean.dtype, device=m_clean.device)
        chunks = range(0, len(chosen), copies)
        H = backend.n_heads
        for start in tqdm(chunks, desc="edge patching", disable=not progress or len(chunks) < 3,  # pragma: no mutate
                          mininterval=1.0):  # pragma: no mutate (the bar)
            chunk = chosen[start:start + copies]
            J = len(chunk)
            by_reader: dict[tuple[int | None, str], list[tuple[int, int, int | None]]] = {}
            for j, e in enumerate(chunk):
                kind = e.reader.kind
                by_reader.setdefault((e.reader.layer, kind), []).append((j, graph.w_index[e.writer], e.reader.head))

            def extra(layer: int | None, kind: str, by_reader=by_reader, J=J):
                jobs = by_reader.get((layer, kind))
                if not jobs:
                    return None
                P, d = delta.shape[2], delta.shape[3]
                if kind in "qkv":
                    out = delta.new_zeros(J, H, B, P, d)
                    for j, wi, h in jobs:
                        out[j, h] = delta[:, wi]
                else:
                    out = delta.new_zeros(J, B, P, d)
                    for j, wi, _ in jobs:
                        out[j] = delta[:, wi]
                return out

            rebuild = Rebuild(backend, J, extra)
            out = readout(f_clean, J)
            f_rows = out["metric"]
            logits = backend.run(tokens.repeat(J, 1), mask.repeat(J, 1), hooks=rebuild.hooks(),
                                 positions=out.get("positions")).logits
            logits = logits.view(J, B, *logits.shape[1:])
            for j in range(J):
                effects[start + j] = f_rows(logits[j]) - m_clean
    return EdgeResult(values=effects, edges=list(chosen), metric=m_clean, kind="edge_patching",
                      n_layers=backend.n_layers, n_heads=H,
                      extra={"metric_clean": m_clean, "metric_corrupted": corr.metric, "backend": backend.name,
                             "lnfree": backend.lnfree})


