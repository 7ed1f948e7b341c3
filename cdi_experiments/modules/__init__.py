"""Module-level init and analysis: deterministic init of whole ``nn.Module``s, and how far
each parameter moved from its regenerated initial value."""

from cdi_experiments.modules.analysis import (
    DELTA_EDGES,
    DeltaStats,
    analyze_module,
    awakened_masks,
    param_deltas,
    rewind,
)
from cdi_experiments.modules.initialize import LAYER_ID_MODES, init_module
from cdi_experiments.modules.plan import Block, InitPlan, tensors_sha256

__all__ = [
    "DELTA_EDGES",
    "LAYER_ID_MODES",
    "Block",
    "DeltaStats",
    "InitPlan",
    "analyze_module",
    "awakened_masks",
    "init_module",
    "param_deltas",
    "rewind",
    "tensors_sha256",
]
