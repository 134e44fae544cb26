"""Backend for a folded ``transformers.GPT2LMHeadModel`` (and nnsight's ``TransformersModel`` over one).

TransformerLens hook names map onto HF modules with plain torch hooks:

=====================================  ==========================================================
``hook_embed`` / ``hook_pos_embed``    output of ``transformer.wte`` / ``transformer.wpe``
``blocks.{l}.hook_resid_pre``          input of ``h[l].ln_1``  (``hook_resid_mid``: of ``ln_2``); a replacement is
                                       written into that tensor, which is also the block's skip connection
``blocks.{l}.hook_resid_post``         input of ``h[l+1].ln_1``; for the last block, of ``ln_f``
``blocks.{l}.attn.hook_q/k/v``         thirds of the output of ``h[l].attn.c_attn``, ``[b, p, head, d_head]``
``blocks.{l}.attn.hook_pattern``       attention weights ``[b, head, q, k]`` (read-only; eager attention)
``blocks.{l}.attn.hook_z``             input of ``h[l].attn.c_proj``, viewed ``[b, p, head, d_head]``
``blocks.{l}.hook_attn_out``           output of ``h[l].attn.c_proj``
``blocks.{l}.hook_mlp_in``             input of ``h[l].mlp`` (the output of ``ln_2``)
``blocks.{l}.mlp.hook_pre``            output of ``h[l].mlp.c_fc``  (``hook_post``: input of ``c_proj``)
``blocks.{l}.hook_mlp_out``            output of ``h[l].mlp``
=====================================  ==========================================================

(dropout sits between some of these in HF; the attribution code always runs in eval mode.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoints import FOLDED_MARKER
from ..errors import LNFreeError
from . import Backend, HookFn, Norms, NormSpec, Weights


def detect(model: object) -> Backend | None:
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT2LMHeadModel):
        return None
    if getattr(model.config, FOLDED_MARKER, None) is None:
        raise LNFreeError(
            "This GPT2LMHeadModel was not loaded through lnfree_interp, so its LayerNorms are not "
            "folded. Use model = lnfree_interp.load_hf(model) (add expect_lnfree=False for a model "
            "with LayerNorm).")
    return HFBackend(model)


def norm_spec(module: nn.Module, where: str) -> NormSpec:
    """What a GPT-2 LayerNorm site computes, read from the module itself.

    Raises:
        LNFreeError: a LayerNorm whose affine map is not folded (weight 1, bias 0), or any other module
            (an unknown module may compute anything, so it is never taken for an identity).
    """
    # a subclass with a forward of its own computes something else: only torch's and the loaders' forwards are read
    if isinstance(module, (nn.LayerNorm, nn.Identity)) and \
            not type(module).forward.__module__.startswith(("torch.nn.", "lnfree_interp.")):
        raise LNFreeError(f"{where} is a {type(module).__name__} with its own forward, not a folded LayerNorm or an "
                          "identity, so what it computes is unknown; pass a model from the lnfree_interp loaders.")
    if isinstance(module, nn.LayerNorm):
        w, b = module.weight, module.bias
        if (w is not None and not bool((w == 1).all())) or (b is not None and not bool((b == 0).all())):
            raise LNFreeError(f"{where} is a LayerNorm with an unfolded affine map; load the model through "
                              "lnfree_interp (load_hf / load_hooked ... with expect_lnfree=False).")
        return NormSpec("layernorm", float(module.eps))
    if isinstance(module, nn.Identity):  # the loaders' IdentityLayerNorm among them
        return NormSpec("identity")
    raise LNFreeError(f"{where} is a {type(module).__name__}, not a folded LayerNorm or an identity, so what it "
                      "computes is unknown; pass a model from the lnfree_interp loaders.")


def hf_norms(hf: Any) -> Norms:
    t = hf.transformer
    return gpt2_norms([b.ln_1 for b in t.h], [b.ln_2 for b in t.h], t.ln_f)


def gpt2_norms(ln1: list[nn.Module], ln2: list[nn.Module], ln_f: nn.Module) -> Norms:
    """`Norms` from the HF LayerNorm-site modules (``ln_1``, ``ln_2`` per layer, ``ln_f``)."""
    return Norms([norm_spec(m, f"h[{i}].ln_1") for i, m in enumerate(ln1)],
                 [norm_spec(m, f"h[{i}].ln_2") for i, m in enumerate(ln2)], norm_spec(ln_f, "ln_f"))


def hf_weights(hf: Any) -> Weights:
    """TransformerLens-layout views of a folded ``GPT2LMHeadModel``."""
    h = hf.transformer.h
    return gpt2_weights([b.attn.c_attn for b in h], [b.attn.c_proj for b in h], [b.mlp.c_fc for b in h],
                        [b.mlp.c_proj for b in h], hf.lm_head, hf.config.n_head)


def gpt2_weights(c_attn: list[nn.Module], c_proj: list[nn.Module], c_fc: list[nn.Module],
                 mlp_proj: list[nn.Module], lm_head: nn.Module, n_heads: int) -> Weights:
    """`Weights` as views of HF GPT-2 modules (``Conv1D`` weights are ``[in, out]``)."""
    d = lm_head.weight.shape[1]  # [d_vocab, d_model]
    H, dh = n_heads, d // n_heads

    def qkv(m: nn.Module, i: int) -> tuple[Tensor, Tensor]:
        return (m.weight[:, i * d:(i + 1) * d].view(d, H, dh).permute(1, 0, 2),
                m.bias[i * d:(i + 1) * d].view(H, dh))

    q, k, v = ([qkv(m, i) for m in c_attn] for i in range(3))
    if lm_head.bias is None:
        raise LNFreeError("This GPT2LMHeadModel has no lm_head bias: it was not folded by lnfree_interp.")
    return Weights(
        W_Q=[x[0] for x in q], W_K=[x[0] for x in k], W_V=[x[0] for x in v],
        b_Q=[x[1] for x in q], b_K=[x[1] for x in k], b_V=[x[1] for x in v],
        W_O=[m.weight.view(H, dh, d) for m in c_proj], b_O=[m.bias for m in c_proj],
        W_in=[m.weight for m in c_fc], b_in=[m.bias for m in c_fc],
        W_out=[m.weight for m in mlp_proj], b_out=[m.bias for m in mlp_proj],
        W_U=lm_head.weight.T, b_U=lm_head.bias,
    )


def _chain(first: HookFn, second: HookFn) -> HookFn:
    """Two hooks on one site (e.g. ``hook_resid_post`` of layer l and ``hook_resid_pre`` of l + 1)."""
    def fn(x: Tensor) -> Tensor | None:
        out = first(x)
        x = x if out is None else out
        out2 = second(x)
        return x if out2 is None else out2
    return fn


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model: nn.Module, wrapper: object = None, name: str | None = None):
        super().__init__(wrapper if wrapper is not None else model, model, name)
        self.hf = model
        c = model.config
        self.n_layers, self.n_heads, self.d_model = c.n_layer, c.n_head, c.n_embd
        self.d_head = c.n_embd // c.n_head
        self.d_mlp = c.n_inner or 4 * c.n_embd
        self.d_vocab, self.n_ctx = c.vocab_size, c.n_positions

    def weights(self) -> Weights:
        return hf_weights(self.hf)

    def norms(self) -> Norms:
        return hf_norms(self.hf)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return self.hf(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits  # pragma: no mutate (a cache changes memory, not logits)

    def unembed(self) -> nn.Module:
        return self.hf.lm_head

    def _site(self, name: str) -> tuple[nn.Module, str, str]:
        """(module, "in" | "out", view) for a TL hook name; view is "", "resid", "z", "q", "k", "v" or "pattern"."""
        t = self.hf.transformer
        if name == "hook_embed":
            return t.wte, "out", ""
        if name == "hook_pos_embed":
            return t.wpe, "out", ""
        parts = name.split(".")
        layer, rest = int(parts[1]), ".".join(parts[2:])
        block = t.h[layer]
        if rest == "hook_resid_post":
            return (t.h[layer + 1].ln_1 if layer + 1 < self.n_layers else t.ln_f), "in", "resid"
        return {
            "hook_resid_pre": (block.ln_1, "in", "resid"),
            "hook_resid_mid": (block.ln_2, "in", "resid"),
            "attn.hook_q": (block.attn.c_attn, "out", "q"),
            "attn.hook_k": (block.attn.c_attn, "out", "k"),
            "attn.hook_v": (block.attn.c_attn, "out", "v"),
            "attn.hook_pattern": (block.attn, "out", "pattern"),
            "attn.hook_z": (block.attn.c_proj, "in", "z"),
            "hook_attn_out": (block.attn.c_proj, "out", ""),
            "hook_mlp_in": (block.mlp, "in", ""),
            "mlp.hook_pre": (block.mlp.c_fc, "out", ""),
            "mlp.hook_post": (block.mlp.c_proj, "in", ""),
            "hook_mlp_out": (block.mlp, "out", ""),
        }[rest]

    def _call(self, fns: dict[str, HookFn], x: Any) -> Any:
        """Apply the hooks of one site to its value ``x`` (a tensor, or attention's output tuple)."""
        H, dh, d = self.n_heads, self.d_head, self.d_model
        if "pattern" in fns:
            if not isinstance(x, tuple) or len(x) < 2 or x[1] is None:  # pragma: no cover (eager); pragma: no mutate
                raise LNFreeError("No attention weights from this HF attention implementation.")
            out = fns["pattern"](x[1])
            if out is not None and out is not x[1]:
                raise LNFreeError("blocks.{l}.attn.hook_pattern is read-only on a transformers / nnsight model "
                                  "(HF computes the output from its own weights); patch hook_q / hook_k / hook_z, "
                                  "or use load_hooked for a TransformerLens model.")
            return None
        if "resid" in fns:
            # the LayerNorm's input is also the block's skip connection: a replacement must reach both,
            # so it is written into the residual-stream tensor itself
            out = fns["resid"](x)
            if out is not None and out is not x:
                x.copy_(out)
            return None
        if "" in fns:
            return fns[""](x)
        if "z" in fns:
            out = fns["z"](x.view(*x.shape[:-1], H, dh))
            return None if out is None else out.reshape(x.shape)
        parts = list(x.split(d, dim=-1))  # q, k, v: [b, p, d] each; only they are left
        for i, key in enumerate("qkv"):
            if key in fns:
                view = parts[i].view(*parts[i].shape[:-1], H, dh)
                out = fns[key](view)  # the returned tensor (or the view) must be the one used downstream
                parts[i] = (view if out is None else out).reshape(parts[i].shape)
        return torch.cat(parts, dim=-1)

    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, HookFn]) -> Iterator[None]:
        self.check_names(fns)
        sites: dict[tuple[int, str], tuple[nn.Module, str, dict[str, HookFn]]] = {}
        for name, fn in fns.items():
            module, where, view = self._site(name)
            site_fns = sites.setdefault((id(module), where), (module, where, {}))[2]
            site_fns[view] = _chain(site_fns[view], fn) if view in site_fns else fn
        handles = []
        config = self.hf.config
        attn_impl = getattr(config, "_attn_implementation", None)
        try:
            if any("pattern" in s[2] for s in sites.values()) and attn_impl != "eager":
                config._attn_implementation = "eager"  # sdpa returns no weights; restored below
            for module, where, site_fns in sites.values():
                if where == "out":
                    handles.append(module.register_forward_hook(
                        lambda m, a, out, f=site_fns: self._call(f, out)))
                else:
                    def pre(m, args, f=site_fns):
                        out = self._call(f, args[0])
                        return None if out is None else (out, *args[1:])  # pragma: no mutate (one positional arg)
                    handles.append(module.register_forward_pre_hook(pre))
            yield
        finally:
            for h in handles:
                h.remove()
            if getattr(config, "_attn_implementation", None) != attn_impl:
                config._attn_implementation = attn_impl
