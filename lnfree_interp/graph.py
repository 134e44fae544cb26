"""The residual-stream graph of a GPT-2 and the machinery shared by every edge computation.

`Graph` lists writers, readers and valid edges; ``writer_outputs`` / ``reader_grads`` turn
captured activations into each writer's output and each reader's input gradient; `Rebuild`
gives readers the input ``norm(resid + extra)`` inside a forward pass - the identity behind edge
patching and circuit evaluation (LN-free ``norm`` is the identity, so a reader's input is exactly the
sum of its writers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .backends import Backend
from .errors import LNFreeError
from .nodes import Edge, n_edges, readers, writers

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
        self.valid = w_order[:, None] < r_order[None, :]  # [W, R]; pragma: no mutate (no order is shared)
        self.n_edges = int(self.valid.sum())
        if self.n_edges != n_edges(n_layers, n_heads):  # pragma: no cover - the two are one definition
            raise LNFreeError("Internal error: edge count mismatch.")
        self.edge_index = self.valid.nonzero(as_tuple=True)  # edges in writer-major order
        self._edges: list[Edge] | None = None

    @property
    def edges(self) -> list[Edge]:
        """Every edge, writer-major (built on first use: GPT-2 XL has 2.2 M)."""
        if self._edges is None:
            wi, ri = self.edge_index
            self._edges = [Edge(self.writers[a], self.readers[b]) for a, b in zip(wi.tolist(), ri.tolist())]
        return self._edges

    def reader_start(self, layer: int) -> int:
        """Index of layer ``layer``'s first reader (its readers: q of every head, k, v, then ``mlp_in``)."""
        return layer * (3 * self.n_heads + 1)

    def mlp_writer(self, layer: int) -> int:
        """Index of ``{layer}_mlp_out`` among the writers: also the number of writers its ``mlp_in`` reads
        (``embed``, every earlier layer's heads and MLP, this layer's heads)."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def mask(self, edges: Iterable[Any]) -> Tensor:
        """Boolean ``[W, R]`` of the given edges (labels, `Edge` or ``(writer, reader)`` pairs).

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


def graph_of(backend: Backend) -> Graph:
    return Graph(backend.n_layers, backend.n_heads)


# --------------------------------------------------------------------------------------------
# Writers' outputs and readers' input gradients
# --------------------------------------------------------------------------------------------


def writer_hooks(L: int) -> list[str]:
    return ["hook_embed", "hook_pos_embed"] + [f"blocks.{l}.{n}" for l in range(L)  # noqa: E741
                                               for n in ("attn.hook_z", "hook_mlp_out")]


def writer_outputs(backend: Backend, acts: dict[str, Tensor],
                   minus: dict[str, Tensor] | None = None) -> Float[Tensor, "batch writer pos d_model"]:
    """Every writer's output, prompt-major (biases excluded from heads: ``b_O`` is a constant writer).

    With ``minus`` (another run's captures), the difference ``acts - minus`` of every writer, taken
    before ``W_O`` (one projection per head instead of two)."""
    W_O = backend.weights().W_O
    H = backend.n_heads

    def get(name: str) -> Tensor:
        return acts[name] if minus is None else acts[name] - minus[name]

    embed = get("hook_embed") + get("hook_pos_embed")
    B, P, d = acts["hook_embed"].shape
    out = embed.new_empty(B, 1 + backend.n_layers * (H + 1), P, d)  # pragma: no mutate (a spare slot is unused)
    out[:, 0] = embed
    for layer in range(backend.n_layers):
        i = 1 + layer * (H + 1)
        out[:, i : i + H] = torch.einsum("bphk,hkd->bhpd", get(f"blocks.{layer}.attn.hook_z"), W_O[layer])
        out[:, i + H] = get(f"blocks.{layer}.hook_mlp_out")
    return out


def reader_hooks(L: int) -> list[str]:
    names = []
    for layer in range(L):
        names += [f"blocks.{layer}.attn.hook_{x}" for x in "qkv"] + [f"blocks.{layer}.hook_mlp_in",
                                                                    f"blocks.{layer}.hook_resid_pre",
                                                                    f"blocks.{layer}.hook_resid_mid"]
    return names + [f"blocks.{L - 1}.hook_resid_post"]


def reader_grads(backend: Backend, acts: dict[str, Tensor], grads: dict[str, Tensor],
                 layer: int | None) -> list[Float[Tensor, "reader batch pos d_model"]]:
    """``d metric / d (reader input)`` for the readers of ``layer`` (``None``: the logits), in reader order as
    contiguous blocks: the heads' q, k, v inputs ``[3 n_heads, B, P, d]`` (one ``bmm``), then the MLP's
    ``[1, B, P, d]`` (no concatenation copy)."""
    if layer is None:
        return [grads[f"blocks.{backend.n_layers - 1}.hook_resid_post"][None]]
    w, norms = backend.weights(), backend.norms()
    p = f"blocks.{layer}."
    B, P, H, k = grads[p + "attn.hook_q"].shape
    g_qkv = torch.cat([grads[p + f"attn.hook_{x}"].permute(2, 0, 1, 3).reshape(H, B * P, k) for x in "qkv"])
    W = torch.cat([w.W_Q[layer], w.W_K[layer], w.W_V[layer]]).transpose(1, 2)  # [3H, d_head, d]
    qkv = torch.bmm(g_qkv, W).view(3 * H, B, P, -1)  # d/d(normalised input)
    g = grads[p + "hook_mlp_in"]  # the MLP's (normalised) input
    return [norms.ln1[layer].vjp(acts[p + "hook_resid_pre"], qkv),
            norms.ln2[layer].vjp(acts[p + "hook_resid_mid"], g)[None]]


# --------------------------------------------------------------------------------------------
# Rebuilding readers' inputs inside a forward pass
# --------------------------------------------------------------------------------------------


class Rebuild:
    """Hooks that give reader inputs ``norm(resid + extra)``, with ``extra`` per reader from a callback.

    ``extra(layer, kind)`` returns, for the readers of one group (the n_heads q, k or v inputs of a layer, or
    its ``mlp_in``, or the ``logits``; J copies of the batch stacked in the forward), either ``None`` (no
    change), a dense tensor (``[J, n_heads, B, P, d]`` for q/k/v, ``[J, B, P, d]`` otherwise), or a list of
    terms ``(coef, x)``: ``extra[j, r] = sum coef[j, r] * x[j]`` with ``x [J, B, P, d]`` and ``coef [J, r]``
    (``None``: 1). LN-free, a head's rebuilt q/k/v is then the running one plus each term projected once
    for all heads (``x @ W``, never a ``[J, n_heads, B, P, d]`` input). The running residual stream is
    read at ``hook_resid_pre`` / ``mid``; the MLP's input is replaced before ``W_in`` (``hook_mlp_in``).
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
            fns[p + "hook_mlp_in"] = self._mlp(layer)
        last = f"blocks.{L - 1}.hook_resid_post"
        fns[last] = self._logits(fns.get(last))
        return fns

    def _split(self, x: Tensor) -> Tensor:
        return x.view(self.J, -1, *x.shape[1:])

    @staticmethod
    def _dense(extra: Any, n: int | None) -> Tensor:
        """A list of terms as one tensor: ``[J, n, B, P, d]`` (``n`` readers) or ``[J, B, P, d]`` (``None``)."""
        if not isinstance(extra, list):
            return extra
        out = None
        for coef, x in extra:
            if n is None:
                t = x if coef is None else coef[:, 0, None, None, None] * x
            else:
                t = x[:, None] if coef is None else coef[:, :, None, None, None] * x[:, None]
            out = t if out is None else out + t
        assert out is not None  # pragma: no cover - a list has at least one term
        return out if n is None else out.expand(out.shape[0], n, *out.shape[2:])

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
        H, d, k = W.shape

        def fn(act: Tensor) -> Tensor | None:
            extra = self.extra(layer, kind)
            if extra is None:
                return None
            if isinstance(extra, list) and norm.is_identity:  # (resid + x) @ W = act + x @ W, one product per term
                W_all = W.permute(1, 0, 2).reshape(d, H * k)
                new = self._split(act)  # [J, B, P, H, k]
                for coef, x in extra:
                    proj = (x @ W_all).view(*x.shape[:-1], H, k)
                    new = new + (proj if coef is None else proj * coef[:, None, None, :, None])
                return new.reshape(act.shape).to(act.dtype)
            resid = self._split(self.resid[f"blocks.{layer}.hook_resid_pre"])  # [J, B, P, d]
            x = norm(resid[:, None] + self._dense(extra, H))  # [J, H, B, P, d]
            new = torch.einsum("jhbpd,hdk->jbphk", x, W) + b
            return new.reshape(act.shape).to(act.dtype)
        return fn

    def _mlp(self, layer: int):
        norm = self.norms.ln2[layer]

        def fn(act: Tensor) -> Tensor | None:  # the MLP's input (before W_in: no second projection)
            extra = self.extra(layer, "mlp_in")
            if extra is None:
                return None
            resid = self._split(self.resid[f"blocks.{layer}.hook_resid_mid"])
            return norm(resid + self._dense(extra, None)).reshape(act.shape).to(act.dtype)
        return fn

    def _logits(self, observer):
        def fn(act: Tensor) -> Tensor | None:
            if observer is not None:
                observer(act)
            extra = self.extra(None, "logits")
            if extra is None:
                return None
            return (self._split(act) + self._dense(extra, None)).reshape(act.shape)
        return fn
