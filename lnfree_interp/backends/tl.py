"""Backend for TransformerLens: ``HookedTransformer`` (TL 3.x) and ``TransformerBridge`` (TL 3.9+ / 4.x).

Both expose the same hook names; they differ in where the weights live (the bridge's are the HF modules
it wraps). Building either from the folded weights is `tl`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from importlib.metadata import version
from typing import Any

from torch import Tensor, nn

from ..errors import LNFreeError
from . import Backend, HookFn, Norms, NormSpec, Weights
from .hf import gpt2_norms, gpt2_weights, norm_spec


def tl_major() -> int:
    """Major version of the installed transformer-lens."""
    return int(version("transformer-lens").split(".")[0])


def has_hooked_transformer() -> bool:
    return tl_major() < 4


def detect(model: object) -> Backend | None:
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer

        if isinstance(model, HookedTransformer):
            return HookedBackend(model)
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, TransformerBridge):
        return BridgeBackend(model)
    return None


def _tl_norm_spec(module: nn.Module, where: str) -> NormSpec:
    """What a HookedTransformer normalisation module computes (read from the module, not ``cfg``)."""
    kind = type(module).__name__
    if kind == "LayerNormPre":
        return NormSpec("layernorm", float(module.eps))
    if kind != "LayerNorm" or not hasattr(module, "w"):  # identities (and anything unknown: refused there)
        return norm_spec(module, where)
    if bool((module.w == 1).all()) and bool((module.b == 0).all()):  # TL's LayerNorm with a folded affine map
        return NormSpec("layernorm", float(module.eps))
    raise LNFreeError(
        f"{where} is a TransformerLens {kind} with an unfolded affine map; attribution needs it folded "
        "(None for LN-free models, 'LNPre' for LN baselines). Load the model with lnfree_interp.load_hooked"
        + (" (or TL's from_pretrained with fold_ln=True)." if has_hooked_transformer() else "."))


class _TLBackend(Backend):
    def __init__(self, model: Any, wrapper: object = None, name: str | None = None):
        super().__init__(wrapper if wrapper is not None else model, model, name)
        self.tl = model
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_model = cfg.n_layers, cfg.n_heads, cfg.d_model
        self.d_head, self.d_mlp, self.d_vocab, self.n_ctx = cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx
        norms = self.norms()  # read from the modules; refuses unfolded LayerNorms
        kinds = {s.kind for s in (*norms.ln1, *norms.ln2, norms.ln_final)}
        declared = cfg.normalization_type
        if declared not in (None, "LNPre") or kinds != ({"identity"} if declared is None else {"layernorm"}):
            raise LNFreeError(
                f"This TransformerLens model has normalization_type={declared!r} but its normalisation modules "
                f"compute {' and '.join(sorted(kinds))}: the config and the modules disagree, so no attribution "
                "could be trusted. Attribution needs cfg and modules to agree: None with identity modules "
                "(LN-free), 'LNPre' with LayerNormPre (LN baselines). Load the model with lnfree_interp.load_hooked"
                + (" (or TL's from_pretrained with fold_ln=True)." if has_hooked_transformer() else "."))

    def forward(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.tl(tokens, attention_mask=attention_mask, return_type="logits")

    def unembed(self) -> nn.Module:
        return self.tl.unembed

    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, HookFn]) -> Iterator[None]:
        self.check_names(fns)
        # hook_mlp_in is a torch pre-hook on the MLP module: HookedTransformer only runs its own
        # hook_mlp_in with cfg.use_hook_mlp_in, which this library does not switch on the user's model
        mlp_in = {n: fn for n, fn in fns.items() if n.endswith(".hook_mlp_in")}
        fwd = [(name, lambda act, hook, fn=fn: fn(act)) for name, fn in fns.items() if name not in mlp_in]
        handles = []

        def pre(module: nn.Module, args: tuple, fn: HookFn) -> tuple | None:
            out = fn(args[0])
            return None if out is None else (out, *args[1:])  # pragma: no mutate (one positional arg)

        try:
            for name, fn in mlp_in.items():
                mlp = self.tl.blocks[int(name.split(".")[1])].mlp
                handles.append(mlp.register_forward_pre_hook(lambda m, a, fn=fn: pre(m, a, fn)))
            with self.tl.hooks(fwd_hooks=fwd):
                yield
        finally:
            for h in handles:
                h.remove()


class HookedBackend(_TLBackend):
    """TransformerLens ``HookedTransformer`` (TL 3.x): its own parameters in TL layout."""

    name = "hooked"

    def weights(self) -> Weights:
        m = self.tl
        a = [b.attn for b in m.blocks]
        f = [b.mlp for b in m.blocks]
        return Weights([x.W_Q for x in a], [x.W_K for x in a], [x.W_V for x in a], [x.b_Q for x in a],
                       [x.b_K for x in a], [x.b_V for x in a], [x.W_O for x in a], [x.b_O for x in a],
                       [x.W_in for x in f], [x.b_in for x in f], [x.W_out for x in f], [x.b_out for x in f],
                       m.W_U, m.b_U)

    def norms(self) -> Norms:
        b = self.tl.blocks
        return Norms([_tl_norm_spec(x.ln1, f"blocks.{i}.ln1") for i, x in enumerate(b)],
                     [_tl_norm_spec(x.ln2, f"blocks.{i}.ln2") for i, x in enumerate(b)],
                     _tl_norm_spec(getattr(self.tl, "ln_final", nn.Identity()), "ln_final"))  # absent: None


class BridgeBackend(_TLBackend):
    """TransformerLens ``TransformerBridge``: the HF modules it wraps hold the weights (the bridge's
    own ``b_U`` is a zero buffer in TL 4.x, while the folded ``lm_head`` has a bias)."""

    name = "bridge"

    def weights(self) -> Weights:
        b = self.tl.blocks
        return gpt2_weights([x.attn.qkv.original_component for x in b], [x.attn.o.original_component for x in b],
                            [x.mlp.__getattr__("in").original_component for x in b],
                            [x.mlp.out.original_component for x in b], self.tl.unembed.original_component,
                            self.n_heads)

    def norms(self) -> Norms:
        b = self.tl.blocks
        def hf(m: nn.Module) -> nn.Module:  # a module put in place of a bridge component is read (and refused) as is
            return getattr(m, "original_component", m)
        return gpt2_norms([hf(x.ln1) for x in b], [hf(x.ln2) for x in b], hf(self.tl.ln_final))
