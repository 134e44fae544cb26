"""lnfree_interp: exact interpretability tooling for LayerNorm-free GPT-2.

Loaders undo the LN-free hack (eps = 1e12, weight x 1e6; arXiv 2507.02559) and fold it into the
weights, giving models with identity LayerNorms in HF, TransformerLens and nnsight; the attribution
functions use the exactness that buys (direct logit attribution = direct effect).

    >>> from lnfree_interp import load_hooked, direct_logit_attribution
    >>> model = load_hooked("tiny-shakespeare-lnfree")
    >>> dla = direct_logit_attribution(model, "ROMEO: I", answer=" will", wrong=" am")
    >>> dla.top(5)

Frameworks are imported lazily: importing this package does not import TransformerLens or nnsight.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from .errors import LNFreeError

# public name -> module that defines it (imported on first use)
_API = {
    "load_hf": "loaders", "load_hooked": "loaders", "load_nnsight": "loaders", "load_unified": "loaders",
    "verify": "loaders", "Verification": "loaders",
    "inspect_checkpoint": "checkpoints", "CheckpointInfo": "checkpoints", "list_checkpoints": "checkpoints",
    "KnownCheckpoint": "checkpoints",
    "fold_state_dict": "fold",
    "direct_logit_attribution": "dla", "direct_effect": "dla", "compare_dla_direct_effect": "dla",
    "AttributionResult": "results", "Comparison": "results",
    "attribution_patching": "patching", "activation_patching": "patching", "compare_attribution": "patching",
    "logit_diff": "metrics", "logprob": "metrics",
    "ioi_prompts": "ioi", "IOIPrompts": "ioi",
    "evaluate_loss": "evaluation", "LossReport": "evaluation",
    "remove_layernorm": "removal", "save_lnfree": "removal", "FakeLayerNorm": "removal", "RemovalSchedule": "removal",
}

__all__ = ["LNFreeError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
