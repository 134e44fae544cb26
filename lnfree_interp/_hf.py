"""Building HF ``GPT2LMHeadModel`` objects: the folded model and the independent reference."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .checkpoints import FOLDED_MARKER, Source
from .errors import LNFreeError
from .fold import LNState, ln_names

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


def build_gpt2(config: Any, state_dict: dict[str, torch.Tensor], *, identity_ln: bool,
               device: str | torch.device = "cpu") -> nn.Module:
    """A ``GPT2LMHeadModel`` holding ``state_dict`` (no copy), untied ``lm_head`` with a bias.

    ``identity_ln`` replaces ``ln_1``, ``ln_2`` and ``ln_f`` by ``nn.Identity`` (LN-free); otherwise
    they stay ``LayerNorm`` modules (weights 1 and bias 0 after the fold: ``LNPre``).
    """
    from accelerate import init_empty_weights
    from transformers import GPT2LMHeadModel

    dtype = state_dict["transformer.wte.weight"].dtype
    with init_empty_weights(include_buffers=False):
        model = GPT2LMHeadModel(config)
        if identity_ln:
            for name in ln_names(config.n_layer):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, nn.Identity())
        model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:  # pragma: no cover - the fold writes exactly these keys
        raise LNFreeError(f"Internal error building GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    model.config.dtype = dtype
    return model.to(device).eval()


def folded_config(source: Source, encoding: str, *, lnfree: bool, center_writing_weights: bool) -> Any:
    """A copy of the source config for the folded model, with the library's marker."""
    config = copy.deepcopy(source.config)
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

    Every hacked LN is replaced by :class:`CenterAffine`; real LNs stay ``nn.LayerNorm``. For a
    checkpoint already folded by this library the reference is the folded model itself in float64.
    """
    from accelerate import init_empty_weights
    from transformers import GPT2LMHeadModel

    sd = {k: source.state_dict[k].detach().to(dtype).clone() for k in source.state_dict}
    config = copy.deepcopy(source.config)
    if lns is None:
        return build_gpt2(config, sd, identity_ln=True)
    with init_empty_weights(include_buffers=False):
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
