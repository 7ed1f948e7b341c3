"""Init schemes against their theory: every registered scheme's values have the mean, spread,
bounds and shape of distribution its formula promises; aliases are the same scheme; the
orthogonal draws are orthogonal with the sign fix; conv kernels are zero-mean per filter; and
``torch_default`` / ``keras_default`` are what those frameworks do.

The expected formulas are written out here independently of ``schemes.py``, so a typo in the
registry fails a test. Tolerances come from the sample size: 6 standard errors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cdi_experiments.generator import core, schemes
from cdi_experiments.generator.facade import DeterministicNoiseGenerator

SHAPE = (512, 1024)  # torch layout (out, in)
FAN_IN, FAN_OUT = 1024, 512
N = SHAPE[0] * SHAPE[1]
Z = 6.0  # standard errors allowed


def _u(bound: float) -> tuple[str, float, float]:
    return ("uniform", -bound, bound)


# name -> (kind, numbers) from the papers / frameworks, for fan_in = 1024, fan_out = 512
THEORY: dict[str, tuple[Any, ...]] = {
    "zeros": ("constant", 0.0),
    "ones": ("constant", 1.0),
    "constant": ("constant", 0.25),
    "uniform": ("uniform", 0.0, 1.0),
    "uniform_fan_in": _u(1 / math.sqrt(FAN_IN)),
    "normal_fan_in": ("normal", 1 / math.sqrt(FAN_IN)),
    "he": ("normal", math.sqrt(2 / FAN_IN)),  # He et al. 2015
    "he_uniform": _u(math.sqrt(6 / FAN_IN)),
    "xavier": ("normal", math.sqrt(2 / (FAN_IN + FAN_OUT))),  # Glorot & Bengio 2010
    "xavier_uniform": _u(math.sqrt(6 / (FAN_IN + FAN_OUT))),
    "lecun": ("normal", math.sqrt(1 / FAN_IN)),  # LeCun et al. 1998
    "lecun_uniform": _u(math.sqrt(3 / FAN_IN)),
    "orthogonal": ("orthogonal", 1.0),
    "torch_default": _u(1 / math.sqrt(FAN_IN)),
    "keras_default": _u(math.sqrt(6 / (FAN_IN + FAN_OUT))),
    "custom": ("normal", 1 / math.sqrt(FAN_IN)),  # the original tool's default std
}
PARAMS = {"constant": {"value": 0.25}}


def _phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ks_statistic(sample: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance between a sample and a continuous CDF."""
    x = np.sort(sample.ravel())
    f = cdf(x)
    n = x.size
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


KS_CRIT = math.sqrt(-math.log(1e-6 / 2) / (2 * N))  # p = 1e-6


def test_theory_table_covers_the_registry() -> None:
    assert set(THEORY) == set(schemes.names())
    assert len(schemes.names()) == len(set(schemes.names()))


@pytest.mark.parametrize("name", list(THEORY))
def test_scheme_matches_its_theory(name: str) -> None:
    kind, *nums = THEORY[name]
    params = PARAMS.get(name, {})
    draw = schemes.resolve(name, FAN_IN, FAN_OUT, params)
    assert draw.kind == kind
    gen = DeterministicNoiseGenerator(2024)
    w = gen.init_matrix(9, SHAPE, name, dtype=np.float64, **params)
    w32 = gen.init_matrix(9, SHAPE, name, dtype=np.float32, **params)
    assert w.shape == w32.shape == SHAPE
    assert np.array_equal(w32, w.astype(np.float32))
    mean, std = float(w.mean()), float(w.std())

    if kind == "constant":
        (value,) = nums
        assert draw.value == value
        assert (w == value).all() and (w32 == np.float32(value)).all()
        assert schemes.target_mean(draw) == value and schemes.target_std(draw) == 0.0
        return
    if kind == "orthogonal":
        assert draw.gain == nums[0]
        assert math.isnan(schemes.target_std(draw))
        # a semi-orthogonal (r, c) matrix has element RMS gain / sqrt(max(r, c))
        assert math.sqrt(float((w**2).mean())) == pytest.approx(1 / math.sqrt(max(SHAPE)), 1e-12)
        assert np.abs(w @ w.T - np.eye(SHAPE[0])).max() < 1e-10  # rows orthonormal (wide)
        return

    if kind == "normal":
        (sigma,) = nums
        assert draw.std == pytest.approx(sigma, rel=1e-15)
        kurt, std_se = 3.0, sigma / math.sqrt(2 * N)
        assert ks_statistic(w / sigma, _phi) < KS_CRIT
    else:
        low, high = nums
        assert (draw.low, draw.high) == pytest.approx((low, high), rel=1e-15)
        sigma = (high - low) / math.sqrt(12)
        kurt, std_se = 1.8, sigma * math.sqrt((1.8 - 1) / (4 * N))
        # bounds: [low, high) in float64; float32 rounding is monotone, so within the
        # float32-rounded bounds (it can reach them)
        assert w.min() >= low and w.max() < high
        assert w32.min() >= np.float32(low) and w32.max() <= np.float32(high)
        width = high - low
        assert w.min() < low + 1e-4 * width and w.max() > high - 1e-4 * width  # fills it
        assert ks_statistic((w - low) / width, lambda x: x) < KS_CRIT
    assert schemes.target_mean(draw) == pytest.approx(
        0.5 * (nums[0] + nums[-1]) if kind == "uniform" else 0.0
    )
    assert schemes.target_std(draw) == pytest.approx(sigma, rel=1e-12)
    assert abs(mean - schemes.target_mean(draw)) < Z * sigma / math.sqrt(N)
    assert abs(std - sigma) < Z * std_se
    # shape of the distribution: kurtosis 3 (normal) or 1.8 (uniform); SE <= sqrt(24 / N)
    k = float((((w - mean) / std) ** 4).mean())
    assert abs(k - kurt) < Z * math.sqrt(24 / N)


ALIASES = {
    "he": ["he_normal", "kaiming", "kaiming_normal", "HE", "Kaiming_Normal"],
    "he_uniform": ["kaiming_uniform"],
    "xavier": ["xavier_normal", "glorot", "glorot_normal"],
    "xavier_uniform": ["glorot_uniform", "Glorot_Uniform"],
    "lecun": ["lecun_normal"],
    "torch_default": ["pytorch_default"],
}


@pytest.mark.parametrize("canonical", list(ALIASES))
def test_aliases_are_the_same_scheme(canonical: str) -> None:
    gen = DeterministicNoiseGenerator(3)
    want = gen.init_matrix(1, (64, 96), canonical, dtype=np.float64)
    for alias in ALIASES[canonical]:
        assert schemes.get(alias) is schemes.get(canonical)
        assert alias not in schemes.names()
        assert np.array_equal(gen.init_matrix(1, (64, 96), alias, dtype=np.float64), want)


def test_keras_default_is_glorot_uniform() -> None:
    for fans in [(1024, 512), (3, 7), (288, 64)]:
        assert schemes.resolve("keras_default", *fans) == schemes.resolve("glorot_uniform", *fans)
    gen = DeterministicNoiseGenerator(3)
    assert np.array_equal(
        gen.init_matrix(2, (40, 30), "keras_default"),
        gen.init_matrix(2, (40, 30), "glorot_uniform"),
    )
    assert schemes.get("keras_default").bias == "zeros"  # Keras: zero bias


def test_uniform_default_and_custom_interval() -> None:
    gen = DeterministicNoiseGenerator(4)
    d = gen.init_matrix(0, SHAPE, "uniform", dtype=np.float64)
    assert 0.0 <= d.min() < 1e-4 and 1 - 1e-4 < d.max() < 1.0
    c = gen.init_matrix(0, SHAPE, "uniform", dtype=np.float64, low=-3.0, high=5.0)
    assert -3.0 <= c.min() and c.max() < 5.0
    assert abs(c.mean() - 1.0) < Z * (8 / math.sqrt(12)) / math.sqrt(N)
    # the same uniform stream, rescaled: low + (high - low) * u
    assert np.array_equal(c, -3.0 + 8.0 * d)


def test_custom_std() -> None:
    gen = DeterministicNoiseGenerator(4)
    w = gen.init_matrix(0, SHAPE, std=0.05, dtype=np.float64)
    assert abs(w.std() - 0.05) < Z * 0.05 / math.sqrt(2 * N)
    assert np.array_equal(w, gen.init_matrix(0, SHAPE, "custom", dtype=np.float64, std=0.05))
    # custom's default std 1/sqrt(fan_in) is normal_fan_in's, on the same Gaussian stream
    assert np.array_equal(
        gen.init_matrix(0, SHAPE, "custom"), gen.init_matrix(0, SHAPE, "normal_fan_in")
    )
    # every normal scheme is a multiple of the same standard normals
    z = gen.init_matrix(0, SHAPE, std=1.0, dtype=np.float64)
    assert np.array_equal(
        gen.init_matrix(0, SHAPE, "he", dtype=np.float64), math.sqrt(2 / 1024) * z
    )
    zero = gen.init_matrix(0, (8, 8), std=0.0, dtype=np.float64)
    assert not zero.any()


# ------------------------------------------------------------------------------ orthogonal


def _check_orthogonal(q: np.ndarray, gain: float, tol: float) -> None:
    rows, cols = q.shape[0], math.prod(q.shape[1:])
    m = q.reshape(rows, cols)
    gram = m.T @ m if rows >= cols else m @ m.T
    assert np.abs(gram - gain**2 * np.eye(min(rows, cols))).max() < tol
    s = np.linalg.svd(m, compute_uv=False)
    assert s.max() / s.min() < 1 + tol  # condition number 1


@pytest.mark.parametrize("shape", [(128, 128), (256, 64), (64, 256), (16, 8, 3, 3)])
def test_orthogonal(shape: tuple[int, ...]) -> None:
    gen = DeterministicNoiseGenerator(11)
    q = gen.init_matrix(6, shape, "orthogonal", dtype=np.float64)
    _check_orthogonal(q, 1.0, 1e-10)
    _check_orthogonal(gen.init_matrix(6, shape, "orthogonal", dtype=np.float32), 1.0, 1e-6)
    _check_orthogonal(
        gen.init_matrix(6, shape, "orthogonal", dtype=np.float64, gain=2.5), 2.5, 1e-9
    )

    # it is the Q of the deterministic standard-normal matrix, with diag(R) > 0 (Saxe et al.)
    rows, cols = shape[0], math.prod(shape[1:])
    a = gen.init_matrix(6, (rows, cols), std=1.0, dtype=np.float64)
    m = q.reshape(rows, cols)
    tall_q, tall_a = (m, a) if rows >= cols else (m.T, a.T)
    r = tall_q.T @ tall_a  # = R when tall_a = tall_q R
    assert np.abs(np.tril(r, -1)).max() < 1e-9 * np.abs(r).max()
    assert (np.diag(r) > 0).all()
    # recomputed with numpy's QR and the sign fix
    q_np, r_np = np.linalg.qr(tall_a)
    q_np = q_np * np.sign(np.diag(r_np))[None, :]
    assert np.abs(q_np - tall_q).max() < 1e-12


def test_orthogonal_rescaled_to_the_modes_std() -> None:
    gen = DeterministicNoiseGenerator(12)
    for shape in [(128, 256), (256, 128), (128, 128)]:
        for mode in ("he", "xavier_uniform", "lecun"):
            draw = schemes.resolve(mode, *core.fans(shape))
            w = gen.init_matrix(0, shape, mode, orthogonal=True, dtype=np.float64)
            assert math.sqrt(float((w**2).mean())) == pytest.approx(schemes.target_std(draw), 1e-12)
            s = np.linalg.svd(w, compute_uv=False)
            assert s.max() / s.min() < 1 + 1e-6
            # all singular values equal gain = std * sqrt(max(r, c))
            assert s == pytest.approx(schemes.target_std(draw) * math.sqrt(max(shape)), rel=1e-10)
    plain = gen.init_matrix(0, (128, 128), "he", dtype=np.float64)
    assert np.linalg.cond(plain) > 10  # a random square Gaussian is far from orthogonal


# ------------------------------------------------------------------------------ conv kernels


@pytest.mark.parametrize("mode", ["he", "he_uniform", "xavier"])
def test_conv_kernel_zero_mean_per_filter(mode: str) -> None:
    gen = DeterministicNoiseGenerator(13)
    shape = (64, 32, 3, 3)  # fan_in = 288, fan_out = 576
    k32 = gen.init_conv_kernel(2, shape, mode)
    k64 = gen.init_conv_kernel(2, shape, mode, dtype=np.float64)
    assert k32.dtype == np.float32 and k64.dtype == np.float64
    assert np.abs(k32.astype(np.float64).mean(axis=(1, 2, 3))).max() < 1e-6
    assert np.abs(k64.mean(axis=(1, 2, 3))).max() < 1e-15
    sigma = schemes.target_std(schemes.resolve(mode, 288, 576))
    per_filter = 32 * 3 * 3
    expected = sigma * math.sqrt(1 - 1 / per_filter)  # centring removes one degree of freedom
    n = k64.size
    kurt = 3.0 if "uniform" not in mode else 1.8
    assert abs(k64.std() - expected) < Z * sigma * math.sqrt((kurt - 1) / (4 * n))


# ------------------------------------------------------------------------------ torch's own


@pytest.mark.parametrize(
    "module",
    [nn.Linear(1024, 512), nn.Linear(10, 3), nn.Conv2d(8, 16, 3), nn.Conv1d(4, 6, 5)],
    ids=["linear_1024_512", "linear_10_3", "conv2d", "conv1d"],
)
def test_torch_default_is_torchs_reset_parameters(module: nn.Module) -> None:
    torch.manual_seed(0)
    module.reset_parameters()
    w_t = module.weight.detach().numpy()
    shape = tuple(w_t.shape)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
    assert core.fans(shape) == (fan_in, fan_out)
    # kaiming_uniform_(a=sqrt(5)): bound = sqrt(3) * gain / sqrt(fan_in) = 1 / sqrt(fan_in)
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    draw = schemes.resolve("torch_default", fan_in, fan_out)
    assert draw.high == pytest.approx(bound, rel=1e-12) and draw.low == -draw.high
    assert schemes.get("torch_default").bias == "self"
    bias_bound = 1 / math.sqrt(fan_in)
    assert np.abs(module.bias.detach().numpy()).max() <= bias_bound
    ours = DeterministicNoiseGenerator(0).init_matrix(0, shape, "torch_default")
    for w in (w_t, ours):
        assert np.abs(w).max() <= np.float32(draw.high)
    if w_t.size >= 100_000:  # same distribution: both fill [-b, b] with the same spread
        for w in (w_t, ours):
            assert np.abs(w).max() > 0.999 * draw.high
            assert abs(w.std() - draw.high / math.sqrt(3)) < Z * draw.high * math.sqrt(0.2 / w.size)


def test_fans_follow_torch() -> None:
    for shape in [(5, 3), (16, 8, 3, 3), (6, 4, 5), (2, 3, 4, 5, 6)]:
        t = torch.empty(shape)
        assert core.fans(shape) == nn.init._calculate_fan_in_and_fan_out(t)
    assert core.fans((7,)) == (7, 7)  # vectors (torch refuses them)


def test_resolve_validates_fans() -> None:
    with pytest.raises(ValueError, match="^fan_out must be a positive integer, got 0$"):
        schemes.resolve("he", 4, 0)
