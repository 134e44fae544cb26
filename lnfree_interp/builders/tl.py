"""Building TransformerLens models from the folded weights: ``HookedTransformer`` (TL 3.x) and ``TransformerBridge``.

* ``HookedTransformer``: a config written from the GPT-2 config (never ``from_pretrained("gpt2")``,
  which fetches the Hub config and overwrites eps), parameters created empty, then our folded
  weights assigned without a copy. TL's own ``process_weights_`` is never run: it works in
  float32 and would cut float64 exactness.
* ``TransformerBridge``: ``build_bridge_from_module`` around the folded HF model (offline, shares its
  storage), with ``cfg.normalization_type`` set before the blocks copy the config; identity
  LayerNorms compute ``hook_normalized(x / hook_scale(1))`` so LN hook edits take effect.

The analysis adapter for both is `tl`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import einops
from torch import Tensor, nn

from ..backends.tl import has_hooked_transformer
from ..errors import LNFreeError


def tl_state_dict(sd: dict[str, Tensor], n_layers: int, n_heads: int) -> dict[str, Tensor]:
    """HF GPT-2 (folded) state dict -> HookedTransformer state dict, as views (no copies).

    Mirrors ``transformer_lens.pretrained.weight_conversions.gpt2.convert_gpt2_weights`` for a model
    whose LayerNorms are gone (that function reads ``ln_*.weight`` and cannot).
    """
    out = {"embed.W_E": sd["transformer.wte.weight"], "pos_embed.W_pos": sd["transformer.wpe.weight"],
           "unembed.W_U": sd["lm_head.weight"].T, "unembed.b_U": sd["lm_head.bias"]}
    for layer in range(n_layers):
        p, q = f"transformer.h.{layer}", f"blocks.{layer}"
        d_model = sd[f"{p}.attn.c_attn.weight"].shape[0]
        for name, W in zip("QKV", sd[f"{p}.attn.c_attn.weight"].split(d_model, dim=1)):
            out[f"{q}.attn.W_{name}"] = einops.rearrange(W, "m (i h) -> i m h", i=n_heads)
        for name, b in zip("QKV", sd[f"{p}.attn.c_attn.bias"].view(3, n_heads, -1)):
            out[f"{q}.attn.b_{name}"] = b
        out[f"{q}.attn.W_O"] = einops.rearrange(sd[f"{p}.attn.c_proj.weight"], "(i h) m -> i h m", i=n_heads)
        out[f"{q}.attn.b_O"] = sd[f"{p}.attn.c_proj.bias"]
        out[f"{q}.mlp.W_in"] = sd[f"{p}.mlp.c_fc.weight"]
        out[f"{q}.mlp.b_in"] = sd[f"{p}.mlp.c_fc.bias"]
        out[f"{q}.mlp.W_out"] = sd[f"{p}.mlp.c_proj.weight"]
        out[f"{q}.mlp.b_out"] = sd[f"{p}.mlp.c_proj.bias"]
    return out


@contextlib.contextmanager
def tl_ready_tokenizer(tokenizer: Any) -> Iterator[Any]:
    """A copy of ``tokenizer`` that TransformerLens can take.

    TL re-loads every tokenizer from ``name_or_path`` with ``add_bos_token=True``; an in-memory one
    has no such path (and the Hub may be unreachable), so it is saved to a temporary directory and
    re-loaded from there for the duration of the build. The user's tokenizer is never modified.
    """
    if tokenizer is None:
        yield None
        return
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="lnfree_tok_") as tmp:
        tokenizer.save_pretrained(tmp)
        yield AutoTokenizer.from_pretrained(tmp)


def require_hooked() -> None:
    """Raise unless the installed TransformerLens still has ``HookedTransformer`` (TL < 4)."""
    if not has_hooked_transformer():
        raise LNFreeError(
            f"HookedTransformer was removed in TransformerLens 4.0 (installed: {version('transformer-lens')}). "
            "Use backend='bridge' (TransformerBridge), or install transformer-lens>=3.9,<4.")


def build_hooked(config: Any, sd: dict[str, Tensor], *, lnfree: bool, tokenizer: Any,
                 prepend_bos: bool, model_name: str) -> Any:
    """A ``HookedTransformer`` holding the folded weights ``sd`` (HF naming), TL 3.x only."""
    require_hooked()
    import warnings

    from accelerate import init_empty_weights
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    W_E = sd["transformer.wte.weight"]
    cfg = HookedTransformerConfig(
        model_name=model_name, n_layers=config.n_layer, d_model=config.n_embd, n_ctx=config.n_positions,
        n_heads=config.n_head, d_head=config.n_embd // config.n_head, d_mlp=config.n_inner or 4 * config.n_embd,
        d_vocab=config.vocab_size, act_fn=config.activation_function, eps=config.layer_norm_epsilon,
        normalization_type=None if lnfree else "LNPre", positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=prepend_bos, dtype=W_E.dtype,
        device=str(W_E.device), init_weights=False,  # pragma: no mutate (weights are assigned next: cost only)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "HookedTransformer is deprecated" (TL 3.9)
        with init_empty_weights(include_buffers=False), tl_ready_tokenizer(tokenizer) as tok:
            model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    missing, unexpected = model.load_state_dict(tl_state_dict(sd, cfg.n_layers, cfg.n_heads), strict=False,
                                                assign=True)
    missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
    if missing or unexpected:  # pragma: no cover (the conversion writes exactly these keys); pragma: no mutate
        raise LNFreeError(f"Internal error building HookedTransformer: missing {missing}, unexpected {unexpected}")
    return _tokenizer_bos_as_cfg(model.eval(), prepend_bos)


def build_bridge(hf_model: nn.Module, *, lnfree: bool, tokenizer: Any, prepend_bos: bool,
                 model_name: str) -> Any:
    """A ``TransformerBridge`` around ``hf_model`` (folded, ours: the bridge rewires it in place)."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    def configure(adapter: Any) -> None:
        # GPT2's adapter sets normalization_type="LN"; each block deep-copies cfg after this hook,
        # so set it here. layer_norm_folding routes NormalizationBridge through the HF module,
        # which passes nn.Identity through (and runs the weight-1 LayerNorm of a baseline).
        adapter.cfg.normalization_type = None if lnfree else "LNPre"
        adapter.cfg.layer_norm_folding = True
        adapter.cfg.default_prepend_bos = prepend_bos

    with tl_ready_tokenizer(tokenizer) as tok:
        bridge = build_bridge_from_module(hf_model, "GPT2LMHeadModel", hf_config=hf_model.config, tokenizer=tok,
                                          post_adapter_hook=configure, model_name=model_name)
    bridge.cfg.default_prepend_bos = prepend_bos
    _live_identity_norm_hooks(bridge)
    _residual_taps_write_through(bridge)
    return _tokenizer_bos_as_cfg(bridge.eval(), prepend_bos)


def _live_identity_norm_hooks(bridge: Any) -> None:
    """Make a removed LayerNorm's ``hook_scale`` / ``hook_normalized`` edits take effect on a bridge.

    TL's ``NormalizationBridge`` fires both hooks for an identity module but returns its input
    unchanged, ignoring edits (a freeze-the-scale experiment would silently do nothing). Here an
    identity LN computes ``hook_normalized(x / hook_scale(1))``: ``x`` itself (a fresh tensor, so an
    in-place edit of its output never reaches the residual stream) unless a hook edits the scale or
    the normalised value.
    """
    import types

    import torch
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    def identity_forward(self: Any, x: Tensor) -> Tensor:
        scale = self.hook_scale(torch.ones_like(x[..., :1]))
        return self.hook_normalized(x / scale)

    for module in bridge.modules():
        if isinstance(module, NormalizationBridge) and isinstance(module.original_component, nn.Identity):
            module._hf_autograd_forward_with_hooks = types.MethodType(identity_forward, module)


def _residual_taps_write_through(bridge: Any) -> None:
    """Make a replaced ``hook_resid_mid`` (an alias of ``ln2.hook_in``) reach the skip connection.

    The HF block passes one tensor to ``ln_2`` and keeps it as the residual; TL's bridge hands a hook's
    replacement to the LayerNorm only, so zeroing ``blocks.{l}.hook_resid_mid`` would change what the
    MLP reads but not the residual stream (7.6 logits off a TransformerLens ``HookedTransformer`` on a
    test model). Here the final value of each block LayerNorm's ``hook_in`` is written into the input
    tensor itself, as on a model whose hook point sits on the residual stream.
    """
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    def sync(module: Any, inputs: tuple, out: Tensor) -> Tensor | None:
        if inputs and out is not inputs[0]:  # pragma: no mutate (copying a tensor onto itself changes nothing)
            inputs[0].copy_(out)
            return inputs[0]
        return None

    def write_through(module: Any) -> None:
        original = type(module).forward.__get__(module)  # the class's forward (bridge modules delegate attributes)

        def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            handle = module.hook_in.register_forward_hook(sync)  # runs after every user hook
            try:
                return original(hidden_states, *args, **kwargs)
            finally:
                handle.remove()
        object.__setattr__(module, "forward", forward)

    for block in bridge.blocks:
        for name in ("ln1", "ln2"):
            module = getattr(block, name, None)
            if isinstance(module, NormalizationBridge):
                write_through(module)


def _tokenizer_bos_as_cfg(model: Any, prepend_bos: bool) -> Any:
    """Make ``model.tokenizer(text)`` add a BOS exactly when ``prepend_bos`` (TL's copy adds one
    always), so a batch from the model's own tokenizer matches passing the strings. TL's
    ``to_tokens`` reads ``cfg.tokenizer_prepends_bos`` and still prepends on request."""
    if model.tokenizer is not None:
        model.tokenizer.add_bos_token = prepend_bos
        model.cfg.tokenizer_prepends_bos = prepend_bos
    return model
