"""Public loaders: the folded model for HF, TransformerLens, nnsight ([`verify`][lnfree_interp.verify] checks it).

Every loader takes the same source and options, runs the float64 fold ([`fold`][lnfree_interp.fold])
once, and hands the folded weights to one backend builder. Nothing the user passes in is modified:
in-memory models are read, never written, and tokenizers are copied before a framework gets them.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .builders.hf import (
    IdentityLayerNorm,
    as_dtype,
    attention_q_scale,
    baseline_eps,
    build_gpt2,
    check_device,
    check_variant,
    folded_config,
    tl_act_fn,
)
from .checkpoints import Source, SourceLike, analyse_source, resolve
from .errors import LNFreeError
from .fold import fold_state_dict, ln_names

_OLD_BUFFER_RE = re.compile(r"\.attn\.(bias|masked_bias)$")

#: attribute naming the checkpoint a loaded model came from (read by [`verify`][lnfree_interp.verify])
SOURCE_ATTR = "lnfree_source"

#: the keyword options every loader takes (one definition: `_options` validates them)
LOAD_OPTIONS = ("backend", "dtype", "device", "tokenizer", "expect_lnfree", "center_writing_weights",
                "center_unembed", "prepend_bos")
#: the ``backend=`` values each loader can build
_BACKENDS = {"load_hf": ("hf",), "load_nnsight": ("hf",), "load_hooked": ("hooked", "bridge"),
             "load_unified": ("hooked", "bridge")}


@dataclass(frozen=True)
class LoadOptions:
    """The options shared by `load_hf`, `load_hooked`, `load_nnsight` and
    [`load_unified`][lnfree_interp.load_unified] (every loader accepts every option; an option that does not apply to a
    loader accepts only its neutral value and refuses others with [`LNFreeError`][lnfree_interp.LNFreeError])."""

    backend: str | None = None
    dtype: Any = torch.float32
    device: Any = "cpu"
    tokenizer: Any = None
    expect_lnfree: bool = True
    center_writing_weights: bool = False
    center_unembed: bool = False
    prepend_bos: bool = False


def _options(loader: str, **kwargs: Any) -> LoadOptions:
    """Validate the shared options for ``loader``.

    Raises:
        LNFreeError: ``backend`` not one that ``loader`` builds; ``prepend_bos=True`` for a loader
            whose model takes token ids as given (HF, nnsight); non-bool flags.
    """
    opts = LoadOptions(**kwargs)
    allowed = _BACKENDS[loader]
    if opts.backend is not None and opts.backend not in allowed:
        others = {"hooked": "load_hooked / load_unified", "bridge": "load_hooked / load_unified",
                  "hf": "load_hf / load_nnsight"}
        hint = f" ({others[opts.backend]} builds backend={opts.backend!r})" if opts.backend in others else ""
        raise LNFreeError(f"{loader}(backend={opts.backend!r}): {loader} builds "
                          f"{' or '.join(repr(b) for b in allowed)}{hint}.")
    for flag in ("expect_lnfree", "center_writing_weights", "center_unembed", "prepend_bos"):
        if not isinstance(getattr(opts, flag), bool):
            raise LNFreeError(f"{loader}({flag}={getattr(opts, flag)!r}): pass True or False.")
    if opts.prepend_bos and allowed == ("hf",):
        raise LNFreeError(
            f"{loader}(prepend_bos=True): a transformers / nnsight model tokenizes strings without a BOS "
            "(as plain transformers does) and takes token ids as given. Prepend the BOS to your "
            "token ids yourself, or use load_hooked / load_unified, whose TransformerLens models have "
            "cfg.default_prepend_bos.")
    return opts


@dataclass
class _Loaded:
    source: Source
    encoding: str
    lnfree: bool
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any
    model_name: str


def _load_tokenizer(source: Source, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    if source.directory is not None and any(
        (source.directory / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    ):
        return AutoTokenizer.from_pretrained(str(source.directory))
    if source.known is not None and source.known.tokenizer_repo:
        try:  # through the HF cache; offline and not cached -> token ids only
            return AutoTokenizer.from_pretrained(source.known.tokenizer_repo)
        except OSError:
            return None
    return None


def _fold(src: SourceLike, opts: LoadOptions, kind: str) -> _Loaded:
    dtype = as_dtype(opts.dtype)
    check_device(opts.device)
    expect_lnfree, tokenizer = opts.expect_lnfree, opts.tokenizer
    center_writing_weights, center_unembed = opts.center_writing_weights, opts.center_unembed
    source = resolve(src)
    try:
        check_variant(source.config, source.label, kind)
        bad = [k for k in (f"{n}.{p}" for n in ln_names(source.n_layers) for p in ("weight", "bias"))
               if k in source.state_dict and not bool(torch.isfinite(source.state_dict[k]).all())]
        if bad:
            raise LNFreeError(
                f"{source.label} has inf/nan weights ({', '.join(bad[:3])}): the checkpoint is corrupt, or was cast "
                "to float16, where the LN-free hack's ~1e6 LayerNorm weights overflow. Pass the float32 checkpoint; "
                "dtype=... casts only after the fold.")
        encoding, lns = analyse_source(source)
        lnfree = encoding != "layernorm"
        if not lnfree and expect_lnfree:
            raise LNFreeError(
                f"{source.label} has real LayerNorms (a standard GPT-2, e.g. an LN baseline), not an "
                "LN-free encoding. To load it as an LN baseline, pass expect_lnfree=False; its LayerNorms "
                "are then kept (folded into LNPre), never replaced by identities.")
        if not lnfree:
            baseline_eps(source)  # one eps for every LayerNorm, or a clear error
        try:
            folded = fold_state_dict(
                source.state_dict, source.n_layers, lns, dtype=dtype,
                center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                tied_unembed=bool(getattr(source.config, "tie_word_embeddings", True)), copy=not source.owned,
                q_scale=attention_q_scale(source.config))
        except KeyError as err:
            raise LNFreeError(f"{source.label} is missing weight {err.args[0]!r}; the checkpoint is "
                              "incomplete or not a GPT-2.") from err
        tok = _load_tokenizer(source, tokenizer)
        name = Path(source.label).name if source.directory is not None else source.label
        return _Loaded(source, encoding, lnfree, folded, tok, name)
    finally:
        source.close()


@dataclass(frozen=True)
class _InMemorySource:
    """What [`verify`][lnfree_interp.verify] needs of an in-memory source model that it holds no strong reference to:
    a weak reference, the directory or Hub id the model was loaded from (``config._name_or_path``)
    and a fingerprint of its weights (float64 sum and 2-norm per tensor), to recognise that
    directory as the same checkpoint once the model is garbage-collected."""

    ref: weakref.ref
    name_or_path: str
    fingerprint: dict[str, tuple[float, float]]


def _fingerprint(state_dict: Any) -> dict[str, tuple[float, float]]:
    out = {}
    for key in state_dict:
        if key == "lm_head.weight" or _OLD_BUFFER_RE.search(key):
            continue  # tied to wte in GPT-2 files; old attention-mask buffers are not weights
        t = state_dict[key].detach()
        if t.is_floating_point():
            out[key] = (float(torch.sum(t, dtype=torch.float64)),
                        float(torch.linalg.vector_norm(t, dtype=torch.float64)))
    return out


def _remember_source(model: Any, src: SourceLike) -> None:
    inner = getattr(src, "_module", None)
    module = src if isinstance(src, torch.nn.Module) else inner if isinstance(inner, torch.nn.Module) else None
    if module is None:
        ref: Any = src
    else:
        config = getattr(module, "config", None)
        ref = _InMemorySource(weakref.ref(src), str(getattr(config, "_name_or_path", "") or ""),
                              _fingerprint(module.state_dict()))
    object.__setattr__(model, SOURCE_ATTR, ref)


def recorded_source(module: Any) -> SourceLike:
    """The source recorded by the loader (for [`verify`][lnfree_interp.verify]).

    Raises:
        LNFreeError: none recorded; or an in-memory source that was garbage-collected and whose
            ``config._name_or_path`` is not a checkpoint with the same weights.
    """
    rec = getattr(module, SOURCE_ATTR, None)
    if rec is None:
        raise LNFreeError("verify() needs src=...: this model was not loaded by lnfree_interp, so it does not "
                          "record which checkpoint it came from.")
    if not isinstance(rec, _InMemorySource):
        return rec
    alive = rec.ref()
    if alive is not None:
        return alive
    how = ("Keep a reference to the model you loaded from and pass it: verify(model, src=hf_model), or load "
           "from the checkpoint directory (load_hooked(directory)) so that verify can re-read it.")
    if not rec.name_or_path:
        raise LNFreeError("verify(): this model was loaded from an in-memory GPT2LMHeadModel that has since been "
                          "garbage-collected, and that model did not come from a directory or Hub id. " + how)
    try:
        source = resolve(rec.name_or_path)
    except LNFreeError as err:
        raise LNFreeError(f"verify(): the in-memory source model was garbage-collected and the checkpoint it was "
                          f"loaded from ({rec.name_or_path!r}) cannot be read: {err} {how}") from err
    try:
        now = _fingerprint(source.state_dict)
    finally:
        source.close()
    same = set(now) == set(rec.fingerprint) and all(
        abs(a - b) <= 1e-9 * max(1.0, abs(b)) for k in now for a, b in zip(now[k], rec.fingerprint[k]))
    if not same:
        raise LNFreeError(f"verify(): the in-memory source model was garbage-collected, and the weights in "
                          f"{rec.name_or_path!r} (where it was loaded from) differ from the ones this model was "
                          f"folded from (edited or cast after loading?). {how}")
    return rec.name_or_path


def _hf(loaded: _Loaded, center_writing_weights: bool, device: Any) -> torch.nn.Module:
    config = folded_config(loaded.source, loaded.encoding, lnfree=loaded.lnfree,
                           center_writing_weights=center_writing_weights,
                           eps=None if loaded.lnfree else baseline_eps(loaded.source))
    model = build_gpt2(config, loaded.state_dict, identity_ln=loaded.lnfree, device=device)
    model.tokenizer = loaded.tokenizer
    return model


def load_hf(
    src: SourceLike,
    *,
    backend: Literal["hf"] | None = None,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
    expect_lnfree: bool = True,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    prepend_bos: bool = False,
) -> Any:
    """Load a checkpoint as a ``transformers.GPT2LMHeadModel`` with folded weights and identity LNs.

    The hack is undone and every LayerNorm's centring and affine map folded into the weights that
    read from it ([`fold`][lnfree_interp.fold], float64 arithmetic); ``ln_1``, ``ln_2`` and ``ln_f`` become
    identities (`IdentityLayerNorm`: an ``nn.Identity`` that returns a copy,
    so editing an LN's output in place never edits the residual stream) and ``lm_head`` an untied
    ``nn.Linear`` with a bias (``ln_f``'s bias folded), so the model's logits equal the checkpoint's
    centre-and-affine computation exactly. Attention-scaling options of the config
    (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx``) are folded into ``W_Q``/``b_Q``
    and ``reorder_and_upcast_attn`` dropped (same function; it only changes rounding), so the
    returned model is a standard GPT-2. The model is in eval mode; ``model.tokenizer`` holds the
    tokenizer (or ``None``). ``model.save_pretrained(dir)`` writes a checkpoint that loads back
    identically through this library (encoding ``"folded"``); plain ``GPT2LMHeadModel.from_pretrained``
    cannot hold identity LayerNorms or an unembedding bias, so share the original checkpoint, or
    [`save_lnfree`][lnfree_interp.save_lnfree]'s schaeff encoding, with plain transformers users.

    Every loader takes the same keyword options (`LoadOptions`); an option that does not
    apply to a loader accepts only its neutral value and refuses others with [`LNFreeError`][lnfree_interp.LNFreeError].

    Args:
        src: Hub id or alias ([`list_checkpoints`][lnfree_interp.list_checkpoints]), local directory (sharded or single
            ``*.safetensors``, or ``pytorch_model.bin`` read with ``weights_only=True``), or an
            in-memory ``GPT2LMHeadModel`` / nnsight model over one (never modified).
        backend: which model to build: ``"hf"`` for `load_hf` / `load_nnsight` (the only
            choice there); ``"hooked"`` (``HookedTransformer``, default on TL 3.x) or ``"bridge"``
            (``TransformerBridge``, default on TL 4.x) for `load_hooked` / `load_unified`.
            ``None``: the default.
        dtype: ``torch.float32`` (default), ``torch.float64`` (exact to ~1e-15), ``torch.bfloat16``,
            or ``torch.float16`` (refused if a folded weight overflows); or its name.
        device: where the model lives.
        tokenizer: a tokenizer; default: the one beside the checkpoint (or its base model's, from
            the HF cache), else ``None`` (token ids only). Frameworks get a copy.
        expect_lnfree: refuse checkpoints with real LayerNorm (default). ``False`` loads LN
            baselines with their LayerNorms kept (affine folded, ``LNPre``: weight 1, bias 0).
        center_writing_weights: centre ``wte``, ``wpe`` and the output projections over d_model
            (TransformerLens's option; logits unchanged).
        center_unembed: centre ``W_U``/``b_U`` over the vocabulary (TL's option; shifts logits by a
            per-position constant). Off by default so logits equal the HF model's.
        prepend_bos: TL models: ``cfg.default_prepend_bos`` (off, so that a string tokenizes the same
            in every backend; TL's own default is on). HF / nnsight models take token ids as given:
            only ``False``.

    Raises:
        LNFreeError: unreadable / non-GPT-2 / half-hacked checkpoints (see `inspect_checkpoint`),
            an LN baseline without ``expect_lnfree=False``, a GPT-2 config option the backend cannot
            compute exactly (named, with the backend), float16 overflow, an option value this loader
            cannot apply.

    Returns:
        ``GPT2LMHeadModel``.
    """
    opts = _options("load_hf", backend=backend, dtype=dtype, device=device, tokenizer=tokenizer,
                    expect_lnfree=expect_lnfree, center_writing_weights=center_writing_weights,
                    center_unembed=center_unembed, prepend_bos=prepend_bos)
    loaded = _fold(src, opts, "hf")
    model = _hf(loaded, center_writing_weights, device)
    _remember_source(model, src)
    return model


def _tl_backend(backend: str | None) -> str:
    from .backends.tl import has_hooked_transformer

    if backend is None:
        return "hooked" if has_hooked_transformer() else "bridge"
    return backend


def _unalias_tl(model: Any, kind: str) -> Any:
    """Give a TL model's removed LayerNorms a fresh output tensor (see `IdentityLayerNorm`).

    ``HookedTransformer`` with ``normalization_type=None`` has ``nn.Identity`` ``ln1``/``ln2``: they
    become `IdentityLayerNorm`. A ``TransformerBridge`` passes an identity LayerNorm's input
    straight through its ``NormalizationBridge``; `build_bridge` makes it
    compute ``hook_normalized(x / hook_scale(1))``, a fresh tensor whose LN hook edits take effect.
    """
    from torch import nn

    if kind == "hooked":
        for block in model.blocks:
            for name in ("ln1", "ln2"):
                if type(getattr(block, name, None)) is nn.Identity:
                    setattr(block, name, IdentityLayerNorm())
        return model
    return model  # a bridge's identity LNs return a fresh tensor already (builders.tl.build_bridge)


def load_hooked(
    src: SourceLike,
    *,
    backend: Literal["hooked", "bridge"] | None = None,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
    expect_lnfree: bool = True,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    prepend_bos: bool = False,
) -> Any:
    """Load a checkpoint into TransformerLens with identity LNs: ``HookedTransformer`` or ``TransformerBridge``.

    Built offline from the checkpoint's own config (never ``from_pretrained("gpt2")``, which
    fetches the Hub config and resets eps to 1e-5), with our float64 fold instead of TL's float32
    weight processing. LN-free models get ``cfg.normalization_type = None`` (``apply_ln_to_stack``
    is a no-op, no ``ln_final`` hooks); LN baselines (``expect_lnfree=False``) get ``"LNPre"`` with
    ``ln1``/``ln2``/``ln_final.hook_scale`` present, as after TL's ``fold_ln``. Standard hook names:
    ``blocks.{l}.attn.hook_z``, ``blocks.{l}.hook_resid_pre``, ``blocks.{l}.hook_mlp_out``, ...
    The removed LayerNorms return a copy of the residual stream, so editing their output (a bridge's
    ``blocks.{l}.ln1.hook_out``, nnsight's ``blocks[l].ln1.output``) edits only that LN's reader.

    Args:
        src: as in [`load_hf`][lnfree_interp.load_hf].
        backend: as in [`load_hf`][lnfree_interp.load_hf].
        dtype: as in [`load_hf`][lnfree_interp.load_hf].
        device: as in [`load_hf`][lnfree_interp.load_hf].
        tokenizer: as in [`load_hf`][lnfree_interp.load_hf].
        expect_lnfree: as in [`load_hf`][lnfree_interp.load_hf].
        center_writing_weights: as in [`load_hf`][lnfree_interp.load_hf].
        center_unembed: as in [`load_hf`][lnfree_interp.load_hf].
        prepend_bos: as in [`load_hf`][lnfree_interp.load_hf] (the same options for every loader).

    Raises:
        LNFreeError: as [`load_hf`][lnfree_interp.load_hf].

    Returns:
        ``transformer_lens.HookedTransformer`` or ``transformer_lens.model_bridge.TransformerBridge``.
    """
    opts = _options("load_hooked", backend=backend, dtype=dtype, device=device, tokenizer=tokenizer,
                    expect_lnfree=expect_lnfree, center_writing_weights=center_writing_weights,
                    center_unembed=center_unembed, prepend_bos=prepend_bos)
    kind = _tl_backend(backend)
    from .builders import tl

    if kind == "hooked":
        tl.require_hooked()
    loaded = _fold(src, opts, kind)
    if kind == "hooked":
        config = folded_config(loaded.source, loaded.encoding, lnfree=loaded.lnfree,
                               center_writing_weights=center_writing_weights,
                               eps=None if loaded.lnfree else baseline_eps(loaded.source))
        config.activation_function = tl_act_fn(config, loaded.source.label)
        model = tl.build_hooked(config, loaded.state_dict, lnfree=loaded.lnfree,
                                tokenizer=loaded.tokenizer, prepend_bos=prepend_bos, model_name=loaded.model_name)
        if torch.device(device) != model.W_E.device:
            model = model.to(device)
    else:
        hf = _hf(loaded, center_writing_weights, device)
        model = tl.build_bridge(hf, lnfree=loaded.lnfree, tokenizer=loaded.tokenizer, prepend_bos=prepend_bos,
                                model_name=loaded.model_name)
    if loaded.lnfree:
        _unalias_tl(model, kind)
    _remember_source(model, src)
    return model


def load_nnsight(
    src: SourceLike,
    *,
    backend: Literal["hf"] | None = None,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
    expect_lnfree: bool = True,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    prepend_bos: bool = False,
) -> Any:
    """Load a checkpoint as an ``nnsight.TransformersModel`` over the folded HF model (`load_hf`).

    Standard HF module names inside traces (``model.transformer.h[0].attn.c_proj.input``), batching
    across invokes (left-padded by nnsight, positions from the mask), gradients inside traces
    (``with metric.backward(): g = x.grad.save()``). ``model.transformer.h[0].ln_1.output[:] = 0``
    zeroes the attention input only, as on a model with a real LayerNorm.

    Args:
        src: as in [`load_hf`][lnfree_interp.load_hf].
        backend: as in [`load_hf`][lnfree_interp.load_hf].
        dtype: as in [`load_hf`][lnfree_interp.load_hf].
        device: as in [`load_hf`][lnfree_interp.load_hf].
        tokenizer: as in [`load_hf`][lnfree_interp.load_hf].
        expect_lnfree: as in [`load_hf`][lnfree_interp.load_hf].
        center_writing_weights: as in [`load_hf`][lnfree_interp.load_hf].
        center_unembed: as in [`load_hf`][lnfree_interp.load_hf].
        prepend_bos: as in [`load_hf`][lnfree_interp.load_hf] (the same options for every loader).

    Raises:
        LNFreeError: as [`load_hf`][lnfree_interp.load_hf].

    Returns:
        ``nnsight.TransformersModel``; for a checkpoint without a tokenizer (which ``TransformersModel``
        requires), a `BatchedNNsight` over the same HF model that
        batches token-id invokes.
    """
    from .builders.nnsight import build_transformers_model

    opts = _options("load_nnsight", backend=backend, dtype=dtype, device=device, tokenizer=tokenizer,
                    expect_lnfree=expect_lnfree, center_writing_weights=center_writing_weights,
                    center_unembed=center_unembed, prepend_bos=prepend_bos)
    loaded = _fold(src, opts, "hf")
    model = build_transformers_model(_hf(loaded, center_writing_weights, device), loaded.tokenizer)
    _remember_source(model._module, src)
    return model


def load_unified(
    src: SourceLike,
    *,
    backend: Literal["hooked", "bridge"] | None = None,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
    expect_lnfree: bool = True,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    prepend_bos: bool = False,
) -> Any:
    """nnsight over the TransformerLens model of `load_hooked`: the successor of ``UnifiedTransformer``.

    TL hook names inside traces (``model.blocks[0].attn.hook_z.output``, ``[batch, pos, head,
    d_head]`` on a ``HookedTransformer``), several invokes per trace (strings or token ids,
    batched with right padding and an attention mask), edits and gradients as in any nnsight trace.

    Args:
        src: as in [`load_hf`][lnfree_interp.load_hf].
        backend: as in [`load_hf`][lnfree_interp.load_hf].
        dtype: as in [`load_hf`][lnfree_interp.load_hf].
        device: as in [`load_hf`][lnfree_interp.load_hf].
        tokenizer: as in [`load_hf`][lnfree_interp.load_hf].
        expect_lnfree: as in [`load_hf`][lnfree_interp.load_hf].
        center_writing_weights: as in [`load_hf`][lnfree_interp.load_hf].
        center_unembed: as in [`load_hf`][lnfree_interp.load_hf].
        prepend_bos: as in [`load_hf`][lnfree_interp.load_hf] (the same options for every loader).

    Raises:
        LNFreeError: as [`load_hf`][lnfree_interp.load_hf].

    Returns:
        `UnifiedModel` (an ``nnsight.NNsight``).
    """
    from .builders.nnsight import build_unified

    _options("load_unified", backend=backend, dtype=dtype, device=device, tokenizer=tokenizer,
             expect_lnfree=expect_lnfree, center_writing_weights=center_writing_weights,
             center_unembed=center_unembed, prepend_bos=prepend_bos)
    return build_unified(load_hooked(src, backend=backend, dtype=dtype, device=device, tokenizer=tokenizer,
                                     expect_lnfree=expect_lnfree, center_writing_weights=center_writing_weights,
                                     center_unembed=center_unembed, prepend_bos=prepend_bos))
