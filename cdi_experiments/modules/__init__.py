"""Module-level init and analysis: deterministic init of whole ``nn.Module``s (or a record of
an init made elsewhere), canonical parameter names through wrappers, and how far each
parameter moved from its initial value."""

from cdi_experiments.modules.analysis import (
    DEFAULT_QUANTILES,
    DEFAULT_THRESHOLDS,
    DELTA_EDGES,
    DeltaStats,
    analyze_module,
    awakened_masks,
    delta_stats,
    param_deltas,
    rewind,
)
from cdi_experiments.modules.initialize import LAYER_ID_MODES, init_module, record_module
from cdi_experiments.modules.naming import (
    actual_name,
    canonical_name,
    canonical_named_modules,
    canonical_named_parameters,
)
from cdi_experiments.modules.plan import (
    Block,
    InitPlan,
    Plan,
    RecordedPlan,
    plan_from_dict,
    tensors_sha256,
)

__all__ = [
    "DEFAULT_QUANTILES",
    "DEFAULT_THRESHOLDS",
    "DELTA_EDGES",
    "LAYER_ID_MODES",
    "Block",
    "DeltaStats",
    "InitPlan",
    "Plan",
    "RecordedPlan",
    "actual_name",
    "analyze_module",
    "awakened_masks",
    "canonical_name",
    "canonical_named_modules",
    "canonical_named_parameters",
    "delta_stats",
    "init_module",
    "param_deltas",
    "plan_from_dict",
    "record_module",
    "rewind",
    "tensors_sha256",
]
