"""The registry of known checkpoints: the LN-free GPT-2 family, their twins and baselines, and the embedded trio."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Where the embedded tiny-shakespeare models live.
EMBEDDED_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class KnownCheckpoint:
    """One checkpoint of the LN-free GPT-2 family, its twins and baselines.

    ``losses`` are mean cross-entropies in nats as reported on the model cards (schaeff cards,
    arXiv 2507.02559 Table 1): ``owt`` = OpenWebText validation (4.5M tokens), ``pile`` = The Pile,
    ``pile_filtered`` = The Pile filtered (10.2M tokens each). For the embedded models they are the
    held-out tiny-shakespeare loss measured by ``scripts/build_tiny_models.py``.
    """

    name: str  #: Hub id, or the embedded model's name
    aliases: tuple[str, ...]
    size: str  #: small / medium / large / xl / tiny
    kind: str  #: "lnfree", "vanilla" (fine-tuned with LN, the control) or "original"
    base_model: str | None
    ft_steps: int | None  #: fine-tuning iterations (0.5M tokens each for schaeff)
    losses: Mapping[str, float | None] = field(default_factory=dict)
    tokenizer_repo: str | None = None  #: where the tokenizer lives if not beside the weights
    embedded: bool = False

    @property
    def lnfree(self) -> bool:
        return self.kind == "lnfree"


def _card(owt: float | None, pile: float | None, pile_f: float | None) -> dict[str, float | None]:
    return {"owt": owt, "pile": pile, "pile_filtered": pile_f}


_GPT2 = {"small": "openai-community/gpt2", "medium": "openai-community/gpt2-medium",
         "large": "openai-community/gpt2-large", "xl": "openai-community/gpt2-xl"}
_STEPS = {"small": 300, "medium": 500, "large": 600, "xl": 800}
# Model-card table (schaeff/gpt2-*_LNFree*, *_vanilla*): (original, vanilla, LN-free) x (OWT, Pile, Pile-filtered).
_LOSSES = {
    "small": (_card(3.1006, 2.8450, 2.7899), _card(3.0126, 2.8511, 2.8112), _card(3.0797, 2.8852, 2.8757)),
    "medium": (_card(2.8145, 2.5163, 2.5390), _card(2.7390, 2.5752, 2.5724), _card(2.7642, 2.6579, 2.6352)),
    "large": (_card(2.6623, 2.5320, 2.4347), _card(2.6240, 2.6233, 2.5074), _card(2.6384, 2.7504, 2.5159)),
    # XL LN-free on The Pile: mean 130.2 from rare-token outliers (median 1.09, paper section 4).
    "xl": (_card(2.5567, 2.4436, 2.3739), _card(2.4799, 2.4673, 2.3821), _card(2.5052, 130.2197, None)),
}


def _build_registry() -> tuple[KnownCheckpoint, ...]:
    out = []
    for size, base in _GPT2.items():
        orig, van, free = _LOSSES[size]
        steps = _STEPS[size]
        short = base.split("/")[1]
        out.append(KnownCheckpoint(base, (short, f"gpt2-{size}") if size == "small" else (short,),
                                   size, "original", None, 0, orig))
        out.append(KnownCheckpoint(f"schaeff/gpt2-{size}_vanilla{steps}", (f"gpt2-{size}-vanilla",),
                                   size, "vanilla", base, steps, van, tokenizer_repo=base))
        out.append(KnownCheckpoint(f"schaeff/gpt2-{size}_LNFree{steps}", (f"gpt2-{size}-lnfree",),
                                   size, "lnfree", base, steps, free, tokenizer_repo=base))
    out.append(KnownCheckpoint("apollo-research/gpt2_noLN", ("gpt2-noln", "apollo-gpt2-noln"), "small",
                               "lnfree", "openai-community/gpt2", 1000, {}, tokenizer_repo="openai-community/gpt2"))
    out += _embedded_entries()
    return tuple(out)


def _embedded_entries() -> list[KnownCheckpoint]:
    """The tiny-shakespeare trio shipped in ``lnfree_interp/models`` (see their model cards)."""
    out = []
    for name, kind in (("tiny-shakespeare", "original"), ("tiny-shakespeare-vanilla", "vanilla"),
                       ("tiny-shakespeare-lnfree", "lnfree")):
        meta_file = EMBEDDED_DIR / name / "lnfree_meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        out.append(KnownCheckpoint(name, (), "tiny", kind, None if kind == "original" else "tiny-shakespeare",
                                   meta.get("ft_steps"), {"shakespeare_heldout": meta.get("heldout_loss")},
                                   embedded=True))
    return out


REGISTRY: tuple[KnownCheckpoint, ...] = _build_registry()


def lookup(name: str) -> KnownCheckpoint | None:
    """The registry entry for a Hub id or alias (case-insensitive), or ``None``."""
    key = name.strip().lower()
    for entry in REGISTRY:
        if key == entry.name.lower() or key in (a.lower() for a in entry.aliases):
            return entry
    return None


def list_checkpoints():
    """The registry as a ``pandas.DataFrame``: one row per known checkpoint.

    Columns: ``name`` (Hub id or embedded name), ``aliases``, ``size``, ``kind`` (lnfree / vanilla /
    original), ``base_model``, ``ft_steps``, and the losses reported on the model cards in nats
    (``loss_owt``, ``loss_pile``, ``loss_pile_filtered``; ``loss_shakespeare_heldout`` for the embedded
    models), ``embedded`` (ships with the package, works offline).
    """
    import pandas as pd

    rows = []
    for e in REGISTRY:
        row = {"name": e.name, "aliases": ", ".join(e.aliases), "size": e.size, "kind": e.kind,
               "base_model": e.base_model, "ft_steps": e.ft_steps, "embedded": e.embedded}
        row.update({f"loss_{k}": v for k, v in e.losses.items()})
        rows.append(row)
    return pd.DataFrame(rows)


