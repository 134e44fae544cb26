"""The paper's interpretability findings beyond DLA, as functions (arXiv 2507.02559, section 5).

One module per capability, each working on every backend through the seam
([`get_backend`][lnfree_interp.backends.get_backend]):

* `entropy_neurons` - entropy-neuron scores from the unembedding's null space, mean ablation;
* `sinks` - attention-sink rate and first-token residual norms;
* `calibration` - expected calibration error, entropy, JSD / KL between two models;
* `windows` - the token windows of a text that all of them use.
"""

from .calibration import (
                          CalibrationReport,
                          DivergenceReport,
                          calibration,
                          check_same_vocabulary,
                          expected_calibration_error,
                          output_divergence,
)
from .entropy_neurons import NeuronAblation, entropy_neuron_scores, neuron_ablation, null_space, unembedding_spectrum
from .sinks import SinkReport, attention_sinks, first_token_analysis, residual_norms
from .windows import token_windows

__all__ = [
    "CalibrationReport", "DivergenceReport", "calibration", "check_same_vocabulary", "expected_calibration_error",
    "output_divergence", "NeuronAblation", "entropy_neuron_scores", "neuron_ablation", "null_space",
    "unembedding_spectrum", "SinkReport", "attention_sinks", "first_token_analysis", "residual_norms", "token_windows",
]
