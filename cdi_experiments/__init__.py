"""cdi-experiments: deterministic, addressable weight initialization for training experiments.

Every initial weight is a pure function of (seed, layer, coordinates), so it can be regenerated
at any time: which weights moved, pruning the ones that did not, rewinding to exact init.
"""

from cdi_experiments.generator import (
    GENERATOR_VERSION,
    DeterministicNoiseGenerator,
    TensorInit,
    layer_id_for,
)

__version__ = "0.1.0"

__all__ = [
    "GENERATOR_VERSION",
    "DeterministicNoiseGenerator",
    "TensorInit",
    "__version__",
    "layer_id_for",
]
