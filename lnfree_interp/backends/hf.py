"""Backend for a folded ``transformers.GPT2LMHeadModel`` (and nnsight's ``TransformersModel`` over one).

TransformerLens hook names map onto HF modules with plain torch hooks:

================================  ==========================================================
``hook_embed`` / ``hook_pos_embed``  output of ``transformer.wte`` / ``transformer.wpe``
``blocks.{l}.hook_resid_pre``     input of ``h[l].ln_1``  (``hook_resid_mid``: of ``ln_2``)
``blocks.{l}.hook_resid_post``    input of ``h[l+1].ln_1``; for the last block, of ``ln_f``
``blocks.{l}.attn.hook_z``        input of ``h[l].attn.c_proj``, viewed ``[b, p, head, d_head]``
``blocks.{l}.hook_attn_out``      output of ``h[l].attn.c_proj``
``blocks.{l}.mlp.hook_pre``       output of ``h[l].mlp.c_fc``  (``hook_post``: input of ``c_proj``)
``blocks.{l}.hook_mlp_out``       output of ``h[l].mlp``
================================  ==========================================================

(dropout sits between some of these in HF; the attribution code always runs in eval mode.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from ..checkpoints import FOLDED_MARKER
from ..errors import LNFreeError
from . import Backend, HookFn, Weights


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


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model: nn.Module, wrapper: object = None):
        super().__init__(wrapper if wrapper is not None else model, model)
        self.hf = model
        c = model.config
        self.n_layers, self.n_heads, self.d_model = c.n_layer, c.n_head, c.n_embd
        self.d_head = c.n_embd // c.n_head
        self.d_mlp = c.n_inner or 4 * c.n_embd
        self.d_vocab, self.n_ctx = c.vocab_size, c.n_positions
        self.lnfree = isinstance(model.transformer.ln_f, nn.Identity)
        self.eps = float(c.layer_norm_epsilon)
        self.tokenizer = getattr(wrapper, "tokenizer", None) or getattr(model, "tokenizer", None)

    def weights(self) -> Weights:
        h = self.hf.transformer.h
        H, dh, d = self.n_heads, self.d_head, self.d_model
        return Weights(
            W_O=[b.attn.c_proj.weight.view(H, dh, d) for b in h],  # Conv1D weight: [in, out]
            b_O=[b.attn.c_proj.bias for b in h],
            W_out=[b.mlp.c_proj.weight for b in h],
            b_out=[b.mlp.c_proj.bias for b in h],
            W_U=self.hf.lm_head.weight.T,
            b_U=self.hf.lm_head.bias,
        )

    def forward(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.hf(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits

    def _site(self, name: str) -> tuple[nn.Module, str, bool]:
        """(module, "in" | "out", reshape z) for a TL hook name."""
        t = self.hf.transformer
        if name == "hook_embed":
            return t.wte, "out", False
        if name == "hook_pos_embed":
            return t.wpe, "out", False
        parts = name.split(".")
        layer, rest = int(parts[1]), ".".join(parts[2:])
        block = t.h[layer]
        if rest == "hook_resid_post":
            return (t.h[layer + 1].ln_1 if layer + 1 < self.n_layers else t.ln_f), "in", False
        return {
            "hook_resid_pre": (block.ln_1, "in", False),
            "hook_resid_mid": (block.ln_2, "in", False),
            "attn.hook_z": (block.attn.c_proj, "in", True),
            "hook_attn_out": (block.attn.c_proj, "out", False),
            "mlp.hook_pre": (block.mlp.c_fc, "out", False),
            "mlp.hook_post": (block.mlp.c_proj, "in", False),
            "hook_mlp_out": (block.mlp, "out", False),
        }[rest]

    @contextlib.contextmanager
    def hooks(self, fns: dict[str, HookFn]) -> Iterator[None]:
        self.check_names(fns)
        handles = []
        H, dh = self.n_heads, self.d_head

        def wrap(fn: HookFn, z: bool):
            def call(x: Tensor) -> Tensor | None:
                if not z:
                    return fn(x)
                out = fn(x.view(*x.shape[:-1], H, dh))
                return None if out is None else out.reshape(x.shape)
            return call

        try:
            for name, fn in fns.items():
                module, where, z = self._site(name)
                call = wrap(fn, z)
                if where == "out":
                    handles.append(module.register_forward_hook(lambda m, a, out, call=call: call(out)))
                else:
                    def pre(m, args, call=call):
                        out = call(args[0])
                        return None if out is None else (out, *args[1:])
                    handles.append(module.register_forward_pre_hook(pre))
            yield
        finally:
            for h in handles:
                h.remove()
