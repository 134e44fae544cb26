"""Public loaders: the folded model in HF, TransformerLens and nnsight form, and :func:`verify`.

Every loader takes the same source and options, runs the float64 fold (:mod:`lnfree_interp.fold`)
once, and hands the folded weights to one backend builder. Nothing the user passes in is modified:
in-memory models are read, never written, and tokenizers are copied before a framework gets them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ._hf import as_dtype, build_gpt2, check_device, folded_config, reference_model
from .checkpoints import Source, SourceLike, _analyse, resolve
from .errors import LNFreeError
from .fold import fold_state_dict, ln_names

#: attribute naming the checkpoint a loaded model came from (read by :func:`verify`)
SOURCE_ATTR = "lnfree_source"


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


def _fold(src: SourceLike, *, dtype: Any, device: Any, tokenizer: Any, expect_lnfree: bool,
          center_writing_weights: bool, center_unembed: bool) -> _Loaded:
    dtype = as_dtype(dtype)
    check_device(device)
    source = resolve(src)
    try:
        bad = [k for k in (f"{n}.{p}" for n in ln_names(source.n_layers) for p in ("weight", "bias"))
               if k in source.state_dict and not bool(torch.isfinite(source.state_dict[k]).all())]
        if bad:
            raise LNFreeError(
                f"{source.label} has inf/nan weights ({', '.join(bad[:3])}): the checkpoint is corrupt, or was cast "
                "to float16, where the LN-free hack's ~1e6 LayerNorm weights overflow. Pass the float32 checkpoint; "
                "dtype=... casts only after the fold.")
        encoding, lns = _analyse(source)
        lnfree = encoding != "layernorm"
        if not lnfree and expect_lnfree:
            raise LNFreeError(
                f"{source.label} has real LayerNorms (a standard GPT-2, e.g. an LN baseline), not an "
                "LN-free encoding. To load it as an LN baseline, pass expect_lnfree=False; its LayerNorms "
                "are then kept (folded into LNPre), never replaced by identities.")
        try:
            folded = fold_state_dict(
                source.state_dict, source.n_layers, lns, dtype=dtype,
                center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                tied_unembed=bool(getattr(source.config, "tie_word_embeddings", True)), copy=not source.owned)
        except KeyError as err:
            raise LNFreeError(f"{source.label} is missing weight {err.args[0]!r}; the checkpoint is "
                              "incomplete or not a GPT-2.") from err
        tok = _load_tokenizer(source, tokenizer)
        name = Path(source.label).name if source.directory is not None else source.label
        return _Loaded(source, encoding, lnfree, folded, tok, name)
    finally:
        source.close()


def _remember_source(model: Any, src: SourceLike) -> None:
    ref = weakref.ref(src) if isinstance(src, torch.nn.Module) else src
    object.__setattr__(model, SOURCE_ATTR, ref)


def _hf(loaded: _Loaded, center_writing_weights: bool, device: Any) -> torch.nn.Module:
    config = folded_config(loaded.source, loaded.encoding, lnfree=loaded.lnfree,
                           center_writing_weights=center_writing_weights)
    model = build_gpt2(config, loaded.state_dict, identity_ln=loaded.lnfree, device=device)
    model.tokenizer = loaded.tokenizer
    return model


def load_hf(
    src: SourceLike,
    *,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
    expect_lnfree: bool = True,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
) -> Any:
    """Load a checkpoint as a ``transformers.GPT2LMHeadModel`` with folded weights and identity LNs.

    The hack is undone and every LayerNorm's centring and affine map folded into the weights that
    read from it (:mod:`lnfree_interp.fold`, float64 arithmetic); ``ln_1``, ``ln_2`` and ``ln_f`` become
    ``nn.Identity`` and ``lm_head`` an untied ``nn.Linear`` with a bias (``ln_f``'s bias folded), so
    the model's logits equal the checkpoint's centre-and-affine computation exactly. The model is in
    eval mode; ``model.tokenizer`` holds the tokenizer (or ``None``). ``model.save_pretrained(dir)``
    writes a checkpoint that loads back identically through this library (encoding ``"folded"``);
    plain ``GPT2LMHeadModel.from_pretrained`` cannot hold identity LayerNorms or an unembedding
    bias (its load report lists them as missing / unexpected, and its logits are wrong), so share
    the original checkpoint, or :func:`save_lnfree`'s schaeff encoding, with plain transformers users.

    Args:
        src: Hub id or alias (:func:`list_checkpoints`), local directory, or in-memory
            ``GPT2LMHeadModel`` (never modified).
        dtype: ``torch.float32`` (default), ``torch.float64`` (exact to ~1e-15), ``torch.bfloat16``,
            or ``torch.float16`` (refused if a folded weight overflows).
        device: where the model lives.
        tokenizer: a tokenizer; default: the one beside the checkpoint (or its base model's, from
            the HF cache), else ``None`` (token ids only).
        expect_lnfree: refuse checkpoints with real LayerNorm (default). ``False`` loads LN
            baselines with their LayerNorms kept (affine folded, ``LNPre``: weight 1, bias 0).
        center_writing_weights: centre ``wte``, ``wpe`` and the output projections over d_model
            (TransformerLens's option; logits unchanged).
        center_unembed: centre ``W_U``/``b_U`` over the vocabulary (TL's option; shifts logits by a
            per-position constant). Off by default so logits equal the HF model's.

    Returns:
        ``GPT2LMHeadModel``.

    Raises:
        LNFreeError: see :func:`inspect_checkpoint`; also for an LN baseline without
            ``expect_lnfree=False`` and for float16 overflow.
    """
    loaded = _fold(src, dtype=dtype, device=device, tokenizer=tokenizer, expect_lnfree=expect_lnfree,
                   center_writing_weights=center_writing_weights, center_unembed=center_unembed)
    model = _hf(loaded, center_writing_weights, device)
    _remember_source(model, src)
    return model


def _tl_backend(backend: str | None) -> str:
    from .backends.tl import has_hooked_transformer

    if backend is None:
        return "hooked" if has_hooked_transformer() else "bridge"
    if backend not in ("hooked", "bridge"):
        raise LNFreeError(f"backend={backend!r}: use 'hooked' (HookedTransformer, TL 3.x) or 'bridge' "
                          "(TransformerBridge, TL 3.9+/4.x).")
    return backend


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

    Args:
        src: as in :func:`load_hf`.
        dtype: as in :func:`load_hf`.
        device: as in :func:`load_hf`.
        tokenizer: as in :func:`load_hf`.
        expect_lnfree: as in :func:`load_hf`.
        center_writing_weights: as in :func:`load_hf`.
        center_unembed: as in :func:`load_hf` (off, so logits equal the HF model's).
        backend: ``"hooked"`` (``HookedTransformer``; default on TL 3.x) or ``"bridge"``
            (``TransformerBridge``; default on TL 4.x, where HookedTransformer was removed).
        prepend_bos: ``cfg.default_prepend_bos``; off so that a string tokenizes the same in every
            backend (TL's own default is on).

    Returns:
        ``transformer_lens.HookedTransformer`` or ``transformer_lens.model_bridge.TransformerBridge``.

    Raises:
        LNFreeError: as :func:`load_hf`; ``backend="hooked"`` on TL 4.x.
    """
    kind = _tl_backend(backend)
    from .backends import tl

    if kind == "hooked":
        tl.require_hooked()
    loaded = _fold(src, dtype=dtype, device=device, tokenizer=tokenizer, expect_lnfree=expect_lnfree,
                   center_writing_weights=center_writing_weights, center_unembed=center_unembed)
    if kind == "hooked":
        model = tl.build_hooked(loaded.source.config, loaded.state_dict, lnfree=loaded.lnfree,
                                tokenizer=loaded.tokenizer, prepend_bos=prepend_bos, model_name=loaded.model_name)
        if torch.device(device) != model.W_E.device:
            model = model.to(device)
    else:
        hf = _hf(loaded, center_writing_weights, device)
        model = tl.build_bridge(hf, lnfree=loaded.lnfree, tokenizer=loaded.tokenizer, prepend_bos=prepend_bos,
                                model_name=loaded.model_name)
    _remember_source(model, src)
    return model


def load_nnsight(
    src: SourceLike,
    *,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
    expect_lnfree: bool = True,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
) -> Any:
    """Load a checkpoint as an ``nnsight.TransformersModel`` over the folded HF model (:func:`load_hf`).

    Standard HF module names inside traces (``model.transformer.h[0].attn.c_proj.input``), batching
    across invokes (left-padded by nnsight, positions from the mask), gradients inside traces
    (``with metric.backward(): g = x.grad.save()``).

    Args:
        src: as in :func:`load_hf`.
        dtype: as in :func:`load_hf`.
        device: as in :func:`load_hf`.
        tokenizer: as in :func:`load_hf` (nnsight gets a copy: it sets the pad token and side).
        expect_lnfree: as in :func:`load_hf`.
        center_writing_weights: as in :func:`load_hf`.
        center_unembed: as in :func:`load_hf`.

    Returns:
        ``nnsight.TransformersModel``; for a checkpoint without a tokenizer (which ``TransformersModel``
        requires), a :class:`lnfree_interp.backends.nnsight.BatchedNNsight` over the same HF model that
        batches token-id invokes.

    Raises:
        LNFreeError: as :func:`load_hf`.
    """
    from .backends.nnsight import build_transformers_model

    loaded = _fold(src, dtype=dtype, device=device, tokenizer=tokenizer, expect_lnfree=expect_lnfree,
                   center_writing_weights=center_writing_weights, center_unembed=center_unembed)
    model = build_transformers_model(_hf(loaded, center_writing_weights, device), loaded.tokenizer)
    _remember_source(model._module, src)
    return model


def load_unified(src: SourceLike, *, backend: Literal["hooked", "bridge"] | None = None, **kwargs: Any) -> Any:
    """nnsight over the TransformerLens model of :func:`load_hooked`: the successor of ``UnifiedTransformer``.

    TL hook names inside traces (``model.blocks[0].attn.hook_z.output``, ``[batch, pos, head,
    d_head]`` on a ``HookedTransformer``), several invokes per trace (strings or token ids,
    batched with right padding and an attention mask), edits and gradients as in any nnsight trace.

    Args:
        src: as in :func:`load_hooked`.
        backend: as in :func:`load_hooked`.
        **kwargs: the other options of :func:`load_hooked`.

    Returns:
        :class:`lnfree_interp.backends.nnsight.UnifiedModel` (an ``nnsight.NNsight``).
    """
    from .backends.nnsight import build_unified

    return build_unified(load_hooked(src, backend=backend, **kwargs))


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------

#: pass thresholds of :func:`verify`: max |error| / max |logit| by dtype
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Verification:
    """Result of :func:`verify`. Errors are in logits."""

    backend: str
    dtype: torch.dtype
    max_abs_error: float  #: max |logits - reference logits|
    max_abs_logit: float  #: max |reference logits|
    tolerance: float  #: relative tolerance for ``dtype`` (:data:`TOLERANCE`)

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.max_abs_logit, 1e-30)

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance

    def __str__(self) -> str:
        return (f"{self.backend:8s} {str(self.dtype).replace('torch.', ''):9s} max|err| {self.max_abs_error:.3e} "
                f"(relative {self.relative_error:.2e}, tolerance {self.tolerance:.0e}) "
                f"{'ok' if self.passed else 'FAILED'}")


def verify(model: Any, src: SourceLike | None = None, *, tokens: Any = None, seed: int = 0) -> Verification:
    """Measure a loaded model against the exact reference of its checkpoint.

    The reference is the *unfolded* checkpoint run by HF ``GPT2LMHeadModel`` in float64 with every
    hacked LayerNorm replaced by a hand-written ``(x - mean(x)) * w / sqrt(eps) + b`` (real LNs
    kept), sharing no code with the fold.

    Args:
        model: anything the loaders return.
        src: the checkpoint it came from; default: the one recorded by the loader (an in-memory
            source is read as it is now: edit it after loading and the comparison fails).
        tokens: token ids ``[batch, pos]``; default: 2 x min(n_ctx, 32) random ids (``seed``).

    Returns:
        :class:`Verification` with the max absolute logit error and whether it is within the
        dtype's tolerance (float64 1e-12, float32 1e-5, relative to max |logit|).

    Raises:
        LNFreeError: no ``src`` given and none recorded.
    """
    from .backends import eval_mode, get_backend
    from .inputs import prepare

    backend = get_backend(model)
    if src is None:
        src = getattr(backend.module, SOURCE_ATTR, None)
        if isinstance(src, weakref.ref):
            src = src()
        if src is None:
            raise LNFreeError("verify() needs src=...: this model does not record which checkpoint it came from.")
    source = resolve(src)
    try:
        _, lns = _analyse(source)
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
    err = float((got - ref).abs().max())
    dtype = backend.dtype
    return Verification(backend.name, dtype, err, float(ref.abs().max()), TOLERANCE[dtype])
