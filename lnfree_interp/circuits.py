"""Edge-level circuit discovery: EAP, EAP-IG, edge patching and circuit evaluation.

The graph (see :mod:`lnfree_interp.nodes`): writers ``embed``, every head ``L{l}H{h}`` and every MLP
``{l}_mlp_out``; readers every head's ``.q``, ``.k``, ``.v`` input, every ``{l}_mlp_in`` and ``logits``.
Each reader's input is the LayerNorm (``NormSpec``, the identity LN-free) of the residual stream,
and the residual stream is the sum of the writers' outputs plus constant biases. So the input of
reader ``r`` with the edge ``w -> r`` patched is ``norm(resid + delta_w)``, ``delta_w`` the change of
``w``'s output; every quantity below is built from that one identity.

* :func:`edge_attribution` - EAP (Syed et al. 2023; Hanna et al. 2024):
  ``score(w -> r) = (w_corrupted - w_clean) . d metric / d (input of r)``; the gradient at a head's
  q/k/v input is the ``hook_q/k/v`` gradient times ``W_Q/W_K/W_V`` pulled back through the
  LayerNorm's vector-Jacobian product (nothing LN-free), at an MLP's input the ``mlp.hook_pre``
  gradient times ``W_in``, at the logits the final residual's gradient. One corrupted forward plus one
  clean forward and backward for all edges; ``method="eap-ig"`` averages the gradients over
  ``steps`` inputs interpolated between the corrupted and clean embeddings (EAP-IG-inputs).
* :func:`edge_patching` - the ground truth: each edge patched alone, many per forward pass.
* :func:`evaluate_circuit` / :func:`faithfulness_curve` - every reader's input rebuilt from its
  writers: circuit edges from the running pass, all others from the ablated (corrupted or mean) run.

LN-free with a metric linear in the logits (``logit_diff``), EAP of every edge into ``logits`` equals
edge patching exactly; for edges into q/k/v/MLP inputs EAP is first order (measure it with
``compare_attribution(eap, edge_patching(...))``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .backends import Backend, get_backend
from .errors import LNFreeError
from .inputs import pair_inputs
from .metrics import bind_metric
from .edge_results import EdgeResult
from .nodes import Edge, n_edges, readers, writers

Method = Literal["eap", "eap-ig"]


# --------------------------------------------------------------------------------------------
# The graph of one model
# --------------------------------------------------------------------------------------------


class Graph:
    """Writers, readers and the valid-edge mask ``[writer, reader]`` of one model's residual stream."""

    def __init__(self, n_layers: int, n_heads: int):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.writers, self.readers = writers(n_layers, n_heads), readers(n_layers, n_heads)
        self.w_index = {w: i for i, w in enumerate(self.writers)}
        self.r_index = {r: i for i, r in enumerate(self.readers)}
        w_order = torch.tensor([w.order for w in self.writers])
        r_order = torch.tensor([r.order for r in self.readers])
        self.valid = w_order[:, None] < r_order[None, :]  # [W, R]
        self.n_edges = int(self.valid.sum())
        if self.n_edges != n_edges(n_layers, n_heads):  # pragma: no cover - the two are one definition
            raise LNFreeError("Internal error: edge count mismatch.")
        wi, ri = self.valid.nonzero(as_tuple=True)
        self.edge_index = (wi, ri)  # edges in writer-major order
        self.edges = [Edge(self.writers[int(a)], self.readers[int(b)]) for a, b in zip(wi, ri)]

    def reader_slice(self, layer: int) -> tuple[int, int]:
        """Reader indices ``[start, stop)`` of one layer (q of every head, k, v, then ``mlp_in``)."""
        per = 3 * self.n_heads + 1
        return layer * per, (layer + 1) * per

    def writers_before(self, layer: int, mlp: bool = False) -> int:
        """Number of writers that precede layer ``layer``'s attention (or its MLP input)."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if mlp else 0)

    def mask(self, edges: Iterable[Any]) -> Tensor:
        """Boolean ``[W, R]`` of the given edges (labels, :class:`Edge` or ``(writer, reader)`` pairs).

        Raises:
            LNFreeError: an unknown label, a writer after its reader, a node of another model's graph.
        """
        out = torch.zeros_like(self.valid)
        for e in edges:
            edge = Edge.parse(e)
            if edge.writer not in self.w_index or edge.reader not in self.r_index:
                raise LNFreeError(f"Edge {edge} is not in this model's graph ({self.n_layers} layers x "
                                  f"{self.n_heads} heads): is the circuit from another model?")
            out[self.w_index[edge.writer], self.r_index[edge.reader]] = True
        return out


def _graph(backend: Backend) -> Graph:
    return Graph(backend.n_layers, backend.n_heads)


# --------------------------------------------------------------------------------------------
# Writers' outputs and readers' input gradients
# --------------------------------------------------------------------------------------------


def _writer_hooks(L: int) -> list[str]:
    return ["hook_embed", "hook_pos_embed"] + [f"blocks.{l}.{n}" for l in range(L)  # noqa: E741
                                               for n in ("attn.hook_z", "hook_mlp_out")]


def _writer_outputs(backend: Backend, acts: dict[str, Tensor]) -> Float[Tensor, "writer batch pos d_model"]:
    """Every writer's output (biases excluded from heads: ``b_O`` is a constant writer)."""
    W_O = backend.weights().W_O
    outs = [acts["hook_embed"] + acts["hook_pos_embed"]]
    for layer in range(backend.n_layers):
        z = acts[f"blocks.{layer}.attn.hook_z"]
        outs += list(torch.einsum("bphk,hkd->hbpd", z, W_O[layer]))
        outs.append(acts[f"blocks.{layer}.hook_mlp_out"])
    return torch.stack(outs)


def _reader_hooks(L: int) -> list[str]:
    names = []
    for layer in range(L):
        names += [f"blocks.{layer}.attn.hook_{x}" for x in "qkv"] + [f"blocks.{layer}.mlp.hook_pre",
                                                                    f"blocks.{layer}.hook_resid_pre",
                                                                    f"blocks.{layer}.hook_resid_mid"]
    return names + [f"blocks.{L - 1}.hook_resid_post"]


def _reader_grads(backend: Backend, acts: dict[str, Tensor], grads: dict[str, Tensor],
                  layer: int | None) -> Float[Tensor, "reader batch pos d_model"]:
    """``d metric / d (reader input)`` for the readers of ``layer`` (``None``: the logits)."""
    if layer is None:
        return grads[f"blocks.{backend.n_layers - 1}.hook_resid_post"][None]
    w, norms = backend.weights(), backend.norms()
    p = f"blocks.{layer}."
    out = []
    for x, W in zip("qkv", (w.W_Q, w.W_K, w.W_V)):
        g = torch.einsum("bphk,hdk->hbpd", grads[p + f"attn.hook_{x}"], W[layer])  # d/d(normalised input)
        out.append(norms.ln1[layer].vjp(acts[p + "hook_resid_pre"], g))
    g = grads[p + "mlp.hook_pre"] @ w.W_in[layer].T
    out.append(norms.ln2[layer].vjp(acts[p + "hook_resid_mid"], g)[None])
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _pair(backend: Backend, clean: Any, corrupted: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return pair_inputs(backend, clean, corrupted)


def _bind(metric: Any, backend: Backend, mask: Tensor):
    return bind_metric(metric, backend, mask)


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
) -> EdgeResult:
    """EAP (or EAP-IG) score of every edge of the model's graph, all prompt pairs at once.

    ``score(w -> r) = (w_corrupted - w_clean) . d metric / d input_r`` summed over positions: a
    first-order estimate of ``metric(edge patched) - metric(clean)`` (the sign convention of
    :func:`lnfree_interp.attribution_patching`). Cost: one corrupted forward and one clean forward +
    backward (EAP), or ``steps`` forwards + backwards on inputs interpolated between the corrupted
    and clean embeddings (EAP-IG-inputs, Hanna et al. 2024, ``alpha = k / steps``, k = 1..steps).
    All scores are one batched contraction per reader layer.

    Args:
        model: anything the loaders return (LN-free or an LN baseline).
        clean: clean prompts (strings or token ids ``[batch, pos]``).
        corrupted: corrupted prompts, each of its clean prompt's token length.
        metric: logits ``[batch, pos, vocab]`` -> ``[batch]``, differentiable (e.g. ``logit_diff``).
        method: ``"eap"`` or ``"eap-ig"``.
        steps: EAP-IG interpolation steps (>= 1).
        per_position: keep positions (``values [edge, pos, batch]``) instead of summing them.

    Returns:
        :class:`EdgeResult` (``kind="eap"`` / ``"eap-ig"``), ``values [edge, batch]`` in the metric's
        units; ``exact_edges()`` are those into ``logits`` when the model is LN-free and the metric
        linear in the logits (there EAP equals :func:`edge_patching`).

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
    graph = _graph(backend)
    tokens, mask, c_tokens, c_mask = _pair(backend, clean, corrupted)
    f_clean, f_corr = _bind(metric, backend, mask), _bind(metric, backend, c_mask)
    L = backend.n_layers
    wnames, rnames = _writer_hooks(L), _reader_hooks(L)
    grad_names = [n for n in rnames if "resid_pre" not in n and "resid_mid" not in n]
    with torch.no_grad():
        corr = backend.run(c_tokens, c_mask, capture=wnames, metric=f_corr)
    if method == "eap":
        clean_run = backend.run(tokens, mask, capture=list(dict.fromkeys(wnames + rnames)), grad_of=grad_names,
                                metric=f_clean)
        runs = [clean_run]
    else:
        clean_run = backend.run(tokens, mask, capture=list(dict.fromkeys(wnames + rnames)), metric=f_clean)
        e_clean = clean_run.acts["hook_embed"]
        e_corr = corr.acts["hook_embed"]
        runs = []
        for k in range(1, steps + 1):
            alpha = k / steps
            mix = {"hook_embed": lambda act, a=alpha: e_corr + a * (e_clean - e_corr)}
            runs.append(backend.run(tokens, mask, hooks=mix, capture=rnames, grad_of=grad_names, metric=f_clean))
    valid_pos = (mask.bool() & c_mask.bool()).to(clean_run.logits.dtype)  # [B, P]
    with torch.no_grad():
        delta = (_writer_outputs(backend, corr.acts) - _writer_outputs(backend, clean_run.acts))
        delta = delta * valid_pos[None, :, :, None]
        W, R = len(graph.writers), len(graph.readers)
        B, P = tokens.shape
        shape = (W, R, P, B) if per_position else (W, R, B)
        dense = torch.zeros(shape, dtype=delta.dtype, device=delta.device)
        for layer in [*range(L), None]:
            g = sum(_reader_grads(backend, run.acts, run.grads, layer) for run in runs) / len(runs)
            start, stop = (R - 1, R) if layer is None else graph.reader_slice(layer)
            if per_position:
                dense[:, start:stop] = torch.einsum("wbpd,rbpd->wrpb", delta, g)
            else:
                dense[:, start:stop] = torch.einsum("wbpd,rbpd->wrb", delta, g)
        dense[~graph.valid] = 0
        values = dense[graph.edge_index]  # [E, (P,) B]
    linear = bool(getattr(metric, "linear", False))
    exact = backend.norms().ln_final.is_identity and linear and method == "eap"
    return EdgeResult(
        values=values, edges=graph.edges, metric=clean_run.metric, kind=method, n_layers=L,
        n_heads=backend.n_heads, positions=list(range(P)) if per_position else None,
        exact_readers=("logits",) if exact else (),
        extra={"metric_clean": clean_run.metric, "metric_corrupted": corr.metric, "backend": backend.name,
               "steps": steps if method == "eap-ig" else 1, "lnfree": backend.lnfree},
    )


# --------------------------------------------------------------------------------------------
# Rebuilding readers' inputs inside a forward pass
# --------------------------------------------------------------------------------------------


class _Rebuild:
    """Hooks that give reader inputs ``norm(resid + extra)``, with ``extra`` per reader from a callback.

    ``extra(layer, kind)`` returns ``[J, n, B, P, d]`` for kind in q/k/v (``n`` = n_heads) or
    ``[J, B, P, d]`` for ``mlp_in`` / ``logits`` (J copies of the batch stacked in the forward), or
    ``None`` for no change. The running residual stream is read at ``hook_resid_pre`` / ``mid``.
    """

    def __init__(self, backend: Backend, J: int, extra):
        self.backend, self.J, self.extra = backend, J, extra
        self.w, self.norms = backend.weights(), backend.norms()
        self.resid: dict[str, Tensor] = {}

    def hooks(self, observers: dict[str, Any] | None = None) -> dict[str, Any]:
        fns: dict[str, Any] = dict(observers or {})
        L = self.backend.n_layers
        for layer in range(L):
            p = f"blocks.{layer}."
            for site in ("hook_resid_pre", "hook_resid_mid"):
                fns[p + site] = self._keep(p + site, fns.get(p + site))
            for kind in "qkv":
                fns[p + f"attn.hook_{kind}"] = self._qkv(layer, kind)
            fns[p + "mlp.hook_pre"] = self._mlp(layer)
        last = f"blocks.{L - 1}.hook_resid_post"
        fns[last] = self._logits(fns.get(last))
        return fns

    def _split(self, x: Tensor) -> Tensor:
        return x.view(self.J, -1, *x.shape[1:])

    def _keep(self, name: str, observer):
        def fn(act: Tensor) -> None:
            if observer is not None:
                observer(act)
            self.resid[name] = act
        return fn

    def _qkv(self, layer: int, kind: str):
        W = {"q": self.w.W_Q, "k": self.w.W_K, "v": self.w.W_V}[kind][layer]
        b = {"q": self.w.b_Q, "k": self.w.b_K, "v": self.w.b_V}[kind][layer]
        norm = self.norms.ln1[layer]

        def fn(act: Tensor) -> Tensor | None:
            extra = self.extra(layer, kind)
            if extra is None:
                return None
            resid = self._split(self.resid[f"blocks.{layer}.hook_resid_pre"])  # [J, B, P, d]
            x = norm(resid[:, None] + extra)  # [J, H, B, P, d]
            new = torch.einsum("jhbpd,hdk->jbphk", x, W) + b
            return new.reshape(act.shape).to(act.dtype)
        return fn

    def _mlp(self, layer: int):
        norm = self.norms.ln2[layer]
        W, b = self.w.W_in[layer], self.w.b_in[layer]

        def fn(act: Tensor) -> Tensor | None:
            extra = self.extra(layer, "mlp_in")
            if extra is None:
                return None
            resid = self._split(self.resid[f"blocks.{layer}.hook_resid_mid"])
            return (norm(resid + extra) @ W + b).reshape(act.shape).to(act.dtype)
        return fn

    def _logits(self, observer):
        def fn(act: Tensor) -> Tensor | None:
            if observer is not None:
                observer(act)
            extra = self.extra(None, "logits")
            if extra is None:
                return None
            return (self._split(act) + extra).reshape(act.shape)
        return fn


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
        edges: labels (``"L0H1->L1H2.k"``), :class:`Edge` s or ``(writer, reader)`` pairs; default all.
        batch_size: rows per forward pass (at least one copy of the batch).
        progress: a tqdm bar over the forward passes.

    Returns:
        :class:`EdgeResult` (``kind="edge_patching"``), ``values [edge, batch]``.

    Raises:
        LNFreeError: unknown edges, edges from another model's graph, mismatched inputs, a bad metric,
            ``batch_size < 1``.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LNFreeError(f"batch_size={batch_size!r} must be an integer >= 1.")
    backend = get_backend(model)
    graph = _graph(backend)
    chosen = graph.edges if edges is None else [Edge.parse(e) for e in edges]
    graph.mask(chosen)  # validates
    tokens, mask, c_tokens, c_mask = _pair(backend, clean, corrupted)
    f_clean, f_corr = _bind(metric, backend, mask), _bind(metric, backend, c_mask)
    B = tokens.shape[0]
    wnames = _writer_hooks(backend.n_layers)
    with torch.no_grad():
        corr = backend.run(c_tokens, c_mask, capture=wnames, metric=f_corr)
        clean_run = backend.run(tokens, mask, capture=wnames, metric=f_clean)
        delta = _writer_outputs(backend, corr.acts) - _writer_outputs(backend, clean_run.acts)  # [W, B, P, d]
        m_clean = clean_run.metric
        copies = max(1, batch_size // B)
        effects = torch.empty(len(chosen), B, dtype=m_clean.dtype, device=m_clean.device)
        chunks = range(0, len(chosen), copies)
        H = backend.n_heads
        for start in tqdm(chunks, desc="edge patching", disable=not progress or len(chunks) < 3, mininterval=1.0):
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
                        out[j, h] = delta[wi]
                else:
                    out = delta.new_zeros(J, B, P, d)
                    for j, wi, _ in jobs:
                        out[j] = delta[wi]
                return out

            rebuild = _Rebuild(backend, J, extra)
            logits = backend.run(tokens.repeat(J, 1), mask.repeat(J, 1), hooks=rebuild.hooks()).logits
            logits = logits.view(J, B, *logits.shape[1:])
            for j in range(J):
                effects[start + j] = f_clean(logits[j]) - m_clean
    return EdgeResult(values=effects, edges=list(chosen), metric=m_clean, kind="edge_patching",
                      n_layers=backend.n_layers, n_heads=H,
                      extra={"metric_clean": m_clean, "metric_corrupted": corr.metric, "backend": backend.name,
                             "lnfree": backend.lnfree})


# --------------------------------------------------------------------------------------------
# Circuit evaluation and faithfulness
# --------------------------------------------------------------------------------------------


def _circuit_masks(graph: Graph, circuits: Sequence[Any]) -> Tensor:
    """``[J, W, R]`` boolean masks of J circuits (each an iterable of edges, or a ``[W, R]`` mask)."""
    out = []
    for c in circuits:
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
    """Metric ``[J, B]`` with every reader's non-circuit inputs taken from ``ablated`` ``[W, B, P, d]``."""
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

    cache: dict[int, Tensor] = {}

    def extra(layer: int | None, kind: str):
        n = len(running)
        if layer is None:
            r_idx = [len(graph.readers) - 1]
        else:
            start, _ = graph.reader_slice(layer)
            base = {"q": 0, "k": H, "v": 2 * H, "mlp_in": 3 * H}[kind]
            r_idx = [start + base + h for h in range(H if kind in "qkv" else 1)]
        if n not in cache:
            cache.clear()
            cache[n] = ablated[None, :n] - torch.stack(running).transpose(0, 1)  # [J, n, B, P, d]
        diff = cache[n]
        coef = off[:, :n][:, :, r_idx]  # [J, n, r]
        out = torch.einsum("jwr,jwbpd->jrbpd", coef, diff)
        return out if kind in "qkv" else out[:, 0]

    rebuild = _Rebuild(backend, J, extra)
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
        circuit: edges (labels, :class:`Edge` s, pairs), or a boolean ``[writers, readers]`` mask.
        clean: clean prompts; corrupted of equal token lengths.
        corrupted: corrupted prompts.
        metric: logits -> ``[batch]``.
        ablation: ``"corrupted"`` or ``"mean"``.
        batch_size: rows per forward pass.

    Returns:
        dict with ``metric`` ``[batch]`` (circuit), ``metric_clean``, ``metric_corrupted`` (or the
        fully mean-ablated metric), ``faithfulness`` (batch mean of the metric over the batch-mean
        difference) and ``n_edges``.

    Raises:
        LNFreeError: unknown edges or another model's graph, bad ablation, mismatched inputs.
    """
    curve = faithfulness_curve(model, [circuit], clean, corrupted, metric, ablation=ablation,
                               batch_size=batch_size, progress=False)
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
) -> dict[str, Any]:
    """:func:`evaluate_circuit` for several circuits, batched (many circuits per forward pass).

    ``circuits`` may also be an :class:`EdgeResult` and a list of sizes: ``faithfulness_curve(model,
    (eap, [10, 50, 200]), ...)`` evaluates the top-n edges by |mean score| for each n.

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
    graph = _graph(backend)
    if isinstance(circuits, tuple) and len(circuits) == 2 and isinstance(circuits[0], EdgeResult):
        result, sizes = circuits
        circuits = [result.top_edges(int(n)) for n in sizes]
    masks = _circuit_masks(graph, list(circuits))
    tokens, mask, c_tokens, c_mask = _pair(backend, clean, corrupted)
    f_clean, f_corr = _bind(metric, backend, mask), _bind(metric, backend, c_mask)
    B = tokens.shape[0]
    wnames = _writer_hooks(backend.n_layers)
    with torch.no_grad():
        clean_run = backend.run(tokens, mask, capture=wnames, metric=f_clean)
        if ablation == "corrupted":
            corr = backend.run(c_tokens, c_mask, capture=wnames, metric=f_corr)
            ablated = _writer_outputs(backend, corr.acts)
        else:
            outs = _writer_outputs(backend, clean_run.acts)  # [W, B, P, d]
            weight = mask.to(outs.dtype)[None, :, :, None]
            mean = (outs * weight).sum((1, 2), keepdim=True) / weight.sum()
            ablated = mean.expand_as(outs).contiguous()
        copies = max(1, batch_size // B)
        empty = torch.zeros(1, *graph.valid.shape, dtype=torch.bool)
        m_ablated = _evaluate(backend, graph, empty, tokens, mask, f_clean, ablated)[0]
        metrics = []
        for start in tqdm(range(0, len(masks), copies), desc="circuits", mininterval=1.0,
                          disable=not progress or len(masks) <= copies):
            metrics.append(_evaluate(backend, graph, masks[start:start + copies], tokens, mask, f_clean, ablated))
        metrics_t = torch.cat(metrics)
    m_clean = clean_run.metric
    denom = float((m_clean - m_ablated).mean())
    faith = [(float(m.mean()) - float(m_ablated.mean())) / denom if denom != 0 else float("nan") for m in metrics_t]
    return {"n_edges": [int(m.sum()) for m in masks], "faithfulness": faith, "metrics": metrics_t,
            "metric_clean": m_clean, "metric_ablated": m_ablated, "ablation": ablation}
