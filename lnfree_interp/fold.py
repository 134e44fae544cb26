"""The fold: undo the LN-free hack and fold every LayerNorm into the weights that read from it.

A GPT-2 LayerNorm computes ``LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * w + b``. The LN-free
checkpoints (arXiv 2507.02559, and apollo-research/gpt2_noLN) disable normalisation with a hack:
``eps = 1e12`` and ``w = gamma * 1e6 / s``. Then ``sqrt(var + eps) ~= 1e6`` and the module computes
``(x - mean(x)) * g + b`` with the gain ``g = w / sqrt(eps) = gamma / s``: a centring and an affine
map, nothing else (exactly so in the reference, up to ``var/(2 eps) ~ 1e-9`` relative in the hacked
module itself).

Both steps are linear, so they fold into every matrix ``W`` (and bias ``c``) that reads the LN's
output:

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import LNFreeError

#: eps at or above this marks a LayerNorm whose normalisation was disabled by the hack.
HACK_MIN_EPS = 1e6
#: a hacked LN's weight was scaled by ~sqrt(eps); median|w|/sqrt(eps) below this means it was not.
HACK_MIN_GAIN = 1e-4
#: float64 elements folded per step (a block of whole columns), to bound the scratch memory and
#: keep it in cache (2**18 elements = 2 MiB).
_BLOCK = 1 << 18  # pragma: no mutate (the result does not depend on the block size; tested)
#: dtypes whose range is narrower than float32's for folded weights (overflow checked)
_NARROW = (torch.float16, torch.bfloat16)

ENCODINGS = ("schaeff", "apollo", "layernorm", "folded")


@dataclass(frozen=True)  # pragma: no mutate (frozen: a guard against edits, not maths)
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
    """``t`` in ``dtype``; checked for overflow when the cast narrows the range (float16, or from
    float64), where a finite input can become inf."""
    out = t.to(dtype)
    from_double = t.dtype == torch.float64 and dtype != t.dtype  # pragma: no mutate (`or` only checks more)
    narrows = out.is_floating_point() and (dtype in _NARROW or from_double)  # pragma: no mutate (True: cost only)
    if narrows and not bool(torch.isfinite(out).all()):
        raise LNFreeError(
            f"{name} overflows in {dtype} after folding (largest |value| {t.abs().max().item():.3g}). "
            "Load in float32 or bfloat16 instead."
        )
    return out


def _fold_reader(
    W: Tensor, c: Tensor | None, g: Tensor, b: Tensor, dtype: torch.dtype, name: str,
    col_scale: Tensor | None = None, chunk: int | None = None, in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fold a LN's centring + affine into a reader ``y = x @ W + c`` (``W``: [d_model, out]).

    Returns ``(C diag(g) W diag(s), (c + b @ W) * s)`` cast to ``dtype`` (``s = col_scale``, per output
    column, default 1), the weight with the same memory layout as ``W`` (so ``wte.T`` in gives a
    contiguous ``[d_vocab, d_model]`` back through ``.T``). Computed in float64, a block of output
    columns at a time (``chunk`` columns; default: ~``_BLOCK`` float64 elements, so the scratch
    stays small and in cache), written straight into the returned tensor. Per block:
    ``C diag(g) W = g * W - (g @ W) / d_model`` (the column means of ``diag(g) W``).
    ``in_place``: write into ``W`` itself (a tensor nobody else holds, of dtype ``dtype``): each block is
    read whole before it is written, and no second reader-sized tensor is allocated.
    """
    d_in, d_out = W.shape
    step = chunk or max(1, _BLOCK // max(d_in, 1))  # pragma: no mutate (the floors never bind for d_in >= 2)
    W_out = W.detach() if in_place and W.dtype == dtype else torch.empty_like(W, dtype=dtype)
    bias = torch.zeros(d_out, dtype=torch.float64, device=W.device) if c is None else c.detach().double().clone()
    gb = torch.stack([g / d_in, b])  # [2, d_model]: column means of diag(g) W, and b @ W
    g = g[:, None]
    # one float64 scratch block, reused (a fresh allocation per block costs page faults)
    scratch = torch.empty(d_in, min(step, d_out), dtype=torch.float64, device=W.device)
    sums = torch.empty(2, scratch.shape[1], dtype=torch.float64, device=W.device)  # pragma: no mutate (spare rows)
    for start in range(0, d_out, step):
        stop = min(start + step, d_out)
        cols, stats = scratch[:, : stop - start], sums[:, : stop - start]
        cols.copy_(W[:, start:stop].detach())
        torch.mm(gb, cols, out=stats)
        bias[start:stop] += stats[1]
        cols.mul_(g).sub_(stats[0])
        if col_scale is not None:
            cols.mul_(col_scale[start:stop])
        W_out[:, start:stop] = cols
    if dtype in _NARROW and not bool(torch.isfinite(W_out).all()):
        raise LNFreeError(f"{name} overflows in {dtype} after folding. Load in float32 or bfloat16 instead.")
    if col_scale is not None:
        bias *= col_scale
    return W_out, _cast(bias, dtype, name)


def _scale_reader(W: Tensor, c: Tensor, col_scale: Tensor, dtype: torch.dtype, name: str) -> tuple[Tensor, Tensor]:
    """``(W diag(s), c * s)`` in float64, cast to ``dtype`` (a reader without a LayerNorm to fold)."""
    return _cast(W.detach().double() * col_scale, dtype, name), _cast(c.detach().double() * col_scale, dtype, name)


def _q_scale(q: float, d_model: int, device: torch.device) -> Tensor | None:
    """Per-column factor of ``c_attn`` ([Q | K | V]): ``q`` on the query columns, 1 elsewhere."""
    if q == 1.0:
        return None
    s = torch.ones(3 * d_model, dtype=torch.float64, device=device)
    s[:d_model] = q
    return s


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
    q_scale: Sequence[float] | None = None,
    chunk: int | None = None,
) -> dict[str, Tensor]:
    """Fold all LayerNorms of a GPT-2 state dict into the weights that read from them.

    Args:
        state_dict: HF ``GPT2LMHeadModel`` state dict (``transformer.``-prefixed keys). Never
            written to.
        n_layers: number of blocks.
        lns: the classified LayerNorms (`classify_layernorms`), or ``None`` for a state dict
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
        q_scale: per layer, a factor folded into the query weights and bias (``W_Q``, ``b_Q``): GPT-2
            attention options that rescale the scores (``scale_attn_weights=False``,
            ``scale_attn_by_inverse_layer_idx``) become standard attention (``builders.hf.attention_q_scale``).
            Default: 1 everywhere.
        chunk: output columns folded per float64 block (default: ~2 MiB of float64 per block). The
            result does not depend on it.

    Streaming: tensors are read from ``state_dict`` one at a time, in order, as they are needed (a
    lazily-read checkpoint is never held whole), and each folded weight is written block by block
    into the tensor that becomes the model's parameter; the scratch is one source tensor plus one
    float64 block.

    Returns:
        A new state dict for a ``GPT2LMHeadModel`` with an untied ``lm_head`` that has a bias
        (``lm_head.weight`` [d_vocab, d_model], ``lm_head.bias`` [d_vocab]). When the LNs were real
        (LN baseline) it also holds ``ln_*.weight = 1`` and ``ln_*.bias = 0``; LN-free outputs have
        no LN keys (the LNs are identities).

    Raises:
        LNFreeError: a folded weight overflows ``dtype`` (e.g. float16).
    """
    out: dict[str, Tensor] = {}
    # a mapping that returns a fresh tensor on every access (safetensors read tensor by tensor, see
    # `checkpoints`) lets the readers be folded in place: no second reader-sized allocation, whose page
    # faults cost more than the fold's arithmetic (GPT-2 XL: 3.8 GB)
    in_place = not copy and bool(getattr(state_dict, "fresh_tensors", False))

    def take(t: Tensor, key: str) -> Tensor:
        cast = _cast(t.detach(), dtype, key)
        return cast.clone() if copy and cast.data_ptr() == t.data_ptr() else cast

    def writer(key: str, t: Tensor | None = None) -> None:
        t = state_dict[key] if t is None else t
        if center_writing_weights:
            t = t.detach().double()
            out[key] = _cast(t - t.mean(dim=-1, keepdim=True), dtype, key)
        else:
            out[key] = take(t, key)

    by_name = {ln.name: ln for ln in lns} if lns is not None else {}

    wte = state_dict["transformer.wte.weight"]  # read once: it is also the tied unembedding
    writer("transformer.wte.weight", wte)
    writer("transformer.wpe.weight")
    for layer in range(n_layers):
        p = f"transformer.h.{layer}"
        for ln_name, reader in ((f"{p}.ln_1", f"{p}.attn.c_attn"), (f"{p}.ln_2", f"{p}.mlp.c_fc")):
            W, c = state_dict[f"{reader}.weight"], state_dict[f"{reader}.bias"]
            scale = _q_scale(float(q_scale[layer]), W.shape[0], W.device) if (
                q_scale is not None and reader.endswith("c_attn")) else None
            if ln_name in by_name:
                ln = by_name[ln_name]
                g, b = _gain(state_dict, ln_name, ln.eps, ln.hacked)
                out[f"{reader}.weight"], out[f"{reader}.bias"] = _fold_reader(W, c, g, b, dtype, reader, scale, chunk,
                                                                              in_place)
            elif scale is not None:
                out[f"{reader}.weight"], out[f"{reader}.bias"] = _scale_reader(W, c, scale, dtype, reader)
            else:
                out[f"{reader}.weight"], out[f"{reader}.bias"] = take(W, reader), take(c, reader)
            del W, c
        for w in (f"{p}.attn.c_proj", f"{p}.mlp.c_proj"):
            writer(f"{w}.weight")
            writer(f"{w}.bias")

    untied = not tied_unembed and "lm_head.weight" in state_dict
    W_U = (state_dict["lm_head.weight"] if untied else wte).T
    del wte
    b_U = state_dict.get("lm_head.bias")
    if "transformer.ln_f" in by_name:
        ln = by_name["transformer.ln_f"]
        g, b = _gain(state_dict, "transformer.ln_f", ln.eps, ln.hacked)
        W_U, b_U = _fold_reader(W_U, b_U, g, b, dtype, "lm_head", None, chunk)
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
