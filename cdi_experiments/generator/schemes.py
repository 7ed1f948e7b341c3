"""Init schemes: plain functions in a registry, looked up by lower-case name.

A scheme turns ``(fan_in, fan_out, params)`` into one of four *kinds* of draw, all from the
generator's addressable streams, so every scheme regenerates exactly:

* ``normal``: ``scale * gaussian(layer, *coords)`` (selectors 0 and 1, Box-Muller);
* ``uniform``: ``low + (high - low) * u01(layer, *coords, 2)`` (selector 2);
* ``constant``: ``value`` everywhere (no draw);
* ``orthogonal``: QR of the whole deterministic standard-normal matrix, signs fixed so
  ``diag(R) > 0`` (Saxe et al. 2014, https://arxiv.org/abs/1312.6120), times ``gain``.

LSUV (Mishkin & Matas 2016, https://arxiv.org/abs/1511.06422) is ``orthogonal`` plus a
per-layer scale fitted on a data batch; it lives in :mod:`cdi_experiments.modules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("normal", "uniform", "constant", "orthogonal")


@dataclass(frozen=True)
class Draw:
    """What to generate for one tensor: a kind and its numbers."""

    kind: str
    std: float = 0.0  # normal
    low: float = 0.0  # uniform
    high: float = 0.0  # uniform
    value: float = 0.0  # constant
    gain: float = 1.0  # orthogonal


@dataclass(frozen=True)
class Scheme:
    """A named init scheme: its draw as a function of fans and parameters."""

    name: str
    draw: Callable[[int, int, Mapping[str, Any]], Draw]
    doc: str
    params: tuple[str, ...] = field(default=())
    bias: str = "zeros"  # "zeros", or the scheme's own draw (addressable bias)


def _positive_fan(fan: int, what: str) -> int:
    if fan <= 0:
        raise ValueError(f"{what} must be a positive integer, got {fan}")
    return fan


def _param(params: Mapping[str, Any], key: str, default: float | None, scheme: str) -> float:
    value = params.get(key, default)
    if value is None:
        raise ValueError(f"init scheme '{scheme}' needs parameter '{key}'; pass {key}=<number>")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"init scheme '{scheme}': parameter '{key}' must be finite, got {value}")
    return value


def _normal(std_fn: Callable[[int, int], float]) -> Callable[[int, int, Mapping[str, Any]], Draw]:
    return lambda fi, fo, p: Draw("normal", std=std_fn(fi, fo))


def _uniform(
    bound_fn: Callable[[int, int], float],
) -> Callable[[int, int, Mapping[str, Any]], Draw]:
    def draw(fi: int, fo: int, p: Mapping[str, Any]) -> Draw:
        b = bound_fn(fi, fo)
        return Draw("uniform", low=-b, high=b)

    return draw


def _fixed_uniform(fi: int, fo: int, p: Mapping[str, Any]) -> Draw:
    low = _param(p, "low", 0.0, "uniform")
    high = _param(p, "high", 1.0, "uniform")
    if not low < high:
        raise ValueError(f"init scheme 'uniform' needs low < high, got low={low}, high={high}")
    return Draw("uniform", low=low, high=high)


def _custom(fi: int, fo: int, p: Mapping[str, Any]) -> Draw:
    # The original tool's "custom" mode: 1/sqrt(fan_in) (Transformer Q/K/V at 1/sqrt(d_model)).
    std = _param(p, "std", 1.0 / math.sqrt(fi), "custom")
    if std < 0:
        raise ValueError(f"init scheme 'custom': std must be >= 0, got {std}")
    return Draw("normal", std=std)


def _orthogonal(fi: int, fo: int, p: Mapping[str, Any]) -> Draw:
    return Draw("orthogonal", gain=_param(p, "gain", 1.0, "orthogonal"))


def _constant(fi: int, fo: int, p: Mapping[str, Any]) -> Draw:
    return Draw("constant", value=_param(p, "value", None, "constant"))


_SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme, *aliases: str) -> Scheme:
    """Add a scheme (and aliases) to the registry."""
    for name in (scheme.name, *aliases):
        _SCHEMES[name] = scheme
    return scheme


register(Scheme("zeros", lambda fi, fo, p: Draw("constant", value=0.0), "all zeros"))
register(Scheme("ones", lambda fi, fo, p: Draw("constant", value=1.0), "all ones"))
register(Scheme("constant", _constant, "constant `value`", params=("value",)))
register(Scheme("uniform", _fixed_uniform, "U[low, high], default [0, 1]", params=("low", "high")))
register(
    Scheme("uniform_fan_in", _uniform(lambda fi, fo: 1.0 / math.sqrt(fi)), "U(+-1/sqrt(fan_in))")
)
register(Scheme("normal_fan_in", _normal(lambda fi, fo: 1.0 / math.sqrt(fi)), "N(0, 1/fan_in)"))
register(
    Scheme(
        "he", _normal(lambda fi, fo: math.sqrt(2.0 / fi)), "He/Kaiming normal, std sqrt(2/fan_in)"
    ),
    "he_normal",
    "kaiming",
    "kaiming_normal",
)
register(
    Scheme(
        "he_uniform", _uniform(lambda fi, fo: math.sqrt(6.0 / fi)), "He uniform, +-sqrt(6/fan_in)"
    ),
    "kaiming_uniform",
)
register(
    Scheme(
        "xavier",
        _normal(lambda fi, fo: math.sqrt(2.0 / (fi + fo))),
        "Xavier/Glorot normal, std sqrt(2/(fan_in+fan_out))",
    ),
    "xavier_normal",
    "glorot",
    "glorot_normal",
)
register(
    Scheme(
        "xavier_uniform",
        _uniform(lambda fi, fo: math.sqrt(6.0 / (fi + fo))),
        "Xavier/Glorot uniform, +-sqrt(6/(fan_in+fan_out))",
    ),
    "glorot_uniform",
)
register(
    Scheme(
        "lecun", _normal(lambda fi, fo: math.sqrt(1.0 / fi)), "LeCun normal, std sqrt(1/fan_in)"
    ),
    "lecun_normal",
)
register(
    Scheme(
        "lecun_uniform",
        _uniform(lambda fi, fo: math.sqrt(3.0 / fi)),
        "LeCun uniform, +-sqrt(3/fan_in)",
    )
)
register(Scheme("orthogonal", _orthogonal, "QR of a deterministic Gaussian, times gain", ("gain",)))
register(
    Scheme(
        "torch_default",
        # nn.Linear/Conv: kaiming_uniform_(a=sqrt(5)) -> bound 1/sqrt(fan_in); bias the same.
        _uniform(lambda fi, fo: 1.0 / math.sqrt(fi)),
        "torch nn.Linear/Conv default: U(+-1/sqrt(fan_in)), bias too",
        bias="self",
    ),
    "pytorch_default",
)
register(
    Scheme(
        "keras_default",
        _uniform(lambda fi, fo: math.sqrt(6.0 / (fi + fo))),
        "Keras default: glorot_uniform, zero bias",
    )
)
register(Scheme("custom", _custom, "N(0, std^2), std default 1/sqrt(fan_in)", ("std",)))


def names() -> list[str]:
    """Canonical scheme names (aliases excluded), in registry order."""
    seen: list[str] = []
    for s in _SCHEMES.values():
        if s.name not in seen:
            seen.append(s.name)
    return seen


def get(name: str) -> Scheme:
    """Look a scheme up by name or alias (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = str(name).lower()
    if key not in _SCHEMES:
        raise ValueError(
            f"unknown init scheme '{name}'; choose one of: {', '.join(names())} (or 'lsuv' for modules)"
        )
    return _SCHEMES[key]


def resolve(name: str, fan_in: int, fan_out: int, params: Mapping[str, Any] | None = None) -> Draw:
    """The :class:`Draw` a scheme makes for a tensor with these fans."""
    scheme = get(name)
    _positive_fan(fan_in, "fan_in")
    _positive_fan(fan_out, "fan_out")
    params = dict(params or {})
    unknown = set(params) - set(scheme.params)
    if unknown:
        allowed = ", ".join(scheme.params) or "none"
        raise ValueError(
            f"init scheme '{scheme.name}' takes parameters [{allowed}], got {sorted(unknown)}"
        )
    return scheme.draw(fan_in, fan_out, params)


def target_std(draw: Draw) -> float:
    """Theoretical standard deviation of the values a draw produces (orthogonal: per element
    of a square matrix is ``gain / sqrt(n)``, which needs the shape, so it returns ``nan``)."""
    if draw.kind == "normal":
        return draw.std
    if draw.kind == "uniform":
        return (draw.high - draw.low) / math.sqrt(12.0)
    if draw.kind == "constant":
        return 0.0
    return float("nan")


def target_mean(draw: Draw) -> float:
    """Theoretical mean of the values a draw produces."""
    if draw.kind == "uniform":
        return 0.5 * (draw.low + draw.high)
    if draw.kind == "constant":
        return draw.value
    return 0.0
