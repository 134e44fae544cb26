"""The backends seam: one small interface between the attribution maths and each framework.

The attribution code (:mod:`lnfree_interp.dla`, :mod:`lnfree_interp.patching`) sees every model
through a :class:`Backend`: sizes, the weights in TransformerLens layout, a forward pass, and
*hooks by TransformerLens name* (``blocks.{l}.attn.hook_z`` as ``[batch, pos, head, d_head]``,
``blocks.{l}.hook_mlp_out``, ``hook_embed``...). Backends differ only in how activations are
captured. Frameworks are imported lazily: a backend is only looked at when its package is already
imported (the einops ``_backends`` pattern), so using nnsight never imports TransformerLens.

Backends (one module each):

* :mod:`.hf` - a folded ``transformers.GPT2LMHeadModel`` (from :func:`lnfree_interp.load_hf`) and
  nnsight models over one (``TransformersModel``);
* :mod:`.tl` - TransformerLens ``HookedTransformer`` (TL 3.x) and ``TransformerBridge`` (TL 3.9+ / 4.x),
  and nnsight over either (:func:`lnfree_interp.load_unified`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LNFreeError

#: A hook function: gets the activation in TransformerLens layout; returns a replacement, or ``None``
#: to leave it unchanged. (Return the activation itself to take gradients through it: a
#: TransformerBridge then uses the returned tensor downstream.)
HookFn = Callable[[Tensor], "Tensor | None"]


@dataclass(frozen=True)
class Weights:
    """The weights that write to the residual stream and the unembedding, TransformerLens layout.

    Per-layer lists of views of the model's parameters (never copies, never written to).
    """

    W_O: Sequence[Tensor]  #: per layer [n_heads, d_head, d_model]
    b_O: Sequence[Tensor]  #: per layer [d_model]
    W_out: Sequence[Tensor]  #: per layer [d_mlp, d_model]
    b_out: Sequence[Tensor]  #: per layer [d_model]
    W_U: Tensor  #: [d_model, d_vocab], final LN affine folded in
    b_U: Tensor  #: [d_vocab]


class Backend:
    """What the attribution code needs from a model. Subclasses implement the framework part."""

    #: short name shown in results ("hooked", "bridge", "hf", "nnsight", "unified")
    name: str = ""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module):
        self.model = model  #: the object the user passed
        self.module = module  #: the torch module that runs (mode switches and parameters)

    # --- sizes and kind ---------------------------------------------------------------------
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    #: final normalisation is the identity (LN-free, folded); else LNPre with ``eps``
    lnfree: bool
    eps: float
    tokenizer: object = None

    @property
    def dtype(self) -> torch.dtype:
        return self.weights().W_U.dtype

    @property
    def device(self) -> torch.device:
        return self.weights().W_U.device

    def weights(self) -> Weights:
        raise NotImplementedError

    def forward(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Logits ``[batch, pos, d_vocab]`` for token ids ``[batch, pos]`` (padding-aware)."""
        raise NotImplementedError

    def hook_names(self) -> list[str]:
        """TransformerLens names this backend can hook."""
        names = ["hook_embed", "hook_pos_embed"]
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.{n}" for n in (
                "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_z",
                "hook_attn_out", "hook_mlp_out", "mlp.hook_pre", "mlp.hook_post")]
        return names

    @contextlib.contextmanager
    def hooks(self, fns: dict[str, HookFn]) -> Iterator[None]:
        """Attach ``fns`` (TL name -> function) for the duration of the block; always removed."""
        raise NotImplementedError
        yield  # pragma: no cover

    def final_scale(self, resid: Tensor) -> Tensor:
        """The final LayerNorm's scale for residual vectors ``[..., d_model]`` (1 when LN-free).

        ``sqrt(mean((x - mean x)^2) + eps)`` as ``nn.LayerNorm`` and TransformerLens ``LNPre``
        compute it; returns ``[..., 1]``.
        """
        if self.lnfree:
            return torch.ones_like(resid[..., :1])
        centred = resid - resid.mean(dim=-1, keepdim=True)
        return (centred.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt()

    def check_names(self, names) -> None:
        known = set(self.hook_names())
        bad = [n for n in names if n not in known]
        if bad:
            raise LNFreeError(f"Unknown hook name(s) {bad} for this {self.name} model; valid names look "
                              f"like {self.hook_names()[:4]} ... (TransformerLens naming).")


def get_backend(model: object) -> Backend:
    """The backend for ``model``; detected lazily from the frameworks already imported.

    Raises:
        LNFreeError: the model is not one the library supports.
    """
    if isinstance(model, Backend):
        return model
    if "nnsight" in sys.modules:
        import nnsight

        if isinstance(model, nnsight.Envoy) and isinstance(getattr(model, "_module", None), torch.nn.Module):
            inner = model._module
            backend = get_backend(inner)
            backend.model = model
            backend.name = "nnsight" if backend.name == "hf" else "unified"
            return backend
    if "transformer_lens" in sys.modules:
        from . import tl

        backend = tl.detect(model)
        if backend is not None:
            return backend
    if "transformers" in sys.modules:
        from . import hf

        backend = hf.detect(model)
        if backend is not None:
            return backend
    raise LNFreeError(
        f"Unsupported model type {type(model).__name__}. Pass a model from load_hooked / load_hf / "
        "load_nnsight / load_unified (HookedTransformer, TransformerBridge, GPT2LMHeadModel, nnsight)."
        + (" For a torch.compile'd model pass the original, model._orig_mod (hooks need the uncompiled module)."
           if hasattr(model, "_orig_mod") else ""))


@contextlib.contextmanager
def eval_mode(backend: Backend) -> Iterator[None]:
    """Run in eval mode (no dropout) and restore each submodule's train flag afterwards."""
    modes = [(m, m.training) for m in backend.module.modules()]
    backend.module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
