"""The result of edge attribution and edge patching: per-edge scores, tables, node sums, graph plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from .errors import LNFreeError
from .nodes import READER_KINDS, Edge, Node


@dataclass
class EdgeResult:
    """Per-edge effects of patching ``writer -> reader`` on a metric (in the metric's units, e.g. logits).

    Attributes:
        values: ``[edge, batch]``, or ``[edge, pos, batch]`` with ``positions``.
        edges: the `Edge` of each row.
        metric: ``[batch]``, the model's metric on the clean prompts.
        kind: ``"eap"``, ``"eap-ig"`` or ``"edge_patching"``.
        exact_readers: reader kinds whose scores are exact (EAP into ``logits``, LN-free, linear metric).
        extra: ``metric_clean``, ``metric_corrupted``, ``backend``...; a summary (``per_prompt=False``) adds
            ``n_prompts`` and ``std`` (``[edge]``), and its ``values`` / ``metric`` hold the mean over prompts.
    """

    values: Tensor
    edges: list[Edge]
    metric: Float[Tensor, "batch"]
    kind: str
    n_layers: int
    n_heads: int
    positions: list[int] | None = None
    exact_readers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.edges) != self.values.shape[0]:
            raise ValueError(f"{len(self.edges)} edges for {self.values.shape[0]} rows")
        self._index = {e: i for i, e in enumerate(self.edges)}

    @property
    def n_prompts(self) -> int:
        """How many prompts the values describe (the batch axis, or a summary's count)."""
        return int(self.extra.get("n_prompts", self.values.shape[-1]))

    @property
    def per_prompt(self) -> bool:
        """Whether the last axis holds one value per prompt (``False`` for a summary: their mean)."""
        return "n_prompts" not in self.extra

    @property
    def labels(self) -> list[str]:
        """Edge labels, ``L0H1->L1H2.k``."""
        return [e.label for e in self.edges]

    def mean(self) -> Tensor:
        """Batch mean: ``[edge]`` (``[edge, pos]`` per position)."""
        return self.values.mean(-1)

    def __getitem__(self, edge: Any) -> Tensor:
        """Values of one edge (label, `Edge` or pair)."""
        e = Edge.parse(edge)
        if e not in self._index:
            raise LNFreeError(f"Edge {e} is not in this result (it has {len(self.edges)} edges).")
        return self.values[self._index[e]]

    def _score(self) -> Tensor:
        m = self.mean()
        return m.sum(-1) if m.ndim > 1 else m

    def top_edges(self, k: int) -> list[Edge]:
        """The ``k`` edges with the largest |batch-mean score| (positions summed)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise LNFreeError(f"k={k!r} must be a non-negative integer.")
        k = min(k, len(self.edges))
        idx = self._score().abs().topk(k).indices.tolist() if k else []
        return [self.edges[i] for i in idx]

    def exact_edges(self) -> list[Edge]:
        """Edges whose score is exact (see ``exact_readers``)."""
        return [e for e in self.edges if e.reader.kind in self.exact_readers]

    def to_dataframe(self):
        """One row per edge: ``edge, writer, reader, reader_kind, writer_layer, reader_layer, mean, abs_mean, exact``
        and, over more than one prompt, ``std`` (over prompts, positions summed; a summary's ``extra["std"]``).
        The layers are NaN for ``embed`` and ``logits``, which have none."""
        import pandas as pd

        score = self._score().detach().double().cpu()
        rows = [{"edge": e.label, "writer": e.writer.label, "reader": e.reader.label, "reader_kind": e.reader.kind,
                 "writer_layer": e.writer.layer, "reader_layer": e.reader.layer, "mean": float(v),
                 "abs_mean": abs(float(v)), "exact": e.reader.kind in self.exact_readers}
                for e, v in zip(self.edges, score)]
        frame = pd.DataFrame(rows)
        if self.n_prompts > 1:
            values = self.values.detach().double().cpu()
            std = (values.sum(1) if values.ndim > 2 else values).std(-1) if self.per_prompt else self.extra["std"]
            frame.insert(frame.columns.get_loc("abs_mean") + 1, "std", std.numpy())
        return frame

    def top(self, k: int = 20):
        """The ``k`` largest edges by |batch-mean score| as a DataFrame.

        Raises:
            LNFreeError: ``k`` is not a non-negative integer.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise LNFreeError(f"k={k!r} must be a non-negative integer.")
        df = self.to_dataframe()
        return df.reindex(df["abs_mean"].sort_values(ascending=False).index).head(k).reset_index(drop=True)

    def node_scores(self):
        """Per writer: the sum of its outgoing edges' scores (``pandas.Series``, batch mean).

        For EAP this equals the node's attribution-patching score (a head's through ``hook_z``, an
        MLP's through ``hook_mlp_out``, ``embed``'s through ``blocks.0.hook_resid_pre``): the gradient
        at a writer's output is the sum of its readers' input gradients.
        """
        import pandas as pd

        score = self._score().detach().double().cpu()
        sums: dict[str, float] = {}
        for e, v in zip(self.edges, score):
            sums[e.writer.label] = sums.get(e.writer.label, 0.0) + float(v)
        return pd.Series(sums, name=f"{self.kind} node score")

    def by_reader_kind(self) -> dict[str, Tensor]:
        """Values grouped by reader kind (``q``, ``k``, ``v``, ``mlp_in``, ``logits``)."""
        out = {}
        for kind in READER_KINDS:
            idx = [i for i, e in enumerate(self.edges) if e.reader.kind == kind]
            if idx:
                out[kind] = self.values[idx]
        return out

    def to_tl(self, positions: list[int] | None = None) -> dict[tuple[Any, Any], float]:
        """Scores keyed by TransformerLens 4.3 ``tools.analysis`` ``(Node, Node)`` pairs, one per edge and
        position (TL scores each edge at each position; ``positions`` default: those of a per-position
        result, else position 0 holding the position sum).

        Raises:
            LNFreeError: TL's ``tools.analysis`` is not installed.
        """
        mean = self.mean().detach().double().cpu()
        out: dict[tuple[Any, Any], float] = {}
        if self.positions is None:
            for e, v in zip(self.edges, mean):
                out[edge_to_tl(e, 0 if positions is None else positions[0], self.n_layers)] = float(v)
            return out
        for e, row in zip(self.edges, mean):
            for p, v in zip(self.positions, row):
                if positions is None or p in positions:
                    out[edge_to_tl(e, p, self.n_layers)] = float(v)
        return out

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.values.shape)
        exact = f", exact into {'/'.join(self.exact_readers)}" if self.exact_readers else ""
        mean = "" if self.per_prompt else f", the mean over {self.n_prompts} prompt{'s' * (self.n_prompts != 1)}"
        return (f"EdgeResult({self.kind}, {len(self.edges)} edges, values {shape}{exact}{mean})\n"
                f"{self.top(10).to_string()}")

    # --- figures ----------------------------------------------------------------------------
    def plot(self, k: int = 50, title: str | None = None):
        """The top-``k`` edges as a layered graph (matplotlib figure): writers and readers by layer
        (layer 0 at the top), edge width by |score|, blue positive, red negative."""
        import matplotlib.pyplot as plt
        import networkx as nx

        edges = self.top_edges(k)
        score = dict(zip(self.edges, self._score().detach().double().cpu().tolist()))
        g = nx.DiGraph()
        for e in edges:
            g.add_edge(_node_key(e.writer), _node_key(e.reader), weight=score[e])
        pos = {n: _layout(n, self.n_layers, self.n_heads) for n in g.nodes}
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * self.n_heads + 4), max(6, 1.3 * self.n_layers + 3)))
        biggest = max((abs(v) for v in score.values()), default=1.0) or 1.0
        widths = [0.5 + 4 * abs(g.edges[e]["weight"]) / biggest for e in g.edges]
        colours = ["tab:blue" if g.edges[e]["weight"] >= 0 else "tab:red" for e in g.edges]
        nx.draw_networkx_edges(g, pos, ax=ax, width=widths, edge_color=colours, alpha=0.7, arrows=True,
                               arrowsize=8, connectionstyle="arc3,rad=0.08")
        readers_ = [n for n in g.nodes if not Node.parse(n).is_writer]
        writers_ = [n for n in g.nodes if Node.parse(n).is_writer]
        nx.draw_networkx_nodes(g, pos, nodelist=writers_, ax=ax, node_size=520, node_color="#e8e8e8",
                               edgecolors="#444444")
        nx.draw_networkx_nodes(g, pos, nodelist=readers_, ax=ax, node_size=160, node_color="#fff7d6",
                               edgecolors="#999999", node_shape="s")
        nx.draw_networkx_labels(g, pos, labels={n: n for n in writers_}, ax=ax, font_size=7)
        short = {n: n.split(".")[-1] if "." in n else ("in" if n.endswith("_mlp_in") else n) for n in readers_}
        nx.draw_networkx_labels(g, pos, labels=short, ax=ax, font_size=6)
        from matplotlib.lines import Line2D

        ax.legend(handles=[Line2D([], [], color="tab:blue", lw=2, label="positive score"),
                           Line2D([], [], color="tab:red", lw=2, label="negative score"),
                           Line2D([], [], marker="o", ls="", color="#e8e8e8", mec="#444444", label="writer"),
                           Line2D([], [], marker="s", ls="", color="#fff7d6", mec="#999999",
                                  label="reader: q / k / v just above their head; 'in': the MLP input; logits")],
                  loc="lower left", fontsize=7, frameon=False)
        ax.invert_yaxis()
        ax.set_ylabel("layer (0 at the top)")
        ax.set_title(title or f"Top {len(edges)} edges by |{self.kind} score| (batch mean, metric units; "
                     "blue +, red -)")
        ax.set_axis_off()
        fig.tight_layout()
        return fig

    def save(self, path: str | Path, k: int = 50, title: str | None = None) -> list[Path]:
        """Write ``{path}.png`` (graph), ``{path}.html`` (interactive, offline) and ``{path}.csv``."""
        import matplotlib.pyplot as plt
        import plotly.graph_objects as go

        base = Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        fig = self.plot(k, title)
        png = base.with_suffix(".png")
        fig.savefig(png, dpi=130)
        plt.close(fig)
        df = self.top(k)
        csv = base.with_suffix(".csv")
        self.to_dataframe().to_csv(csv, index=False)
        edges = [Edge.parse(label) for label in df["edge"]]  # the table's own order: labels match values
        xs, ys, text = [], [], []
        for e, v in zip(edges, df["mean"]):
            (x0, y0), (x1, y1) = (_layout(_node_key(n), self.n_layers, self.n_heads) for n in (e.writer, e.reader))
            xs += [x0, x1, None]
            ys += [y0, y1, None]
            text.append(f"{e.label}: {v:+.4g}")
        nodes = {_node_key(n) for e in edges for n in (e.writer, e.reader)}
        nx_, ny_ = zip(*(_layout(n, self.n_layers, self.n_heads) for n in nodes)) if nodes else ((), ())
        pfig = go.Figure([go.Scatter(x=xs, y=ys, mode="lines", line={"width": 1}, hoverinfo="skip"),
                          go.Scatter(x=nx_, y=ny_, mode="markers+text", text=list(nodes),
                              textposition="top center", hovertext=list(nodes))])
        pfig.update_layout(title=title or f"Top {len(edges)} edges ({self.kind})", showlegend=False,
                           yaxis={"autorange": "reversed", "title": "layer (0 at the top)"},
                           annotations=[{"text": "<br>".join(text[:40]), "xref": "paper", "yref": "paper", "x": 1.0,
                                         "y": 1.0, "showarrow": False, "align": "left", "font": {"size": 9}}])
        html = base.with_suffix(".html")
        pfig.write_html(html, include_plotlyjs=True, full_html=True)
        return [png, html, csv]


def _node_key(node: Node) -> str:
    """Display key: a reader of a head is shown at its head (``L3H2.k`` -> ``L3H2.k``), mlp_in at its MLP."""
    return node.label


def _layout(key: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    node = Node.parse(key)
    if node.kind == "embed":
        return (0.75 * n_heads, -1.0)
    if node.kind == "logits":
        return (0.75 * n_heads, 2.0 * n_layers)
    offset = {"q": -0.4, "k": 0.0, "v": 0.4}.get(node.kind, 0.0)
    if node.kind in ("head", "q", "k", "v"):
        y = 2.0 * node.layer + (0.0 if node.kind == "head" else -0.55)  # type: ignore[operator]
        return (1.5 * float(node.head) + offset, y)  # type: ignore[arg-type]
    y = 2.0 * node.layer + 1.0 + (0.0 if node.kind == "mlp" else -0.45)  # type: ignore[operator]
    return (1.5 * n_heads + 0.5, y)


_TL_KINDS = {"embed": "embed", "head": "attn_head_out", "mlp": "mlp_out", "q": "q_input", "k": "k_input",
             "v": "v_input", "mlp_in": "mlp_in", "logits": "logits"}


def _tl_node_class() -> Any:
    try:
        from transformer_lens.tools.analysis.attribution_patching import Node as TLNode
    except ImportError as err:
        raise LNFreeError("Converting to TransformerLens Nodes needs transformer-lens >= 4.3 "
                          "(transformer_lens.tools.analysis).") from err
    return TLNode


def edge_to_tl(edge: Edge, position: int, n_layers: int) -> tuple[Any, Any]:
    """One edge at one sequence position as a TransformerLens 4.3 ``tools.analysis`` ``(Node, Node)`` pair."""
    TLNode = _tl_node_class()

    def node(n: Node) -> Any:
        layer = n_layers - 1 if n.kind == "logits" else n.layer
        return TLNode(_TL_KINDS[n.kind], int(position), layer, n.head)

    return node(edge.writer), node(edge.reader)


def edge_from_tl(pair: tuple[Any, Any]) -> Edge:
    """A TransformerLens 4.3 ``(Node, Node)`` pair as an `Edge` (its position is dropped)."""
    back = {v: k for k, v in _TL_KINDS.items()}

    def node(n: Any) -> Node:
        kind = back.get(str(getattr(n, "kind", "")))
        if kind is None:
            raise LNFreeError(f"{n!r} is not a TransformerLens tools.analysis Node.")
        return Node(kind, None if kind in ("embed", "logits") else n.layer, n.head)  # type: ignore[arg-type]

    return Edge(node(pair[0]), node(pair[1]))
