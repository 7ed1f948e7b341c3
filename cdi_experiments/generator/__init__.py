"""The deterministic, addressable weight generator (see :mod:`.bits` for the bit contract)."""

from cdi_experiments.generator.bits import GENERATOR_VERSION, gaussian, hash64, u01
from cdi_experiments.generator.core import (
    DEFAULT_CHUNK_ELEMS,
    DeltaSummary,
    TensorInit,
    delta_summary,
    fans,
    generate,
    generate_tensor,
    iter_deltas,
    layer_id_for,
)
from cdi_experiments.generator.facade import DEFAULT_THRESHOLD, DeterministicNoiseGenerator

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "DEFAULT_THRESHOLD",
    "DeltaSummary",
    "GENERATOR_VERSION",
    "DeterministicNoiseGenerator",
    "TensorInit",
    "delta_summary",
    "fans",
    "gaussian",
    "generate",
    "generate_tensor",
    "hash64",
    "iter_deltas",
    "layer_id_for",
    "u01",
]
