"""[`verify`][lnfree_interp.verify]: a loaded model against an independent float64 reference of its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .builders.hf import reference_model
from .checkpoints import SourceLike, analyse_source, resolve
from .loaders import recorded_source

#: pass thresholds of `verify`: max |logit error| / max |logit| by dtype. float64 and float32: the
#: fold is exact to a few units of rounding; bfloat16 and float16: two units of the dtype's own rounding
#: (2 x 2**-7, 2 x 2**-10 relative; measured 7.9e-3 and 9.7e-4 on the embedded and random models), so
#: those dtypes pass when the fold adds nothing beyond the dtype's rounding, which is not exactness.
VERIFY_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 * 2.0**-7,
                    torch.float16: 2 * 2.0**-10}


@dataclass(frozen=True)
class Verification:
    """Result of [`verify`][lnfree_interp.verify]. Errors are in logits; ``tolerance`` and ``relative_error`` are
    relative to the largest |reference logit|."""

    backend: str
    dtype: torch.dtype
    max_abs_error: float  #: max |logits - reference logits| (logits)
    max_abs_logit: float  #: max |reference logits| (logits)
    tolerance: float  #: relative tolerance for ``dtype`` (`VERIFY_TOLERANCE`)
    #: bfloat16 only: max |error| of the *unfolded* checkpoint itself computed in bfloat16 (logits), the
    #: floor set by the dtype; ``None`` otherwise (float16 cannot run the hack: its 1e6 weights overflow)
    dtype_floor_error: float | None = None
    lnfree: bool = True  #: the reference has hacked LayerNorms written out (False: an LN baseline)

    @property
    def relative_error(self) -> float:
        """``max_abs_error / max_abs_logit``: the number compared with ``tolerance``."""
        return self.max_abs_error / max(self.max_abs_logit, 1e-30)

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance

    def __str__(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        verdict = "ok" if self.passed else "FAILED"
        line = (f"{self.backend:8s} {name:9s} relative error {self.relative_error:.2e} "
                f"{'<=' if self.passed else '>'} tolerance {self.tolerance:.1e} {verdict}  "
                f"(max|err| {self.max_abs_error:.3e} logits, max|logit| {self.max_abs_logit:.3g})")
        if self.dtype in (torch.bfloat16, torch.float16):
            floor = ("" if self.dtype_floor_error is None else
                     f"; the unfolded checkpoint in {name}: max|err| {self.dtype_floor_error:.3g} logits")
            line += f"  [{name} rounding, not exact{floor}; use float32/float64 for attribution]"
        return line


def verify(model: Any, src: SourceLike | None = None, *, tokens: Any = None, seed: int = 0) -> Verification:
    """Measure a loaded model against the exact reference of its checkpoint.

    The reference is the *unfolded* checkpoint run by HF ``GPT2LMHeadModel`` in float64 with every
    hacked LayerNorm replaced by a hand-written ``(x - mean(x)) * w / sqrt(eps) + b`` (real LNs
    kept), sharing no code with the fold.

    Args:
        model: anything the loaders return.
        src: the checkpoint it came from; default: the one recorded by the loader. An in-memory
            source is read as it is now (edit it after loading and the comparison fails); once it
            has been garbage-collected, the directory or Hub id it was loaded from
            (``config._name_or_path``) is read instead, if its weights are the ones that were folded.
        tokens: token ids ``[batch, pos]``; default: 2 x min(n_ctx, 32) random ids (``seed``).

    Returns:
        `Verification`: the relative error (max |logit error| / max |logit|) and whether it is
        within the dtype's relative tolerance (`VERIFY_TOLERANCE`: float64 1e-12, float32 1e-5,
        bfloat16 2 x 2**-7, float16 2 x 2**-10; the last two are the dtypes' own rounding, not exactness).

    Raises:
        LNFreeError: no ``src`` given and none recorded; the recorded source is an in-memory model
            that was garbage-collected and cannot be re-read from where it was loaded (its
            ``config._name_or_path``) with the same weights: then pass ``src=``.
    """
    from .backends import eval_mode, get_backend
    from .inputs import prepare

    backend = get_backend(model)
    if src is None:
        src = recorded_source(backend.module)
    source = resolve(src)
    try:
        _, lns = analyse_source(source)
        reference = reference_model(source, lns)
    finally:
        source.close()
    if tokens is None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, backend.d_vocab, (2, min(backend.n_ctx, 32)), generator=gen)
    tokens, mask = prepare(backend, tokens)
    with torch.no_grad(), eval_mode(backend):
        got = backend.forward(tokens, mask).double().cpu()
    with torch.no_grad():
        ref = reference(tokens.cpu()).logits
        floor = None
        if backend.dtype == torch.bfloat16:
            floor = float((reference.to(torch.bfloat16)(tokens.cpu()).logits.double() - ref).abs().max())
    err = float((got - ref).abs().max())
    dtype = backend.dtype
    return Verification(backend.name, dtype, err, float(ref.abs().max()), VERIFY_TOLERANCE[dtype], floor,
                        lnfree=lns is None or any(ln.hacked for ln in lns))
