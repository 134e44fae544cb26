"""Circuit evaluation: every reader's input rebuilt from its writers, circuit edges clean, the rest ablated.

Normalised faithfulness ``(m_circuit - m_ablated) / (m_clean - m_ablated)`` (Wang et al. 2023; Hanna et al.
2024). The full graph reproduces the clean metric and the empty graph the ablated one exactly (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .backends import Backend, get_backend
from .edge_results import EdgeResult
from .errors import LNFreeError
from .graph import Graph, Rebuild, graph_of, writer_hooks, writer_outputs
from .inputs import pair_inputs
from .metrics import bind_metric

# --------------------------------------------------------------------------------------------
# Circuit evaluation and faithfulness
# --------------------------------------------------------------------------------------------


def _circuit_masks(graph: Graph, circuits: Sequence[Any]) -> Tensor:
    """``[J, W, R]`` boolean masks of J circuits (each an iterable of edges, or a ``[W, R]`` mask)."""
    out = []
    for c in circuits:
        if c is None or (torch.is_tensor(c) and c.dtype != torch.bool):
            raise LNFreeError("A circuit is a list of edges (e.g. result.top_edges(50)) or a boolean [writers, readers]"
                              f" mask; got {'None' if c is None else f'a {c.dtype} tensor'}.")
        if isinstance(c, EdgeResult) or isinstance(c, str):
            raise LNFreeError("A circuit is a list of edges (e.g. result.top_edges(50)) or a [writers, readers] "
                              "boolean mask; for the top-n edges of a result at several n use "
                              "faithfulness_curve(model, (result, [n1, n2, ...]), ...).")
        if torch.is_tensor(c) and c.dtype == torch.bool:
            if c.shape != graph.valid.shape:
                raise LNFreeError(f"A circuit mask must be [writers, readers] = {tuple(graph.valid.shape)}; got "
                                  f"{tuple(c.shape)} (another model's graph?).")
            out.append(c & graph.valid)
        else:
            out.append(graph.mask(c))
    return torch.stack(out)


def _evaluate(backend: Backend, graph: Graph, masks: Tensor, tokens: Tensor, mask: Tensor, f_clean,
              ablated: Tensor) -> Tensor:
    """Metric ``[J, B]`` with every reader's non-circuit inputs taken from ``ablated`` ``[B, W, P, d]``."""
    J = masks.shape[0]
    B = tokens.shape[0]
    H, L = backend.n_heads, backend.n_layers
    W_O = backend.weights().W_O
    off = (~masks & graph.valid).to(ablated.dtype)  # [J, W, R]: edges that get the ablated value
    running: list[Tensor] = []  # writer outputs of this pass, in order, each [J, B, P, d]

    def split(x: Tensor) -> Tensor:
        return x.view(J, B, *x.shape[1:])

    def on_z(layer: int):
        def fn(act: Tensor) -> None:
            z = split(act)
            running.extend(torch.einsum("jbphk,hkd->hjbpd", z, W_O[layer]).unbind(0))
        return fn

    def on_mlp(act: Tensor) -> None:
        running.append(split(act))

    embed_parts: dict[str, Tensor] = {}

    def on_embed(name: str):
        def fn(act: Tensor) -> None:
            embed_parts[name] = act
            if len(embed_parts) == 2:  # token + position embedding: the embed writer
                total = embed_parts["hook_embed"] + embed_parts["hook_pos_embed"]
                running.append(split(total.expand(J * B, *total.shape[1:])))
        return fn

    on = (masks & graph.valid).to(ablated.dtype)  # [J, W, R]: circuit edges (running values)
    # cum = sum over the writers so far of (ablated - running): the extra of a reader with no circuit edge.
    # A reader's extra is cum minus its circuit edges' terms, or the sum of its non-circuit edges' terms,
    # whichever touches fewer writers (sparse circuits: a few; near-full circuits: a few).
    state: dict[str, Any] = {"cum": None, "n": 0}

    def diff(ws: list[int]) -> Tensor:  # [J, len(ws), B, P, d]
        return ablated[:, ws].transpose(0, 1)[None] - torch.stack([running[w] for w in ws], dim=1)

    def extra(layer: int | None, kind: str):
        n = len(running)
        for w in range(state["n"], n):
            d = ablated[:, w][None] - running[w]
            state["cum"] = d if state["cum"] is None else state["cum"] + d
        state["n"] = n
        if layer is None:
            r_idx = [len(graph.readers) - 1]
        else:
            start, _ = graph.reader_slice(layer)
            base = {"q": 0, "k": H, "v": 2 * H, "mlp_in": 3 * H}[kind]
            r_idx = [start + base + h for h in range(H if kind in "qkv" else 1)]
        c_on, c_off = on[:, :n][:, :, r_idx], off[:, :n][:, :, r_idx]  # [J, n, r]
        w_on = c_on.any(0).any(-1).nonzero().flatten().tolist()
        w_off = c_off.any(0).any(-1).nonzero().flatten().tolist()
        if len(w_on) <= len(w_off):
            out = state["cum"][:, None].expand(J, len(r_idx), *state["cum"].shape[1:])
            if w_on:
                out = out - torch.einsum("jwr,jwbpd->jrbpd", c_on[:, w_on], diff(w_on))
        elif not w_off:  # every edge into these readers is in every circuit: their clean input
            return None
        else:
            out = torch.einsum("jwr,jwbpd->jrbpd", c_off[:, w_off], diff(w_off))
        return out if kind in "qkv" else out[:, 0]

    rebuild = Rebuild(backend, J, extra)
    observers: dict[str, Any] = {"hook_embed": on_embed("hook_embed"), "hook_pos_embed": on_embed("hook_pos_embed")}
    for layer in range(L):
        observers[f"blocks.{layer}.attn.hook_z"] = on_z(layer)
        observers[f"blocks.{layer}.hook_mlp_out"] = on_mlp
    logits = backend.run(tokens.repeat(J, 1), mask.repeat(J, 1), hooks=rebuild.hooks(observers)).logits
    logits = logits.view(J, B, *logits.shape[1:])
    return torch.stack([f_clean(logits[j]) for j in range(J)])


def evaluate_circuit(
    model: Any,
    circuit: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    ablation: Literal["corrupted", "mean"] = "corrupted",
    batch_size: int = 64,
    attention_mask: Tensor | None = None,
    corrupted_attention_mask: Tensor | None = None,
) -> dict[str, Any]:
    """The metric of the model run with only ``circuit``'s edges (others ablated), and its faithfulness.

    Every reader's input is rebuilt from its writers: circuit edges carry the running (clean-input)
    pass's values, every other edge the ablated value (the writer's output on the corrupted prompt, or
    its mean over the clean prompts' real tokens for ``ablation="mean"``). Normalised faithfulness
    ``(m_circuit - m_corrupted) / (m_clean - m_corrupted)`` (Wang et al. 2023; Hanna et al. 2024).
    The full graph reproduces the clean metric and the empty graph the corrupted metric (exactly,
    tested in float64).

    Args:
        model: anything the loaders return.
        circuit: edges (labels, `Edge` s, pairs), or a boolean ``[writers, readers]`` mask.
        clean: clean prompts; corrupted of equal token lengths.
        corrupted: corrupted prompts.
        metric: logits -> ``[batch]``.
        ablation: ``"corrupted"`` or ``"mean"``.
        batch_size: rows per forward pass.
        attention_mask: ``[batch, pos]`` mask for padded clean token ids.
        corrupted_attention_mask: the same for the corrupted token ids.

    Returns:
        dict with ``metric`` ``[batch]`` (circuit), ``metric_clean``, ``metric_corrupted`` (or the
        fully mean-ablated metric), ``faithfulness`` (batch mean of the metric over the batch-mean
        difference) and ``n_edges``.

    Raises:
        LNFreeError: unknown edges or another model's graph, bad ablation, mismatched inputs.
    """
    curve = faithfulness_curve(model, [circuit], clean, corrupted, metric, ablation=ablation,
                               batch_size=batch_size, progress=False, attention_mask=attention_mask,
                               corrupted_attention_mask=corrupted_attention_mask)
    return {"metric": curve["metrics"][0], "metric_clean": curve["metric_clean"],
            "metric_corrupted": curve["metric_ablated"], "faithfulness": float(curve["faithfulness"][0]),
            "n_edges": int(curve["n_edges"][0])}


def faithfulness_curve(
    model: Any,
    circuits: Sequence[Any],
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    ablation: Literal["corrupted", "mean"] = "corrupted",
    batch_size: int = 64,
    progress: bool = True,
    attention_mask: Tensor | None = None,
    corrupted_attention_mask: Tensor | None = None,
) -> dict[str, Any]:
    """`evaluate_circuit` for several circuits, batched (many circuits per forward pass).

    ``circuits`` may also be an `EdgeResult` and a list of sizes: ``faithfulness_curve(model,
    (eap, [10, 50, 200]), ...)`` evaluates the top-n edges by |mean score| for each n.

    Args are those of `evaluate_circuit`, plus ``progress`` (a tqdm bar over the passes).

    Returns:
        dict with ``n_edges`` (list), ``faithfulness`` (list, normalised), ``metrics`` (``[J, batch]``),
        ``metric_clean``, ``metric_ablated``.
    """
    from tqdm.auto import tqdm

    if ablation not in ("corrupted", "mean"):
        raise LNFreeError(f"ablation={ablation!r}: use 'corrupted' or 'mean'.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LNFreeError(f"batch_size={batch_size!r} must be an integer >= 1.")
    backend = get_backend(model)
    graph = graph_of(backend)
    if isinstance(circuits, tuple) and len(circuits) == 2 and isinstance(circuits[0], EdgeResult):
        result, sizes = circuits
        circuits = [result.top_edges(int(n)) for n in sizes]
    if circuits is None or isinstance(circuits, (str, EdgeResult)) or torch.is_tensor(circuits):
        raise LNFreeError("faithfulness_curve takes a list of circuits (each a list of edges or a boolean mask), or "
                          "(result, [n1, n2, ...]) for the top-n edges of a result; for one circuit use "
                          "evaluate_circuit.")
    masks = _circuit_masks(graph, list(circuits))
    tokens, mask, c_tokens, c_mask = pair_inputs(backend, clean, corrupted, attention_mask, corrupted_attention_mask)
    f_clean, f_corr = bind_metric(metric, backend, mask), bind_metric(metric, backend, c_mask)
    B = tokens.shape[0]
    wnames = writer_hooks(backend.n_layers)
    with torch.no_grad():
        if ablation == "corrupted":
            # the empty circuit gives every reader its corrupted input, i.e. the corrupted run (tested)
            corr = backend.run(c_tokens, c_mask, capture=wnames, metric=f_corr)
            ablated, m_ablated = writer_outputs(backend, corr.acts), corr.metric
            m_clean = backend.run(tokens, mask, metric=f_clean).metric
        else:
            clean_run = backend.run(tokens, mask, capture=wnames, metric=f_clean)
            outs = writer_outputs(backend, clean_run.acts)  # [B, W, P, d]
            weight = mask.to(outs.dtype)[:, None, :, None]
            mean = (outs * weight).sum((0, 2), keepdim=True) / weight.sum()
            ablated, m_clean = mean.expand_as(outs).contiguous(), clean_run.metric
            empty = torch.zeros(1, *graph.valid.shape, dtype=torch.bool)
            m_ablated = _evaluate(backend, graph, empty, tokens, mask, f_clean, ablated)[0]
        copies = max(1, batch_size // B)
        metrics = []
        for start in tqdm(range(0, len(masks), copies), desc="circuits", mininterval=1.0,
                          disable=not progress or len(masks) <= copies):
            metrics.append(_evaluate(backend, graph, masks[start:start + copies], tokens, mask, f_clean, ablated))
        metrics_t = torch.cat(metrics)
    assert m_clean is not None and m_ablated is not None  # every run above was given a metric
    denom = float((m_clean - m_ablated).mean())
    scale = float((m_clean.abs() + m_ablated.abs()).mean()) / 2
    if abs(denom) <= 0.05 * scale:
        import warnings

        warnings.warn(f"The clean and ablated metrics barely differ (mean {float(m_clean.mean()):.4g} vs "
                      f"{float(m_ablated.mean()):.4g}): normalised faithfulness divides by their difference and is "
                      "unreliable here (nan when they are equal). Use a task whose corruption changes the metric.",
                      stacklevel=2)
    faith = [(float(m.mean()) - float(m_ablated.mean())) / denom if denom != 0 else float("nan") for m in metrics_t]
    return {"n_edges": [int(m.sum()) for m in masks], "faithfulness": faith, "metrics": metrics_t,
            "metric_clean": m_clean, "metric_ablated": m_ablated, "ablation": ablation}
