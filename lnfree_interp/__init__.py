"""lnfree_interp: exact interpretability tooling for LayerNorm-free GPT-2.

Loaders undo the LN-free hack (eps = 1e12, weight x 1e6; arXiv 2507.02559) and fold it into the
weights, giving models with identity LayerNorms in HF, TransformerLens and nnsight; the attribution
functions use the exactness that buys (direct logit attribution = direct effect).

    >>> from lnfree_interp import load_hooked, direct_logit_attribution
    >>> model = load_hooked("tiny-shakespeare-lnfree")
    >>> dla = direct_logit_attribution(model, "ROMEO:\\nI will", answer=" not", wrong=" be")
    >>> dla.top(5)

TransformerLens and nnsight are imported only when a function needs them.
"""

__version__ = "0.2.0"

from .analyses import (CalibrationReport, DivergenceReport, NeuronAblation, SinkReport, attention_sinks, calibration,
                       entropy_neuron_scores, expected_calibration_error, neuron_ablation, null_space, output_divergence,
                       residual_norms)
from .circuits import edge_attribution, edge_patching
from .faithfulness import evaluate_circuit, faithfulness_curve
from .graph import Graph
from .checkpoints import CheckpointInfo, inspect_checkpoint
from .registry import KnownCheckpoint, list_checkpoints
from .edge_results import EdgeResult
from .dla import compare_dla_direct_effect, direct_effect, direct_logit_attribution
from .errors import LNFreeError
from .evaluation import LossReport, evaluate_loss
from .fold import fold_state_dict
from .induction import InductionResult, induction_score
from .case_study import InductionCaseStudy, induction_case_study
from .ioi import IOIPrompts, ioi_prompts
from .lens import AttentionScores, LensResult, attention_scores, logit_lens
from .loaders import load_hf, load_hooked, load_nnsight, load_unified
from .verification import Verification, verify
from .metrics import logit_diff, logprob
from .nodes import Edge, Node, n_edges
from .patching import activation_patching, attribution_patching, compare_attribution
from .removal import FakeLayerNorm, RemovalSchedule, remove_layernorm, save_lnfree
from .report import ModelComparison, compare_models
from .results import AttributionResult, Comparison

__all__ = [
    "LNFreeError",
    # loading
    "load_hf", "load_hooked", "load_nnsight", "load_unified", "verify", "Verification",
    "inspect_checkpoint", "CheckpointInfo", "list_checkpoints", "KnownCheckpoint", "fold_state_dict",
    # circuits
    "edge_attribution", "edge_patching", "evaluate_circuit", "faithfulness_curve", "EdgeResult", "Graph",
    "Node", "Edge", "n_edges", "logit_lens", "LensResult", "attention_scores", "AttentionScores",
    # attribution
    "direct_logit_attribution", "direct_effect", "compare_dla_direct_effect",
    "attribution_patching", "activation_patching", "compare_attribution", "logit_diff", "logprob",
    "AttributionResult", "Comparison", "ioi_prompts", "IOIPrompts",
    # models
    "evaluate_loss", "LossReport", "remove_layernorm", "save_lnfree", "FakeLayerNorm", "RemovalSchedule",
    # the paper's other findings (lnfree_interp.analyses) and the comparison report
    "entropy_neuron_scores", "neuron_ablation", "null_space", "NeuronAblation", "attention_sinks", "SinkReport",
    "residual_norms", "calibration", "CalibrationReport", "expected_calibration_error", "output_divergence",
    "DivergenceReport", "compare_models", "ModelComparison",
    # circuits in the embedded models
    "induction_score", "InductionResult", "induction_case_study", "InductionCaseStudy",
]
