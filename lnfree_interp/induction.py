"""Induction: does the model copy a repeated sequence, and which heads do it?

`induction_score` runs the standard test of Olsson et al. 2022 ("In-context learning and
induction heads", section on the repeated-random-tokens test; TransformerLens' ``induction_score``
tutorial in *Exploratory Analysis Demo*): sequences of distinct tokens in random order, each followed
by an exact copy. A model with induction predicts the copy far better than the first occurrence (the
repeat's NLL drops), through a **previous-token head** (each token attends to the one before it) whose
output the **induction head**'s keys read (K-composition), so that a token of the copy attends to the
token that followed its earlier occurrence.

Attention comes from the TransformerLens hook ``blocks.{l}.attn.hook_pattern`` (``[batch, head,
query_pos, key_pos]``) through [`get_backend`][lnfree_interp.backends.get_backend], so every backend works the
same way (HookedTransformer, TransformerBridge, ``load_hf``, ``load_nnsight``, ``load_unified``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .backends import Backend, eval_mode, get_backend
from .errors import LNFreeError
from .inputs import get_tokenizer

__all__ = ["InductionResult", "induction_score", "repeated_tokens"]


def _label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


@dataclass
class InductionResult:
    """What `induction_score` measured. NLLs in nats per token; scores are attention probabilities.

    Positions: ``b`` = 1 with a BOS, else 0; the first copy is at ``b .. b+seq_len-1``, the repeat at
    ``b+seq_len .. b+2*seq_len-1``.
    """

    first_nll: float  #: mean NLL of tokens 2..seq_len of the first copy (nats)
    repeat_nll: float  #: mean NLL of the same tokens in the repeat (nats)
    #: mean attention from a repeat token to the token after its first occurrence
    induction: Float[Tensor, "n_layers n_heads"]
    prev_token: Float[Tensor, "n_layers n_heads"]  #: mean attention to the previous position (BOS excluded as a key)
    n_seq: int
    seq_len: int
    seed: int
    source: str  #: "vocab" (uniform over the vocabulary) or "text"
    backend: str
    tokens: Int[Tensor, "n_seq pos"] = field(repr=False)  #: the input ids
    example_pattern: Float[Tensor, "n_layers n_heads pos pos"] = field(repr=False)  #: attention on tokens[0]
    prepend_bos: bool = True
    ablated: tuple[str, ...] = ()  #: heads zero-ablated while measuring

    @property
    def nll_drop(self) -> float:
        """``first_nll - repeat_nll`` (nats); large and positive means the model copies."""
        return self.first_nll - self.repeat_nll

    @property
    def n_layers(self) -> int:
        return int(self.induction.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.induction.shape[1])

    def _best(self, grid: Tensor) -> tuple[str, float]:
        idx = int(grid.flatten().argmax())
        return _label(idx // self.n_heads, idx % self.n_heads), float(grid.flatten()[idx])

    @property
    def best_induction(self) -> tuple[str, float]:
        """``("L{l}H{h}", score)`` of the head with the highest induction score."""
        return self._best(self.induction)

    @property
    def best_prev_token(self) -> tuple[str, float]:
        """``("L{l}H{h}", score)`` of the head with the highest previous-token score."""
        return self._best(self.prev_token)

    def to_dataframe(self):
        """One row per head: ``component`` (``L{l}H{h}``), ``layer``, ``head``, ``induction``, ``prev_token``."""
        import pandas as pd

        rows = [{"component": _label(l, h), "layer": l, "head": h, "induction": float(self.induction[l, h]),
                 "prev_token": float(self.prev_token[l, h])}
                for l in range(self.n_layers) for h in range(self.n_heads)]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        (ih, iv), (ph, pv) = self.best_induction, self.best_prev_token
        top = self.to_dataframe().sort_values("induction", ascending=False).head(5)
        ablated = f", ablated {', '.join(self.ablated)}" if self.ablated else ""
        return (f"InductionResult({self.n_seq} x {self.seq_len} {self.source} tokens repeated, seed {self.seed}, "
                f"{self.backend}{ablated})\n  NLL first copy {self.first_nll:.3f}, repeat {self.repeat_nll:.3f}, "
                f"drop {self.nll_drop:.3f} nats\n  best induction head {ih} ({iv:.3f}), best previous-token head "
                f"{ph} ({pv:.3f})\n" + top.to_string(index=False))

    def _task(self) -> str:
        return f"{self.n_seq} x {self.seq_len} random {self.source} tokens, repeated"

    def plot(self, title: str | None = None):
        """Matplotlib figure: induction and previous-token scores as layer x head heatmaps (layer 0 at the
        top), colour = mean attention probability in [0, 1]. Does not touch pyplot's state."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(7, 1.2 * self.n_heads + 4), max(3, 0.45 * self.n_layers + 1.8)), dpi=100)
        axes = fig.subplots(1, 2)
        for ax, grid, what in ((axes[0], self.induction, "induction score"),
                               (axes[1], self.prev_token, "previous-token score")):
            im = ax.imshow(grid.double().numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="upper")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(self.n_heads))
            ax.set_yticks(range(self.n_layers))
            ax.set_title(what)
            for l in range(self.n_layers):
                for h in range(self.n_heads):
                    v = float(grid[l, h])
                    ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 else "black")
            fig.colorbar(im, ax=ax, label="mean attention probability")
        fig.suptitle(title or f"Induction: {self._task()}; NLL drop {self.nll_drop:.2f} nats", fontsize=10)
        fig.tight_layout()
        return fig

    def plot_pattern(self, head: str | None = None, title: str | None = None):
        """Matplotlib figure: one head's attention pattern on the first repeated sequence (query position
        down, key position across); the induction stripe is the diagonal ``key = query - seq_len + 1``.
        ``head`` is ``"L{l}H{h}"`` (default: the best induction head).

        Raises:
            LNFreeError: ``head`` is not a valid label for this model.
        """
        from matplotlib.figure import Figure

        head = head or self.best_induction[0]
        layer, h = _parse_head(head, self.n_layers, self.n_heads)
        fig = Figure(figsize=(5.5, 4.6), dpi=100)
        ax = fig.subplots()
        im = ax.imshow(self.example_pattern[layer, h].double().numpy(), cmap="Blues", vmin=0, vmax=1)
        b = int(self.prepend_bos)
        ax.axhline(b + self.seq_len - 0.5, color="red", lw=0.6, ls="--")
        ax.axvline(b + self.seq_len - 0.5, color="red", lw=0.6, ls="--")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        fig.colorbar(im, ax=ax, label="attention probability")
        ax.set_title(title or f"{head} attention on {self.seq_len} random tokens, repeated\n(induction score "
                     f"{float(self.induction[layer, h]):.2f}; red: start of the repeat)", fontsize=9)
        fig.tight_layout()
        return fig

    def save(self, path: str | Path) -> list[Path]:
        """Write ``path.png`` (the score heatmaps) and ``path_pattern.png`` (best induction head); returns them."""
        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        out = [path.with_suffix(".png"), path.parent / f"{path.name}_pattern.png"]
        self.plot().savefig(out[0])
        self.plot_pattern().savefig(out[1])
        return out


def _parse_head(label: Any, n_layers: int, n_heads: int) -> tuple[int, int]:
    import re

    m = re.fullmatch(r"L(\d+)H(\d+)", str(label))
    if not m or int(m.group(1)) >= n_layers or int(m.group(2)) >= n_heads:
        raise LNFreeError(f"head={label!r}: expected a label 'L{{layer}}H{{head}}' with layer < {n_layers} and "
                          f"head < {n_heads}, e.g. 'L1H0'.")
    return int(m.group(1)), int(m.group(2))


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LNFreeError(f"{name} must be an int >= {low}, got {value!r}.")
    return value


def repeated_tokens(
    backend: Backend, *, n_seq: int, seq_len: int, seed: int, text: str | None = None, prepend_bos: bool = True,
) -> tuple[Int[Tensor, "n_seq pos"], str]:
    """``[n_seq, b + 2*seq_len]`` ids: ``seq_len`` distinct tokens in random order, then the same again.

    Tokens come uniformly from the vocabulary without special tokens, or, with ``text``, from the distinct
    tokens of ``text`` (tokenized without BOS). Returns ``(tokens, source)``.
    """
    tok = get_tokenizer(backend.model)
    special = set(getattr(tok, "all_special_ids", None) or []) if tok is not None else set()
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if prepend_bos and bos is None:
        raise LNFreeError("prepend_bos=True but the model has no tokenizer with a BOS token; pass "
                          "prepend_bos=False or load the model with its tokenizer.")
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise LNFreeError(f"text must be a non-empty string, got {type(text).__name__}.")
        if tok is None:
            raise LNFreeError("text= needs the model's tokenizer; this model has none attached.")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pool = torch.tensor(sorted(set(ids) - special), dtype=torch.long)
        source = "text"
    else:
        pool = torch.tensor([i for i in range(backend.d_vocab) if i not in special], dtype=torch.long)
        source = "vocab"
    if pool.numel() < seq_len:
        raise LNFreeError(f"seq_len={seq_len} needs that many distinct tokens; the {source} has only "
                          f"{pool.numel()}. Use a smaller seq_len or a longer text.")
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.stack([pool[torch.randperm(pool.numel(), generator=gen)[:seq_len]] for _ in range(n_seq)])
    rows = [seqs, seqs]
    if prepend_bos:
        rows.insert(0, torch.full((n_seq, 1), int(bos), dtype=torch.long))
    return torch.cat(rows, dim=1), source


def induction_score(
    model: Any,
    *,
    n_seq: int = 64,
    seq_len: int = 50,
    seed: int = 0,
    text: str | None = None,
    prepend_bos: bool = True,
    batch_size: int = 16,
    ablate: Sequence[str] = (),
) -> InductionResult:
    """Repeated-random-tokens test of induction: the repeat's NLL drop and per-head attention scores.

    Each input is ``[BOS] + s + s`` where ``s`` is ``seq_len`` distinct token ids in random order (drawn
    uniformly from the vocabulary without special tokens, or from the distinct tokens of ``text``).
    With ``b`` = 1 for the BOS (else 0), the copies start at ``b`` and ``b + seq_len``.

    * NLL (nats): mean next-token cross-entropy of tokens 2..``seq_len`` of the first copy, and of the
      same tokens in the repeat (the first token of each copy is unpredictable and left out).
    * Induction score of head ``L{l}H{h}``: mean over sequences and over every query ``q`` in the repeat
      of ``pattern[q, q - seq_len + 1]``, the attention to the token after the query token's first
      occurrence (as TransformerLens' tutorial diagonal ``offset = 1 - seq_len``, restricted to the repeat).
    * Previous-token score: mean of ``pattern[q, q - 1]`` over ``q = b+1 .. b+2*seq_len-1`` (BOS never a key).

    Source: Olsson et al. 2022, "In-context learning and induction heads"; TransformerLens
    *Exploratory Analysis Demo* (induction scores from ``blocks.{l}.attn.hook_pattern``).

    Args:
        model: any model from ``load_hooked`` / ``load_hf`` / ``load_nnsight`` / ``load_unified`` (LN
            baselines too). Not modified; run in eval mode (no dropout).
        n_seq: number of random sequences.
        seq_len: distinct tokens per copy; ``b + 2*seq_len`` must fit in the context (``n_ctx``).
        seed: seeds the token draw.
        text: draw tokens from this text's distinct tokens instead of the whole vocabulary.
        prepend_bos: start every sequence with the tokenizer's BOS (as the model was trained).
        batch_size: sequences per forward pass.
        ablate: heads ``"L{l}H{h}"`` to zero-ablate (their ``blocks.{l}.attn.hook_z`` set to 0) while
            measuring: ablating a previous-token head that an induction head composes with (through its
            keys) collapses that induction head's score.

    Returns:
        `InductionResult`: ``first_nll``, ``repeat_nll``, ``nll_drop`` (nats), ``induction`` and
        ``prev_token`` ``[n_layers, n_heads]``, ``best_induction`` / ``best_prev_token`` labels,
        ``to_dataframe()``, ``plot()``, ``plot_pattern()``.

    Raises:
        LNFreeError: unsupported model; ``n_seq``, ``seq_len``, ``seed``, ``batch_size`` not positive ints
            (``seq_len >= 2``); sequences longer than the context; too few distinct tokens; ``text`` not
            a string or no tokenizer; a backend without ``blocks.{l}.attn.hook_pattern``; a bad label in
            ``ablate``.
    """
    backend = get_backend(model)
    n_seq, seq_len, batch_size = _int("n_seq", n_seq, 1), _int("seq_len", seq_len, 2), _int("batch_size", batch_size, 1)
    seed = _int("seed", seed, 0)
    b = int(bool(prepend_bos))
    if b + 2 * seq_len > backend.n_ctx:
        raise LNFreeError(f"{'BOS + ' if b else ''}2 x seq_len = {b + 2 * seq_len} tokens exceed the model's context "
                          f"n_ctx = {backend.n_ctx}; use seq_len <= {(backend.n_ctx - b) // 2}.")
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(backend.n_layers)]
    if names[0] not in backend.hook_names():
        raise LNFreeError(f"This {backend.name} backend has no blocks.{{l}}.attn.hook_pattern hook, which "
                          "induction_score reads; update lnfree_interp.")
    if isinstance(ablate, str):
        ablate = [ablate]
    knocked: dict[int, list[int]] = {}
    for label in ablate:
        layer, head = _parse_head(label, backend.n_layers, backend.n_heads)
        knocked.setdefault(layer, []).append(head)

    def zero(heads: list[int]):
        def fn(z: Tensor) -> Tensor:
            z = z.clone()
            z[:, :, heads] = 0
            return z
        return fn

    tokens, source = repeated_tokens(backend, n_seq=n_seq, seq_len=seq_len, seed=seed, text=text,
                                     prepend_bos=prepend_bos)
    P = tokens.shape[1]
    q_rep = torch.arange(b + seq_len, b + 2 * seq_len)
    q_prev = torch.arange(b + 1, P)
    L, H = backend.n_layers, backend.n_heads
    ind_sum = torch.zeros(L, H, dtype=torch.float64)
    prev_sum = torch.zeros(L, H, dtype=torch.float64)
    nll_first = nll_rep = 0.0
    example = None
    with torch.no_grad(), eval_mode(backend):
        for start in range(0, n_seq, batch_size):
            batch = tokens[start : start + batch_size].to(backend.device)
            pats: dict[int, Tensor] = {}

            def keep(layer: int):
                def fn(pattern: Tensor) -> None:
                    pats[layer] = pattern.detach().to("cpu", torch.float64)
                return fn

            zeroed = {f"blocks.{l}.attn.hook_z": zero(h) for l, h in knocked.items()}
            with backend.hooks({n: keep(l) for l, n in enumerate(names)}), backend.hooks(zeroed):
                logits = backend.forward(batch, None)
            if len(pats) != L or any(tuple(p.shape) != (batch.shape[0], H, P, P) for p in pats.values()):
                raise LNFreeError(f"The {backend.name} backend returned attention patterns of shapes "
                                  f"{[tuple(p.shape) for p in pats.values()]}, expected [batch, {H}, {P}, {P}]; "
                                  "please report this.")
            logp = logits.detach().to("cpu", torch.float64).log_softmax(-1)
            nll = -logp[:, :-1].gather(-1, batch.cpu()[:, 1:, None])[..., 0]  # nll[:, p-1] is token p's
            nll_first += float(nll[:, b : b + seq_len - 1].sum())
            nll_rep += float(nll[:, b + seq_len : b + 2 * seq_len - 1].sum())
            pattern = torch.stack([pats[l] for l in range(L)], dim=1)  # [batch, layer, head, q, k]
            ind_sum += pattern[..., q_rep, q_rep - seq_len + 1].sum(dim=(0, -1))
            prev_sum += pattern[..., q_prev, q_prev - 1].sum(dim=(0, -1))
            if example is None:
                example = pattern[0].float()
    n_pred = n_seq * (seq_len - 1)
    return InductionResult(
        first_nll=nll_first / n_pred, repeat_nll=nll_rep / n_pred,
        induction=ind_sum / (n_seq * seq_len), prev_token=prev_sum / (n_seq * q_prev.numel()),
        n_seq=n_seq, seq_len=seq_len, seed=seed, source=source, backend=backend.name, tokens=tokens,
        example_pattern=example, prepend_bos=bool(prepend_bos), ablated=tuple(str(a) for a in ablate))

