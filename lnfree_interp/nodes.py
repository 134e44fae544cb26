"""Typed components of the computational graph: writers (``embed``, heads, MLPs) and readers.

A `Node` names a place in a GPT-2 the way TransformerLens and the circuit literature do:

============  ==================  ===============================================  =====================
kind          label               TransformerLens hook                              role
============  ==================  ===============================================  =====================
``embed``     ``embed``           ``hook_embed`` (+ ``hook_pos_embed``)             writer
``head``      ``L3H2``            ``blocks.3.attn.hook_z`` (head 2, through W_O)    writer
``mlp``       ``3_mlp_out``       ``blocks.3.hook_mlp_out``                         writer
``q/k/v``     ``L3H2.q``          ``blocks.3.attn.hook_q`` (head 2)                 reader
``mlp_in``    ``3_mlp_in``        ``blocks.3.hook_mlp_in``                          reader
``logits``    ``logits``          ``blocks.{L-1}.hook_resid_post`` (``ln_final``)   reader
============  ==================  ===============================================  =====================

Edges are ``writer->reader`` (``L3H2->L5H1.k``, ``embed->logits``). Results keep labels (strings)
for display and pandas; `Node.parse` turns any label back into a node without regexes
scattered through the maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import LNFreeError

Kind = Literal["embed", "head", "mlp", "q", "k", "v", "mlp_in", "logits"]
WRITER_KINDS = ("embed", "head", "mlp")
READER_KINDS = ("q", "k", "v", "mlp_in", "logits")


@dataclass(frozen=True, order=True)
class Node:
    """One writer or reader. ``layer``/``head`` are ``None`` where they do not apply."""

    kind: Kind
    layer: int | None = None
    head: int | None = None

    @property
    def label(self) -> str:
        """The TransformerLens-style label (``L3H2``, ``3_mlp_out``, ``L3H2.k``, ``embed``)."""
        if self.kind in ("embed", "logits"):
            return self.kind
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        if self.kind in ("q", "k", "v"):
            return f"L{self.layer}H{self.head}.{self.kind}"
        return f"{self.layer}_{'mlp_out' if self.kind == 'mlp' else 'mlp_in'}"

    def hook(self, n_layers: int | None = None) -> str:
        """The TransformerLens hook where this node's activation lives (``logits`` needs ``n_layers``)."""
        if self.kind == "embed":
            return "hook_embed"
        if self.kind == "logits":
            if n_layers is None:
                raise LNFreeError("Node('logits').hook needs n_layers (the final hook_resid_post).")
            return f"blocks.{n_layers - 1}.hook_resid_post"
        return f"blocks.{self.layer}." + {"head": "attn.hook_z", "mlp": "hook_mlp_out", "q": "attn.hook_q",
                                           "k": "attn.hook_k", "v": "attn.hook_v", "mlp_in": "hook_mlp_in"}[self.kind]

    @property
    def is_writer(self) -> bool:
        return self.kind in WRITER_KINDS

    @property
    def order(self) -> float:
        """Position in the residual stream: writers write at ``order``, readers read at ``order``.

        embed 0; layer l's attention reads at 2l+1 and writes at 2l+1.5; its MLP reads at 2l+2 and
        writes at 2l+2.5; logits read last. A writer feeds a reader iff writer.order < reader.order.
        """
        if self.kind == "embed":
            return 0.0
        if self.kind == "logits":
            return float("inf")
        base = 2 * int(self.layer) + (1 if self.kind in ("head", "q", "k", "v") else 2)  # type: ignore[arg-type]
        return base + (0.5 if self.is_writer else 0.0)

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, label: str | Node) -> Node:
        """A node from its label; raises [`LNFreeError`][lnfree_interp.LNFreeError] for anything else."""
        if isinstance(label, Node):
            return label
        s = str(label).strip()
        if s in ("embed", "logits"):
            return cls(s)  # type: ignore[arg-type]
        try:
            if s.startswith("L") and "H" in s:
                head_part, _, reader = s[1:].partition(".")
                layer, head = (int(x) for x in head_part.split("H"))
                if reader == "":
                    return cls("head", layer, head)
                if reader in ("q", "k", "v"):
                    return cls(reader, layer, head)  # type: ignore[arg-type]
            layer_s, _, rest = s.partition("_")
            if rest in ("mlp_out", "mlp", "mlp_in"):
                return cls("mlp_in" if rest == "mlp_in" else "mlp", int(layer_s))
        except ValueError:
            pass
        raise LNFreeError(f"Unknown node label {label!r}: use 'embed', 'L{{l}}H{{h}}', '{{l}}_mlp_out' (writers), "
                          "'L{l}H{h}.q' / '.k' / '.v', '{l}_mlp_in', 'logits' (readers).")


def writers(n_layers: int, n_heads: int) -> list[Node]:
    """Every writer in residual-stream order: embed, then per layer its heads and its MLP."""
    out = [Node("embed")]
    for layer in range(n_layers):
        out += [Node("head", layer, h) for h in range(n_heads)] + [Node("mlp", layer)]
    return out


def readers(n_layers: int, n_heads: int) -> list[Node]:
    """Every reader in residual-stream order: per layer q, k, v of each head and the MLP input; logits."""
    out: list[Node] = []
    for layer in range(n_layers):
        out += [Node(kind, layer, h) for kind in ("q", "k", "v") for h in range(n_heads)] + [Node("mlp_in", layer)]
    return out + [Node("logits")]


def n_edges(n_layers: int, n_heads: int) -> int:
    """Number of writer->reader edges: ``sum over readers of the writers before them``.

    Closed form: a layer-l head reader sees ``1 + l (H + 1)`` writers, the layer-l MLP input
    ``1 + l (H + 1) + H``, the logits ``1 + L (H + 1)``. GPT-2 small (12 x 12): 32,491.

    Raises:
        LNFreeError: fewer than one layer or one head.
    """
    L, H = n_layers, n_heads
    if isinstance(L, bool) or isinstance(H, bool) or not isinstance(L, int) or not isinstance(H, int) or L < 1 or H < 1:
        raise LNFreeError(f"n_edges({n_layers!r}, {n_heads!r}): a model has at least one layer and one head.")
    per_layer = sum(3 * H * (1 + l * (H + 1)) + (1 + l * (H + 1) + H) for l in range(L))  # noqa: E741
    return per_layer + 1 + L * (H + 1)


@dataclass(frozen=True, order=True)
class Edge:
    """A writer -> reader edge of the residual stream."""

    writer: Node
    reader: Node

    def __post_init__(self) -> None:
        if not self.writer.is_writer or self.reader.is_writer:
            raise LNFreeError(f"An edge goes from a writer (embed, L{{l}}H{{h}}, {{l}}_mlp_out) to a reader "
                              f"(L{{l}}H{{h}}.q/.k/.v, {{l}}_mlp_in, logits); got {self.writer} -> {self.reader}.")
        if not self.writer.order < self.reader.order:
            raise LNFreeError(f"Edge {self.writer}->{self.reader}: the writer comes after its reader in the "
                              "residual stream (a layer's attention is read before it writes; its MLP after).")

    @property
    def label(self) -> str:
        return f"{self.writer.label}->{self.reader.label}"

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, label: str | Edge | tuple) -> Edge:
        if isinstance(label, Edge):
            return label
        if isinstance(label, tuple) and len(label) == 2:
            return cls(Node.parse(label[0]), Node.parse(label[1]))
        w, sep, r = str(label).partition("->")
        if not sep:
            raise LNFreeError(f"Unknown edge {label!r}: edges are written 'writer->reader', e.g. 'L0H1->L1H2.k'.")
        return cls(Node.parse(w), Node.parse(r))
