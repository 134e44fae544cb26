"""The fold: undo the LN-free hack and fold every LayerNorm into the weights that read from it.

A GPT-2 LayerNorm computes ``LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * w + b``. The LN-free
checkpoints (arXiv 2507.02559, and apollo-research/gpt2_noLN) disable normalisation with a hack:
``eps = 1e12`` and ``w = gamma * 1e6 / s``. Then ``sqrt(var + eps) ~= 1e6`` and the module computes
``(x - mean(x)) * g + b`` with the gain ``g = w / sqrt(eps) = gamma / s``: a centring and an affine
map, nothing else (exactly so in the reference, up to ``var/(2 eps) ~ 1e-9`` relative in the hacked
module itself).

Both steps are linear, so they fold into every matrix ``W`` (and bias ``c``) that reads the LN's
output::

    LN(x) @ W + c = x @ (C diag(g) W) + (b @ W + c),      C = I - 11^T / d_model

that is ``W' = centre_rows(g[:, None] * W)`` and ``c' = c + b @ W``. After the fold the LN is the
identity *exactly*; replacing a hacked LN by the identity without folding drops ``C``, ``g`` and ``b``
and is wrong. For a real LayerNorm (the LN baselines) the same fold leaves ``(x - mean) / sigma``
behind: TransformerLens's ``LNPre``, and the HF ``LayerNorm`` with weight 1 and bias 0.

GPT-2 ties ``lm_head`` to ``wte``. ``ln_f`` is folded into a new, untied unembedding with a bias
(``W_U' = C diag(g) wte^T``, ``b_U = b @ wte^T``); ``wte`` itself is never changed (except when
``center_writing_weights`` is asked for).

Everything is computed in float64, whatever the target dtype, then cast once. The fold is a pure
function of its input: it never writes to the tensors it is given, and folding a folded state dict
returns it unchanged (so re-running a notebook cell cannot divide by 1e6 twice).

Mirrors TransformerLens's ``fold_layer_norm`` / ``center_writing_weights``
(``transformer_lens/weight_processing.py``), in float64 and extended to the LN-free encodings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import LNFreeError

#: eps at or above this marks a LayerNorm whose normalisation was disabled by the hack.
HACK_MIN_EPS = 1e6
#: a hacked LN's weight was scaled by ~sqrt(eps); median|w|/sqrt(eps) below this means it was not.
HACK_MIN_GAIN = 1e-4
#: columns folded per step, to bound the float64 scratch memory (the unembedding is the big one).
_CHUNK = 8192

ENCODINGS = ("schaeff", "apollo", "layernorm", "folded")


@dataclass(frozen=True)
class LNState:
    """One LayerNorm of a checkpoint as found on disk or in memory."""

    name: str  #: HF module name, e.g. ``transformer.h.0.ln_1``
    eps: float
    weight_scale: float  #: median |weight|
    hacked: bool  #: normalisation disabled by the eps/weight hack


def ln_names(n_layers: int) -> list[str]:
    """HF module names of all LayerNorms of a GPT-2 with ``n_layers`` blocks, in forward order."""
    names = []
    for layer in range(n_layers):
        names += [f"transformer.h.{layer}.ln_1", f"transformer.h.{layer}.ln_2"]
    return names + ["transformer.ln_f"]


def classify_layernorms(
    state_dict: Mapping[str, Tensor], n_layers: int, eps: Mapping[str, float]
) -> list[LNState]:
    """Classify every LayerNorm as hacked (LN-free) or real.

    Args:
        state_dict: HF GPT-2 state dict (``transformer.``-prefixed keys).
        n_layers: number of blocks.
        eps: the eps of each LN module, by HF module name.

    A LN is hacked when ``eps >= 1e6`` *and* its weight was scaled up to compensate
    (``median|w| / sqrt(eps) >= 1e-4``; the schaeff/apollo weights give 1e-3 to 10).
    """
    out = []
    for name in ln_names(n_layers):
        w = state_dict[f"{name}.weight"]
        scale = float(w.detach().abs().double().median())
        e = float(eps[name])
        hacked = e >= HACK_MIN_EPS and scale / math.sqrt(e) >= HACK_MIN_GAIN
        out.append(LNState(name, e, scale, hacked))
    return out


def detect_encoding(lns: list[LNState], state_dict: Mapping[str, Tensor]) -> str:
    """Name the checkpoint encoding: ``schaeff``, ``apollo`` or ``layernorm``.

    Raises:
        LNFreeError: for a half-hacked checkpoint (some LNs hacked, some not, or eps set without
            the weights scaled), naming the inconsistent LayerNorms.
    """
    hacked = [ln for ln in lns if ln.hacked]
    if not hacked:
        broken = [ln for ln in lns if ln.eps >= HACK_MIN_EPS]
        if broken:
            raise LNFreeError(
                "Half-hacked checkpoint: these LayerNorms have eps >= 1e6 but weights that were not "
                "scaled to compensate, so they output ~0: "
                + ", ".join(f"{ln.name} (eps={ln.eps:g}, median|w|={ln.weight_scale:.3g})" for ln in broken)
                + ". Re-export the model with weight = gamma * sqrt(eps) / s (lnfree_interp.save_lnfree)."
            )
        big = [ln for ln in lns if ln.weight_scale >= 1e3]
        if big:
            raise LNFreeError(
                "Half-hacked checkpoint: these LayerNorms have weights scaled by ~1e6 but an ordinary "
                "eps, so they blow activations up by ~1e6: "
                + ", ".join(f"{ln.name} (eps={ln.eps:g}, median|w|={ln.weight_scale:.3g})" for ln in big)
                + ". Set config.layer_norm_epsilon (and each LN module's eps) to 1e12."
            )
        return "layernorm"
    if len(hacked) != len(lns):
        real = [ln for ln in lns if not ln.hacked]
        raise LNFreeError(
            f"Half-hacked checkpoint: {len(hacked)} of {len(lns)} LayerNorms are disabled (eps >= 1e6 "
            "with weights scaled by sqrt(eps)), but these are not: "
            + ", ".join(f"{ln.name} (eps={ln.eps:g}, median|w|={ln.weight_scale:.3g})" for ln in real)
            + ". A model with some LayerNorms removed is neither LN-free nor a baseline; finish the "
            "removal (lnfree_interp.removal) or load the original checkpoint."
        )
    inner = [ln for ln in lns if not ln.name.endswith("ln_f")]
    apollo = all(
        bool((state_dict[f"{ln.name}.weight"] == math.sqrt(ln.eps)).all())
        and bool((state_dict[f"{ln.name}.bias"] == 0).all())
        for ln in inner
    )
    return "apollo" if apollo else "schaeff"


def _gain(state_dict: Mapping[str, Tensor], name: str, eps: float, hacked: bool) -> tuple[Tensor, Tensor]:
    """Float64 gain ``g`` and bias ``b`` of the affine map a LN applies after centring."""
    w = state_dict[f"{name}.weight"].detach().double()
    b = state_dict[f"{name}.bias"].detach().double()
    return (w / math.sqrt(eps) if hacked else w), b


def _cast(t: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    out = t.to(dtype)
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise LNFreeError(
            f"{name} overflows in {dtype} after folding (largest |value| {t.abs().max().item():.3g}). "
            "Load in float32 or bfloat16 instead."
        )
    return out


def _fold_reader(
    W: Tensor, c: Tensor | None, g: Tensor, b: Tensor, dtype: torch.dtype, name: str
) -> tuple[Tensor, Tensor]:
    """Fold a LN's centring + affine into a reader ``y = x @ W + c`` (``W``: [d_model, out]).

    Returns ``(C diag(g) W, c + b @ W)`` cast to ``dtype``, the weight with the same memory layout
    as ``W`` (so ``wte.T`` in gives a contiguous ``[d_vocab, d_model]`` back through ``.T``).
    Computed in float64, ``_CHUNK`` output columns at a time, so the scratch memory stays small for
    the unembedding.
    """
    d_out = W.shape[1]
    W_out = torch.empty_like(W, dtype=dtype)
    bias = torch.zeros(d_out, dtype=torch.float64, device=W.device) if c is None else c.detach().double()
    for start in range(0, d_out, _CHUNK):
        cols = W[:, start : start + _CHUNK].detach().double()
        bias[start : start + _CHUNK] += b @ cols
        cols = cols * g[:, None]
        cols -= cols.mean(dim=0, keepdim=True)
        W_out[:, start : start + _CHUNK] = _cast(cols, dtype, name)
    return W_out, _cast(bias, dtype, name)


def fold_state_dict(
    state_dict: Mapping[str, Tensor],
    n_layers: int,
    lns: list[LNState] | None,
    *,
    dtype: torch.dtype = torch.float32,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    tied_unembed: bool = True,
    copy: bool = True,
) -> dict[str, Tensor]:
    """Fold all LayerNorms of a GPT-2 state dict into the weights that read from them.

    Args:
        state_dict: HF ``GPT2LMHeadModel`` state dict (``transformer.``-prefixed keys). Never
            written to.
        n_layers: number of blocks.
        lns: the classified LayerNorms (:func:`classify_layernorms`), or ``None`` for a state dict
            that is already folded (identity LNs): then it is only cast, and centred if asked.
        dtype: dtype of the returned tensors. The arithmetic is float64 regardless.
        center_writing_weights: also subtract the mean over d_model from everything that writes to
            the residual stream (``wte``, ``wpe``, ``attn.c_proj``, ``mlp.c_proj``). An exact no-op on
            the logits, since the fold centres every reader; it changes ``W_E`` and the hooks'
            residual-stream values (their mean component).
        center_unembed: subtract the mean over the vocabulary from ``W_U`` and ``b_U`` (TL's
            ``center_unembed``): shifts each position's logits by a constant, so log-probs and
            logit differences are unchanged but raw logits are not.
        tied_unembed: the unembedding is ``wte`` (GPT-2's tied ``lm_head``); else ``lm_head.weight``.
        copy: copy tensors that would otherwise pass through shared (set when the input belongs to
            the user, so the returned model never aliases it).

    Returns:
        A new state dict for a ``GPT2LMHeadModel`` with an untied ``lm_head`` that has a bias
        (``lm_head.weight`` [d_vocab, d_model], ``lm_head.bias`` [d_vocab]). When the LNs were real
        (LN baseline) it also holds ``ln_*.weight = 1`` and ``ln_*.bias = 0``; LN-free outputs have
        no LN keys (the LNs are identities).

    Raises:
        LNFreeError: a folded weight overflows ``dtype`` (e.g. float16).
    """
    out: dict[str, Tensor] = {}

    def take(t: Tensor, key: str) -> Tensor:
        cast = _cast(t.detach(), dtype, key)
        return cast.clone() if copy and cast.data_ptr() == t.data_ptr() else cast

    def writer(key: str) -> None:
        t = state_dict[key]
        if center_writing_weights:
            t = t.detach().double()
            out[key] = _cast(t - t.mean(dim=-1, keepdim=True), dtype, key)
        else:
            out[key] = take(t, key)

    by_name = {ln.name: ln for ln in lns} if lns is not None else {}

    writer("transformer.wte.weight")
    writer("transformer.wpe.weight")
    for layer in range(n_layers):
        p = f"transformer.h.{layer}"
        for ln_name, reader in ((f"{p}.ln_1", f"{p}.attn.c_attn"), (f"{p}.ln_2", f"{p}.mlp.c_fc")):
            W, c = state_dict[f"{reader}.weight"], state_dict[f"{reader}.bias"]
            if ln_name in by_name:
                ln = by_name[ln_name]
                g, b = _gain(state_dict, ln_name, ln.eps, ln.hacked)
                out[f"{reader}.weight"], out[f"{reader}.bias"] = _fold_reader(W, c, g, b, dtype, reader)
            else:
                out[f"{reader}.weight"], out[f"{reader}.bias"] = take(W, reader), take(c, reader)
        for w in (f"{p}.attn.c_proj", f"{p}.mlp.c_proj"):
            writer(f"{w}.weight")
            writer(f"{w}.bias")

    untied = not tied_unembed and "lm_head.weight" in state_dict
    W_U = (state_dict["lm_head.weight"] if untied else state_dict["transformer.wte.weight"]).T
    b_U = state_dict.get("lm_head.bias")
    if "transformer.ln_f" in by_name:
        ln = by_name["transformer.ln_f"]
        g, b = _gain(state_dict, "transformer.ln_f", ln.eps, ln.hacked)
        W_U, b_U = _fold_reader(W_U, b_U, g, b, dtype, "lm_head")
    else:
        W_U = take(W_U, "lm_head.weight")
        b_U = torch.zeros(W_U.shape[1], dtype=dtype, device=W_U.device) if b_U is None else take(b_U, "lm_head.bias")
    if center_unembed:
        W_U = W_U.double()
        W_U, b_U = W_U - W_U.mean(dim=1, keepdim=True), b_U.double() - b_U.double().mean()
        W_U, b_U = _cast(W_U, dtype, "lm_head.weight"), _cast(b_U, dtype, "lm_head.bias")
    out["lm_head.weight"] = W_U.T.contiguous()  # no copy: W_U is laid out as wte
    out["lm_head.bias"] = b_U

    if lns is not None and not any(ln.hacked for ln in lns):  # LN baseline: keep (x - mean) / sigma
        ref = out["transformer.wte.weight"]
        for name in ln_names(n_layers):
            out[f"{name}.weight"] = torch.ones(ref.shape[1], dtype=dtype, device=ref.device)
            out[f"{name}.bias"] = torch.zeros(ref.shape[1], dtype=dtype, device=ref.device)
    return out
