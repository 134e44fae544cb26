"""The backends seam: one small interface between the attribution maths and each framework.

The maths (`dla`, `patching`, `circuits`,
`lens`) sees every model through a [`Backend`][lnfree_interp.backends.Backend] and never asks which framework
it runs on:

* sizes (``n_layers``, ``n_heads``, ``d_model``...), `Backend.weights` (per-layer views of the
  parameters in TransformerLens layout) and `Backend.norms` (what each LayerNorm site really
  computes, read from the modules the model runs, never from its config);
* *hooks by TransformerLens name* (``blocks.{l}.attn.hook_z`` as ``[batch, pos, head, d_head]``,
  ``blocks.{l}.hook_mlp_in``: the MLP's (normalised) input, the residual stream's skip path untouched,
  ``attn.hook_q/k/v``, ``attn.hook_pattern`` as ``[batch, head, query, key]``,
  ``hook_mlp_out``, ``hook_embed``...), see [`Backend.hook_names`][lnfree_interp.backends.Backend.hook_names];
* one run primitive, `Backend.run`: a forward pass with hooks that patch, activations captured,
  and gradients of a per-prompt metric at chosen hooks; hooks are always removed, train/eval flags
  restored, and concurrent runs on one model are serialised.

Frameworks are imported lazily: a backend is only looked at when its package is already imported
(the einops ``_backends`` pattern), so using nnsight never imports TransformerLens.

Backends (one module each): `hf` (a folded ``GPT2LMHeadModel``, and nnsight's
``TransformersModel`` over one) and `tl` (``HookedTransformer``, ``TransformerBridge``, and
nnsight over either).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import LNFreeError

#: A hook function: gets the activation in TransformerLens layout; returns a replacement, or ``None``
#: to leave it unchanged.
HookFn = Callable[[Tensor], "Tensor | None"]

#: The hook names every backend provides, per layer (plus ``hook_embed``, ``hook_pos_embed``).
LAYER_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k",
               "attn.hook_v", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_mlp_in", "mlp.hook_pre",
               "mlp.hook_post", "hook_mlp_out")


@dataclass(frozen=True)  # pragma: no mutate (frozen: a guard against edits, not maths)
class NormSpec:
    """What one LayerNorm site computes, after the fold.

    ``identity``: nothing (LN-free). ``layernorm``: ``(x - mean x) / sqrt(var x + eps)`` with the affine
    map folded into the next weights (TransformerLens ``LNPre``).
    """

    kind: Literal["identity", "layernorm"]
    eps: float = 0.0  # pragma: no mutate (an identity's eps is never read)

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    def scale(self, x: Tensor) -> Tensor:
        """The LayerNorm's scale ``sqrt(var(x) + eps)`` over the last axis of ``x [..., d_model]``: ``[..., 1]``
        (for a ``layernorm`` site; an identity has none)."""
        c = x - x.mean(-1, keepdim=True)
        return (c.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def __call__(self, x: Tensor) -> Tensor:
        """Apply the normalisation over the last axis."""
        if self.is_identity:
            return x
        return (x - x.mean(-1, keepdim=True)) / self.scale(x)

    def vjp(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """Vector-Jacobian product: ``d/dx`` of ``(grad_out . norm(x))`` at input ``x`` (broadcasts).

        For ``y = C x / s`` with ``s = sqrt(|C x|^2 / d + eps)``: ``(C g - y (y . C g) / d) / s``.
        """
        if self.is_identity:
            return grad_out
        d = x.shape[-1]
        s = self.scale(x)
        y = (x - x.mean(-1, keepdim=True)) / s
        g = grad_out - grad_out.mean(-1, keepdim=True)
        return (g - y * (y * g).sum(-1, keepdim=True) / d) / s


@dataclass(frozen=True)  # pragma: no mutate (frozen: a guard against edits, not maths)
class Norms:
    """The model's LayerNorm sites: ``ln1[l]`` (before attention), ``ln2[l]`` (before the MLP), ``ln_final``."""

    ln1: Sequence[NormSpec]
    ln2: Sequence[NormSpec]
    ln_final: NormSpec

    @property
    def lnfree(self) -> bool:
        return all(s.is_identity for s in (*self.ln1, *self.ln2, self.ln_final))


@dataclass(frozen=True)  # pragma: no mutate (frozen: a guard against edits, not maths)
class Weights:
    """The model's weights in TransformerLens layout: per-layer lists of views of its parameters
    (never copies, never written to). LayerNorm affine maps are folded in (``ln_f`` into ``W_U``/``b_U``)."""

    W_Q: Sequence[Tensor]  #: per layer [n_heads, d_model, d_head]
    W_K: Sequence[Tensor]  #: per layer [n_heads, d_model, d_head]
    W_V: Sequence[Tensor]  #: per layer [n_heads, d_model, d_head]
    b_Q: Sequence[Tensor]  #: per layer [n_heads, d_head]
    b_K: Sequence[Tensor]  #: per layer [n_heads, d_head]
    b_V: Sequence[Tensor]  #: per layer [n_heads, d_head]
    W_O: Sequence[Tensor]  #: per layer [n_heads, d_head, d_model]
    b_O: Sequence[Tensor]  #: per layer [d_model]
    W_in: Sequence[Tensor]  #: per layer [d_model, d_mlp]
    b_in: Sequence[Tensor]  #: per layer [d_mlp]
    W_out: Sequence[Tensor]  #: per layer [d_mlp, d_model]
    b_out: Sequence[Tensor]  #: per layer [d_model]
    W_U: Tensor  #: [d_model, d_vocab]
    b_U: Tensor  #: [d_vocab]


@dataclass
class Run:
    """What `Backend.run` returns: logits, captured activations, metric and gradients."""

    logits: Tensor  #: [batch, pos, d_vocab] (detached)
    acts: dict[str, Tensor] = field(default_factory=dict)  #: hook name -> captured (detached) value
    metric: Tensor | None = None  #: [batch], the metric on these logits (detached)
    grads: dict[str, Tensor] = field(default_factory=dict)  #: hook name -> d sum(metric) / d activation


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(module: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises this library's hooked runs on one model (thread safety)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


class Backend:
    """What the attribution code needs from a model. Subclasses implement the framework part:
    ``_weights``, ``_norms``, ``forward`` and ``hooks``."""

    #: short name shown in results ("hooked", "bridge", "hf", "nnsight", "unified")
    name: str = ""

    def __init__(self, model: object, module: torch.nn.Module, name: str | None = None):
        self.model = model  #: the object the user passed
        self.module = module  #: the torch module that runs (mode switches and parameters)
        if name is not None:
            self.name = name

    # --- sizes and kind ---------------------------------------------------------------------
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int

    @property
    def lnfree(self) -> bool:
        """Every LayerNorm site is the identity (read from the modules the model runs)."""
        return self.norms().lnfree

    @property
    def eps(self) -> float:
        """The final LayerNorm's eps (0 when it is the identity)."""
        return self.norms().ln_final.eps

    @property
    def dtype(self) -> torch.dtype:
        return self.weights().W_U.dtype

    @property
    def device(self) -> torch.device:
        return self.weights().W_U.device

    def weights(self) -> Weights:
        raise NotImplementedError

    def norms(self) -> Norms:
        raise NotImplementedError

    def forward(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Logits ``[batch, pos, d_vocab]`` for token ids ``[batch, pos]`` (padding-aware)."""
        raise NotImplementedError

    def unembed(self) -> torch.nn.Module:
        """The module that maps the final (normalised) residual stream ``[batch, pos, d_model]`` to the logits."""
        raise NotImplementedError

    def hook_names(self) -> list[str]:
        """TransformerLens names this backend can hook."""
        return ["hook_embed", "hook_pos_embed"] + [
            f"blocks.{layer}.{n}" for layer in range(self.n_layers) for n in LAYER_HOOKS]

    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, HookFn]) -> Iterator[None]:
        """Attach ``fns`` (TL name -> function) for the duration of the block; always removed."""
        raise NotImplementedError
        yield  # pragma: no cover

    def check_names(self, names) -> None:
        known = set(self.hook_names())
        bad = [n for n in names if n not in known]
        if bad:
            raise LNFreeError(f"Unknown hook name(s) {bad} for this {self.name} model; valid names look "
                              f"like {self.hook_names()[:4]} ... (TransformerLens naming).")

    # --- the run primitive ------------------------------------------------------------------
    def run(self, tokens: Tensor, mask: Tensor | None, *, hooks: Mapping[str, HookFn] | None = None,
            capture: Sequence[str] | Mapping[str, Callable[[Tensor], Tensor]] = (),
            grad_of: Sequence[str] = (), metric: Callable[[Tensor], Tensor] | None = None,
            positions: Tensor | None = None) -> Run:
        """One forward pass, in eval mode, under this model's lock.

        Args:
            tokens: ``[batch, pos]`` token ids; ``mask`` the ``[batch, pos]`` attention mask.
            hooks: TL name -> function applied first (return a replacement to patch, ``None`` to keep).
            capture: hook names whose (possibly patched) values to keep, detached; or a mapping
                name -> reducer applied to the value before it is kept (e.g. select positions).
            grad_of: hook names at which to take ``d sum(metric) / d activation`` (needs ``metric``).
            metric: logits ``[batch, pos, vocab]`` -> ``[batch]``; required with ``grad_of``.
            positions: ``[batch]`` one position per row: the unembedding runs on those positions only,
                so the logits (and the metric's argument) are ``[batch, 1, vocab]``. For metrics that read
                one position per prompt (see `metrics.readout`): the unembedding is ~30% of a GPT-2
                forward, and as much again in the backward.

        Gradients come from ``torch.autograd.grad`` with respect to the activations only (no ``.grad``
        is written on parameters), whether or not the parameters require grad.

        Raises:
            LNFreeError: unknown hook names, ``grad_of`` without a metric, a metric that is not one
                differentiable scalar per prompt, or non-finite gradients.
        """
        hooks = dict(hooks or {})
        reducers = dict(capture) if isinstance(capture, Mapping) else {n: (lambda x: x) for n in capture}
        if grad_of and metric is None:
            raise LNFreeError("Backend.run(grad_of=...) needs a metric.")
        self.check_names([*hooks, *reducers, *grad_of])
        acts: dict[str, Tensor] = {}
        live: dict[str, Tensor] = {}

        def make(name: str) -> HookFn:
            user, reduce, want_grad = hooks.get(name), reducers.get(name), name in grad_of

            def fn(act: Tensor) -> Tensor:
                if user is not None:
                    out = user(act)
                    act = act if out is None else out
                if want_grad:
                    live[name] = act
                if reduce is not None:
                    acts[name] = reduce(act).detach()
                return act  # the bridge uses the returned tensor downstream: gradients flow through it
            return fn

        names = list(dict.fromkeys([*hooks, *reducers, *grad_of]))
        fns = {n: make(n) for n in names}
        if grad_of:  # activations need a grad path even if every parameter is frozen
            embed = fns.get("hook_embed")

            def leaf(act: Tensor) -> Tensor:
                out = embed(act) if embed else None
                return _leaf(act if out is None else out)
            fns["hook_embed"] = leaf
        with model_lock(self.module), eval_mode(self), torch.set_grad_enabled(bool(grad_of)), self.hooks(fns), \
                _select_positions(self, positions):
            logits = self.forward(tokens, mask)
            value = None
            grads: dict[str, Tensor] = {}
            if metric is not None:
                value = check_metric(metric(logits), tokens.shape[0], need_grad=bool(grad_of))
                if grad_of:
                    missing = [n for n in grad_of if n not in live]
                    if missing:  # pragma: no cover - every listed hook fires in a forward pass
                        raise LNFreeError(f"Hooks {missing} did not fire in the forward pass.")
                    got = torch.autograd.grad(value.sum(), [live[n] for n in grad_of],
                                              allow_unused=True)  # pragma: no mutate (a guard: all feed the metric)
                    for n, g in zip(grad_of, got):
                        g = torch.zeros_like(live[n]) if g is None else g
                        if not bool(torch.isfinite(g).all()):
                            raise LNFreeError(
                                f"Non-finite gradients in {self.dtype}"
                                + (": the metric itself is NaN or infinite for some prompts; check the metric function"
                                   if not bool(torch.isfinite(value.detach()).all()) else
                                   " (overflow); load the model in float32 or float64 for gradient-based attribution")
                                + ".")
                        grads[n] = g.detach()
        return Run(logits.detach(), acts, None if value is None else value.detach(), grads)


#: rows below which the unembedding of selected positions is padded: BLAS picks other kernels for a
#: handful of rows (e.g. 3), whose rounding differs from the many-row product of a patching pass, and
#: identical clean and corrupted prompts would then give float32 effects of ~1e-7 instead of exactly 0
_MIN_ROWS = 16  # pragma: no mutate (more rows pad alike)


@contextlib.contextmanager
def _select_positions(backend: Backend, positions: Tensor | None) -> Iterator[None]:
    """Unembed only ``positions`` (one per row) inside the block; nothing when ``None``."""
    if positions is None:
        yield
        return
    rows = positions.shape[0]

    def pre(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.dim() != 3 or x.shape[0] != rows:  # pragma: no cover (every backend passes [B, P, d]); pragma: no mutate
            raise LNFreeError(f"Internal error: unembedding input of shape {tuple(x.shape)} for {rows} positions.")
        picked = x[torch.arange(rows, device=x.device), positions.to(x.device)][:, None]
        if rows < _MIN_ROWS:  # pragma: no mutate (padding 16 rows to 16 is no padding)
            picked = torch.cat([picked, picked.new_zeros(_MIN_ROWS - rows, *picked.shape[1:])])  # pragma: no mutate
        return (picked, *args[1:])  # pragma: no mutate (extra rows are cut after; the unembedding takes one arg)

    def post(module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out[:rows]

    module = backend.unembed()
    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _leaf(act: Tensor) -> Tensor:
    return act if act.requires_grad else act.detach().requires_grad_(True)


def check_metric(value: Any, batch: int, need_grad: bool) -> Tensor:
    """``value`` if it is one scalar per prompt (differentiable when ``need_grad``).

    Raises:
        LNFreeError: another shape or type, or no gradient with respect to the logits.
    """
    if not torch.is_tensor(value) or value.shape != (batch,):
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise LNFreeError(f"The metric must return one scalar per prompt, shape ({batch},); got {shape}. "
                          "Reduce over positions/vocabulary inside the metric, not over the batch.")
    if need_grad and not value.requires_grad:
        raise LNFreeError("The metric has no gradient with respect to the logits (e.g. it uses argmax or "
                          ".detach()); gradient-based attribution needs a differentiable metric such as logit_diff.")
    return value


def get_backend(model: object) -> Backend:
    """The backend for ``model``; detected lazily from the frameworks already imported.

    Raises:
        LNFreeError: the model is not one the library supports.
    """
    if isinstance(model, Backend):
        return model
    if "nnsight" in sys.modules:
        import nnsight

        if isinstance(model, nnsight.Envoy):
            inner: Any = get_backend(model._module)
            return type(inner)(model._module, wrapper=model,
                               name="nnsight" if inner.name == "hf" else "unified")
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
