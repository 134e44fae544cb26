"""Building HF ``GPT2LMHeadModel`` objects: the folded model and the independent reference."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch
from torch import nn

from ..checkpoints import FOLDED_MARKER, Source
from ..errors import LNFreeError
from ..fold import LNState, ln_names

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def as_dtype(dtype: Any) -> torch.dtype:
    """Accept ``torch.float64`` or ``"float64"``."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise LNFreeError(f"Unsupported dtype {dtype!r}; use one of {list(DTYPES)}.")


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that this torch can use.

    Raises:
        LNFreeError: an unknown device string, or a CUDA / MPS device this torch build has no access to.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise LNFreeError(f"device={device!r} is not a torch device; use e.g. 'cpu' or 'cuda'.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LNFreeError(f"device={device!r} but torch.cuda.is_available() is False (torch {torch.__version__}); "
                          "use device='cpu', or install a CUDA build of torch on a machine with a GPU.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LNFreeError(f"device={device!r} but MPS is not available here; use device='cpu'.")
    return dev


class IdentityLayerNorm(nn.Identity):
    """A removed LayerNorm: returns a *copy* of its input, ``y = x`` (an ``nn.Identity``).

    ``nn.Identity`` returns its input tensor itself, so the LayerNorm's output would alias the
    residual stream: an in-place edit of the output (nnsight's ``h[0].ln_1.output[:] = 0``, a
    forward hook writing into its argument, a bridge hook point) would also edit the skip
    connection, unlike on any model with a real LayerNorm. The copy costs one read and write of the
    residual stream per LayerNorm (measured on 1 CPU thread, 4 x 128 tokens: the 25 copies of a
    GPT-2-small forward take 15 ms, ~0.15% of the forward).
    ``isinstance(m, nn.Identity)`` stays true, so code that detects removed LayerNorms keeps working.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def extra_repr(self) -> str:
        return "copy of the input (folded LN-free LayerNorm)"


def identity_layernorms(model: nn.Module, names: list[str]) -> None:
    """Replace the submodules ``names`` of ``model`` by `IdentityLayerNorm` (in place)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, IdentityLayerNorm())


def _no_init() -> Any:
    """Skip weight initialisation while building an empty model (its weights are assigned next;
    on meta tensors the init still costs ~10 ms a tensor in torch's Python decompositions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def build_gpt2(config: Any, state_dict: dict[str, torch.Tensor], *, identity_ln: bool,
               device: str | torch.device = "cpu") -> nn.Module:
    """A ``GPT2LMHeadModel`` holding ``state_dict`` (no copy), untied ``lm_head`` with a bias.

    ``identity_ln`` replaces ``ln_1``, ``ln_2`` and ``ln_f`` by `IdentityLayerNorm` (LN-free); otherwise
    they stay ``LayerNorm`` modules (weights 1 and bias 0 after the fold: ``LNPre``).
    """
    from accelerate import init_empty_weights
    from transformers import GPT2LMHeadModel

    dtype = state_dict["transformer.wte.weight"].dtype
    with init_empty_weights(include_buffers=False), _no_init():
        model = GPT2LMHeadModel(config)
        if identity_ln:
            identity_layernorms(model, ln_names(config.n_layer))
        model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:  # pragma: no cover - the fold writes exactly these keys
        raise LNFreeError(f"Internal error building GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    model.config.dtype = dtype
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# GPT-2 config variants (issue 11 item 5): every field that changes the computation is either
# computed exactly on every backend or refused here, at load time, naming the field and backend.
# --------------------------------------------------------------------------------------------

#: transformers ``activation_function`` -> the TransformerLens ``act_fn`` computing the same function
#: (same formula in both libraries; checked at float64 tolerance by tests/test_loaders.py).
TL_ACT_FN = {"gelu_new": "gelu_new", "gelu_fast": "gelu_fast", "gelu": "gelu", "gelu_python": "gelu",
             "gelu_pytorch_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
             "relu2": "relu2"}
#: attention implementations that compute GPT-2 attention in the model's dtype on every device
EXACT_ATTN = ("eager", "sdpa")


def check_variant(config: Any, label: str, backend: str) -> None:
    """Refuse GPT-2 config options that ``backend`` ("hf", "hooked", "bridge") cannot compute exactly.

    Handled elsewhere, exactly, on every backend: ``scale_attn_weights`` and
    ``scale_attn_by_inverse_layer_idx`` (folded into ``W_Q``, `attention_q_scale`),
    ``reorder_and_upcast_attn`` (dropped: the same function, only its rounding differs),
    ``n_inner``, ``layer_norm_epsilon`` (`baseline_eps`), the attention implementation.

    Raises:
        LNFreeError: ``add_cross_attention=True`` (any backend); an ``activation_function`` that
            transformers does not know or that has trainable parameters (any backend); one that
            TransformerLens's ``HookedTransformer`` has no exact equivalent for (``backend="hooked"``).
    """
    from transformers.activations import ACT2CLS, ACT2FN

    if getattr(config, "add_cross_attention", False):
        raise LNFreeError(
            f"{label}: add_cross_attention=True is not supported on any backend (backend={backend!r}): the "
            "cross-attention blocks carry their own LayerNorm (ln_cross_attn) that the fold does not handle, "
            "and a language model without encoder states never runs them. Load a GPT-2 with "
            "add_cross_attention=False.")
    act = getattr(config, "activation_function", "gelu_new")
    if act not in ACT2CLS:
        raise LNFreeError(f"{label}: activation_function={act!r} is not a transformers activation "
                          f"(known: {sorted(ACT2CLS)}); refused on backend={backend!r}.")
    if list(ACT2FN[act].parameters()):
        raise LNFreeError(f"{label}: activation_function={act!r} has trainable parameters that GPT-2 "
                          f"checkpoints do not store; refused on backend={backend!r}.")
    if backend == "hooked":
        tl_act_fn(config, label)


def tl_act_fn(config: Any, label: str) -> str:
    """The ``HookedTransformer`` ``act_fn`` for the config's ``activation_function``.

    Raises:
        LNFreeError: TransformerLens has no activation computing the same function.
    """
    act = getattr(config, "activation_function", "gelu_new")
    try:
        from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS
    except ImportError:  # pragma: no cover - older TL layouts
        SUPPORTED_ACTIVATIONS = {v: None for v in TL_ACT_FN.values()}
    tl_name = TL_ACT_FN.get(act)
    if tl_name is None or tl_name not in SUPPORTED_ACTIVATIONS:
        ok = sorted(k for k, v in TL_ACT_FN.items() if v in SUPPORTED_ACTIVATIONS)
        raise LNFreeError(
            f"{label}: activation_function={act!r} has no exact equivalent in TransformerLens's "
            f"HookedTransformer (backend='hooked' computes {ok}). Load it with backend='bridge', "
            "load_hf or load_nnsight, which run transformers' own activation.")
    return tl_name


def attention_q_scale(config: Any) -> list[float]:
    """Per-layer factor folded into ``W_Q``, ``b_Q`` so that standard GPT-2 attention
    (scores / sqrt(d_head)) computes the config's scaling: ``1 / sqrt(d_head)`` unless
    ``scale_attn_weights=False``, divided by ``layer + 1`` if ``scale_attn_by_inverse_layer_idx``
    (as ``transformers.models.gpt2.modeling_gpt2.GPT2Attention``). 1.0 for a standard GPT-2."""
    d_head = config.n_embd // config.n_head
    base = 1.0 if getattr(config, "scale_attn_weights", True) else math.sqrt(d_head)
    inverse = bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))
    return [base / (layer + 1 if inverse else 1) for layer in range(config.n_layer)]


def baseline_eps(source: Source) -> float:
    """The eps of an LN baseline's LayerNorms (one value for all, which the folded model uses).

    Raises:
        LNFreeError: the LayerNorm modules have different eps (TransformerLens has one ``cfg.eps``).
    """
    values = sorted(set(source.module_eps.values()))
    if len(values) != 1:
        raise LNFreeError(f"{source.label}: its LayerNorms have different eps {values}; the folded LN baseline "
                          "(LNPre) uses one eps for all. Set every LayerNorm's eps to one value.")
    return values[0]


def _standard_attention(config: Any) -> None:
    """Make ``config`` a standard GPT-2 attention (the scaling is folded into W_Q by the fold)."""
    config.scale_attn_weights = True
    config.scale_attn_by_inverse_layer_idx = False
    config.reorder_and_upcast_attn = False
    if getattr(config, "_attn_implementation", None) not in EXACT_ATTN:
        config._attn_implementation = "sdpa"


def folded_config(source: Source, encoding: str, *, lnfree: bool, center_writing_weights: bool,
                  eps: float | None = None) -> Any:
    """A copy of the source config for the folded model, with the library's marker; standard GPT-2
    attention (see `attention_q_scale`) and, for an LN baseline, ``layer_norm_epsilon = eps``."""
    config = copy.deepcopy(source.config)
    _standard_attention(config)
    if eps is not None:
        config.layer_norm_epsilon = eps
    config.tie_word_embeddings = False
    previous = getattr(source.config, FOLDED_MARKER, None) or {}
    setattr(config, FOLDED_MARKER, {
        "format": "folded-identity-ln" if lnfree else "folded-lnpre",
        "source": previous.get("source", source.label),
        "source_encoding": previous.get("source_encoding", encoding),
        "center_writing_weights": bool(center_writing_weights or previous.get("center_writing_weights")),
    })
    return config


class CenterAffine(nn.Module):
    """``(x - mean(x)) * w / sqrt(eps) + b``: what a hacked LayerNorm computes, written out by hand.

    The independent reference for the exactness tests (it shares no code with the fold).
    """

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.gain = nn.Parameter(ln.weight.detach().clone() / ln.eps ** 0.5, requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=-1, keepdim=True)) * self.gain + self.bias


def reference_model(source: Source, lns: list[LNState] | None, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The unfolded checkpoint as plain HF computes it, in ``dtype``, hacked LNs written out.

    Every hacked LN is replaced by `CenterAffine`; real LNs stay ``nn.LayerNorm``. For a
    checkpoint already folded by this library the reference is the folded model itself in float64.
    """
    from accelerate import init_empty_weights
    from transformers import GPT2LMHeadModel

    sd = {k: source.state_dict[k].detach().to(dtype).clone() for k in source.state_dict}
    config = copy.deepcopy(source.config)
    # transformers' own attention in float64: reorder_and_upcast_attn would compute the scores in
    # float32 (the same function, rounded), and only eager attention is plain arithmetic everywhere
    config.reorder_and_upcast_attn = False
    config._attn_implementation = "eager"
    if lns is None:
        return build_gpt2(config, sd, identity_ln=True)
    with init_empty_weights(include_buffers=False), _no_init():
        model = GPT2LMHeadModel(config)
        if "lm_head.bias" in sd:  # an LN baseline folded by this library: ln_f's bias lives here
            model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise LNFreeError(f"The reference model cannot hold this checkpoint: missing {missing}, "
                          f"unexpected {unexpected}.")
    model.tie_weights()
    for ln in lns:
        module = model.get_submodule(ln.name)
        module.eps = ln.eps
        if ln.hacked:
            parent, _, child = ln.name.rpartition(".")
            setattr(model.get_submodule(parent), child, CenterAffine(module))
    return model.eval()
