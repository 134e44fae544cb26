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
from .graph import Graph, Rebuild, graph_of
from .inputs import pair_inputs
from .metrics import bind_metric, readout
from .nodes import Edge

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
        if isinstance(c, (EdgeResult, str, Edge)):
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


class _Ablated:
    """The writers' ablated outputs, from one run's captures: the embedding, each layer's MLP output, each
    layer's heads summed (``hook_attn_out - b_O``) and its ``hook_z``; a single head's output ``z @ W_O`` only
    when asked for (never all ``[B, W, P, d]`` at once). With ``weight`` (``[B, P]``, the real tokens), the
    mean over prompts and real positions instead (``[1, 1, ...]``, broadcast; linear, so the mean of ``z``
    projects to the mean of a head's output)."""

    def __init__(self, backend: Backend, acts: dict[str, Tensor], weight: Tensor | None = None):
        w = backend.weights()
        self.W_O, self.H = w.W_O, backend.n_heads

        def red(x: Tensor) -> Tensor:
            if weight is None:
                return x
            wt = weight.to(x.dtype).view(*weight.shape, *[1] * (x.dim() - 2))
            return (x * wt).sum((0, 1), keepdim=True) / wt.sum()  # pragma: no mutate (keepdim: broadcasts alike)

        L = backend.n_layers
        self.embed = red(acts["hook_embed"] + acts["hook_pos_embed"])
        self.attn = [red(acts[f"blocks.{i}.hook_attn_out"] - w.b_O[i]) for i in range(L)]
        self.z = [red(acts[f"blocks.{i}.attn.hook_z"]) for i in range(L)]
        self.mlp = [red(acts[f"blocks.{i}.hook_mlp_out"]) for i in range(L)]

    @staticmethod
    def hooks(n_layers: int) -> list[str]:
        return ["hook_embed", "hook_pos_embed"] + [f"blocks.{i}.{n}" for i in range(n_layers)
                                                   for n in ("attn.hook_z", "hook_attn_out", "hook_mlp_out")]

    def one(self, i: int) -> Tensor:
        """Writer ``i``'s output ``[B, P, d]`` (graph order: embed, then per layer its heads and its MLP)."""
        if i == 0:
            return self.embed
        layer, h = divmod(i - 1, self.H + 1)
        return self.mlp[layer] if h == self.H else self.z[layer][..., h, :] @ self.W_O[layer][h]


def _evaluate(backend: Backend, graph: Graph, masks: Tensor, tokens: Tensor, mask: Tensor, f_clean,
              ablated: _Ablated) -> Tensor:
    """Metric ``[J, B]`` with every reader's non-circuit inputs taken from ``ablated``.

    A reader's extra input (added to the running residual stream) is a sum of terms
    ``coef [J, readers] x tensor [J, B, P, d]`` (see `Rebuild`): ``cum`` = the sum over the writers so far of
    ``ablated - running`` (the extra of a reader with no circuit edge) minus its circuit edges' terms, or the
    sum of its non-circuit edges' terms, whichever touches fewer writers (sparse circuits: a few; near-full
    circuits: a few). ``cum`` is updated a layer at a time from ``hook_attn_out`` (the sum of the heads); a
    head's own output is computed only when one of its edges is among those terms.
    """
    J = masks.shape[0]
    B = tokens.shape[0]
    H, L = backend.n_heads, backend.n_layers
    w = backend.weights()
    W_O, b_O = w.W_O, w.b_O
    off = (~masks & graph.valid).to(backend.dtype)  # [J, W, R]: edges that get the ablated value
    on = (masks & graph.valid).to(backend.dtype)  # [J, W, R]: circuit edges (running values)
    running: dict[int, Tensor] = {}  # writer index -> its output in this pass [J, B, P, d] (heads: on demand)
    z_of: dict[int, Tensor] = {}  # layer -> hook_z of this pass [J, B, P, H, d_head]
    # (summed ablated output, summed running output) of the writers, in the order the pass writes them
    written: list[tuple[Tensor, Tensor]] = []
    state: dict[str, Any] = {"cum": None, "k": 0}

    def split(x: Tensor) -> Tensor:
        return x.view(J, B, *x.shape[1:])

    def on_z(layer: int):
        def fn(act: Tensor) -> None:
            z_of[layer] = split(act)
        return fn

    def on_attn_out(layer: int):
        def fn(act: Tensor) -> None:  # the sum of the layer's heads (b_O is a constant writer)
            written.append((ablated.attn[layer], split(act) - b_O[layer]))
        return fn

    def on_mlp(layer: int):
        def fn(act: Tensor) -> None:
            i = graph.mlp_writer(layer)  # this layer's MLP
            running[i] = split(act)
            written.append((ablated.mlp[layer], running[i]))
        return fn

    embed_parts: dict[str, Tensor] = {}

    def on_embed(name: str):
        def fn(act: Tensor) -> None:
            embed_parts[name] = act
            if len(embed_parts) == 2:  # token + position embedding: the embed writer
                total = embed_parts["hook_embed"] + embed_parts["hook_pos_embed"]
                running[0] = split(total.expand(J * B, *total.shape[1:]))
                written.append((ablated.embed, running[0]))
        return fn

    def output(i: int) -> Tensor:
        if i not in running:  # a head: z @ W_O of that head
            layer, h = (i - 1) // (H + 1), (i - 1) % (H + 1)
            running[i] = z_of[layer][..., h, :] @ W_O[layer][h]
        return running[i]

    def diff(i: int) -> Tensor:  # [J, B, P, d]
        return ablated.one(i)[None] - output(i)

    def extra(layer: int | None, kind: str):
        for abl, value in written[state["k"]:]:
            d = abl[None] - value
            state["cum"] = d if state["cum"] is None else state["cum"] + d
        state["k"] = len(written)
        if layer is None:
            r_idx = [len(graph.readers) - 1]
        else:
            start = graph.reader_start(layer)
            base = {"q": 0, "k": H, "v": 2 * H, "mlp_in": 3 * H}[kind]
            r_idx = [start + base + h for h in range(H if kind in "qkv" else 1)]  # pragma: no mutate (extra: unused)
        # [J, W, r]; a writer after these readers has no valid edge into them (both masks are 0 there)
        c_on, c_off = on[:, :, r_idx], off[:, :, r_idx]
        w_on = c_on.any(0).any(-1).nonzero().flatten().tolist()  # pragma: no mutate (-1 is 1 on [W, r])
        w_off = c_off.any(0).any(-1).nonzero().flatten().tolist()  # pragma: no mutate (-1 is 1 on [W, r])
        if len(w_on) <= len(w_off):  # pragma: no mutate (either branch gives the same terms; this one is shorter)
            return [(None, state["cum"])] + [(-c_on[:, i], diff(i)) for i in w_on]
        if not w_off:  # every edge into these readers is in every circuit: their clean input
            return None
        return [(c_off[:, i], diff(i)) for i in w_off]

    rebuild = Rebuild(backend, J, extra)
    observers: dict[str, Any] = {"hook_embed": on_embed("hook_embed"), "hook_pos_embed": on_embed("hook_pos_embed")}
    for layer in range(L):
        observers[f"blocks.{layer}.attn.hook_z"] = on_z(layer)
        observers[f"blocks.{layer}.hook_attn_out"] = on_attn_out(layer)
        observers[f"blocks.{layer}.hook_mlp_out"] = on_mlp(layer)
    out = readout(f_clean, J)
    logits = backend.run(tokens.repeat(J, 1), mask.repeat(J, 1), hooks=rebuild.hooks(observers),
                         positions=out.get("positions")).logits
    logits = logits.view(J, B, *logits.shape[1:])
    return torch.stack([out["metric"](logits[j]) for j in range(J)])


def evaluate_circuit(
    model: Any,
    circuit: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    ablation: Literal["corrupted", "mean"] = "corrupted",
    batch_size: int = 64,  # pragma: no mutate (a default: how many rows share a pass)
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
    curve = faithfulness_curve(model, [circuit], clean, corrupted, metric, ablation=ablation, batch_size=batch_size,
                               progress=False,  # pragma: no mutate (the bar)
                               attention_mask=attention_mask, corrupted_attention_mask=corrupted_attention_mask)
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
    batch_size: int = 64,  # pragma: no mutate (a default: how many rows share a pass)
    progress: bool = True,  # pragma: no mutate (a default: the bar)
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
        if not isinstance(sizes, (list, tuple, range)) or isinstance(sizes, str):
            raise LNFreeError(f"faithfulness_curve(model, (result, sizes), ...) takes a list of sizes, e.g. "
                              f"(result, [10, 50, 200]); got {sizes!r}.")
        circuits = [result.top_edges(int(n)) for n in sizes]
    flat = isinstance(circuits, (list, tuple)) and bool(circuits) and isinstance(circuits[0], (str, Edge))
    if circuits is None or isinstance(circuits, (str, Edge, EdgeResult)) or torch.is_tensor(circuits) or flat:
        raise LNFreeError("faithfulness_curve takes a list of circuits (each a list of edges or a boolean mask), or "
                          "(result, [n1, n2, ...]) for the top-n edges of a result; for one circuit use "
                          "evaluate_circuit, or wrap it: [edges].")
    masks = _circuit_masks(graph, list(circuits))
    tokens, mask, c_tokens, c_mask = pair_inputs(backend, clean, corrupted, attention_mask, corrupted_attention_mask)
    f_clean, f_corr = bind_metric(metric, backend, mask), bind_metric(metric, backend, c_mask)
    B = tokens.shape[0]  # pragma: no mutate (only sets how many circuits share a pass)
    names = _Ablated.hooks(backend.n_layers)
    with torch.no_grad():
        if ablation == "corrupted":
            # the empty circuit gives every reader its corrupted input, i.e. the corrupted run (tested)
            corr = backend.run(c_tokens, c_mask, capture=names, **readout(f_corr))
            ablated, m_ablated = _Ablated(backend, corr.acts), corr.metric
            m_clean = backend.run(tokens, mask, **readout(f_clean)).metric
        else:
            clean_run = backend.run(tokens, mask, capture=names, **readout(f_clean))
            ablated, m_clean = _Ablated(backend, clean_run.acts, weight=mask), clean_run.metric
            empty = torch.zeros(1, *graph.valid.shape, dtype=torch.bool)  # pragma: no mutate (row 0 is read)
            m_ablated = _evaluate(backend, graph, empty, tokens, mask, f_clean, ablated)[0]
        copies = max(1, batch_size // B)  # pragma: no mutate (how many circuits share a pass)
        metrics = []
        for start in tqdm(range(0, len(masks), copies), desc="circuits", mininterval=1.0,  # pragma: no mutate
                          disable=not progress or len(masks) <= copies):  # pragma: no mutate (the bar only)
            metrics.append(_evaluate(backend, graph, masks[start:start + copies], tokens, mask, f_clean, ablated))
        metrics_t = torch.cat(metrics)
    assert m_clean is not None and m_ablated is not None  # pragma: no mutate (for mypy: every run had a metric)
    denom = float((m_clean - m_ablated).mean())
    scale = float((m_clean.abs() + m_ablated.abs()).mean()) / 2  # pragma: no mutate (the warning's heuristic)
    if abs(denom) <= 0.05 * scale:  # pragma: no mutate (a warning's heuristic threshold)
        import warnings

        warnings.warn(f"The clean and ablated metrics barely differ (mean {float(m_clean.mean()):.4g} vs "
                      f"{float(m_ablated.mean()):.4g}): normalised faithfulness divides by their difference and is "
                      "unreliable here (nan when they are equal). Use a task whose corruption changes the metric.",
                      stacklevel=2)  # pragma: no mutate (where the warning points)
    faith = [(float(m.mean()) - float(m_ablated.mean())) / denom if denom != 0 else float("nan") for m in metrics_t]
    return {"n_edges": [int(m.sum()) for m in masks], "faithfulness": faith, "metrics": metrics_t,
            "metric_clean": m_clean, "metric_ablated": m_ablated, "ablation": ablation}
