"""cdi-experiments: deterministic, addressable weight initialization for training experiments.

Every initial weight is a pure function of (seed, layer, coordinates), so it can be regenerated
at any time: which weights moved, pruning the ones that did not, rewinding to exact init.

``DeterministicInitCallback`` (a Lightning callback) and the module-level helpers
(``init_module``, ``analyze_module``, ``rewind``...) are exported lazily (PEP 562): ``import
cdi_experiments`` does not import pytorch_lightning or pandas until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cdi_experiments.generator import (
    GENERATOR_VERSION,
    DeterministicNoiseGenerator,
    TensorInit,
    layer_id_for,
)

if TYPE_CHECKING:
    from cdi_experiments.lightning.callback import DeterministicInitCallback, InitIdentityError
    from cdi_experiments.modules import (
        InitPlan,
        RecordedPlan,
        analyze_module,
        awakened_masks,
        init_module,
        record_module,
        rewind,
    )

__version__ = "0.1.0"

# name -> the module that defines it, imported on first access
_LAZY = {
    "DeterministicInitCallback": "cdi_experiments.lightning.callback",
    "InitIdentityError": "cdi_experiments.lightning.callback",
    "InitPlan": "cdi_experiments.modules",
    "RecordedPlan": "cdi_experiments.modules",
    "analyze_module": "cdi_experiments.modules",
    "awakened_masks": "cdi_experiments.modules",
    "init_module": "cdi_experiments.modules",
    "record_module": "cdi_experiments.modules",
    "rewind": "cdi_experiments.modules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'cdi_experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "GENERATOR_VERSION",
    "DeterministicInitCallback",
    "DeterministicNoiseGenerator",
    "InitIdentityError",
    "InitPlan",
    "RecordedPlan",
    "TensorInit",
    "__version__",
    "analyze_module",
    "awakened_masks",
    "init_module",
    "layer_id_for",
    "record_module",
    "rewind",
]
