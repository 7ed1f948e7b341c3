"""numpy and torch implementations of the contract in :mod:`cdi_experiments.generator.bits`.

Both evaluate the very same sequence of IEEE operations as the scalar reference (one source,
:func:`_box_muller`, shared through a tiny ops table), so their outputs are bit-identical to it.
Integer hashing uses uint64 in numpy and int64 with masked (logical) right shifts in torch,
which is the same arithmetic modulo 2**64.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from cdi_experiments.generator import bits as B

# ---------------------------------------------------------------------------- numpy hashing

_U = np.uint64


def hash64_np(x: np.ndarray) -> np.ndarray:
    """Vectorized :func:`bits.hash64` on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = x + _U(B.GOLDEN)
        x = (x ^ (x >> _U(30))) * _U(B.MIX1)
        x = (x ^ (x >> _U(27))) * _U(B.MIX2)
        return x ^ (x >> _U(31))


def fold_np(h: np.ndarray, *indices: np.ndarray) -> np.ndarray:
    """Vectorized, broadcasting :func:`bits.fold`."""
    for i in indices:
        h = hash64_np(h ^ hash64_np(i))
    return h


# ---------------------------------------------------------------------------- torch hashing


def _signed(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``x``."""
    x &= B.MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_T_GOLDEN, _T_MIX1, _T_MIX2 = _signed(B.GOLDEN), _signed(B.MIX1), _signed(B.MIX2)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hash64_torch(x: torch.Tensor) -> torch.Tensor:
    """Vectorized :func:`bits.hash64` on int64 tensors (bits as two's complement)."""
    x = x + _T_GOLDEN
    x = (x ^ _lsr(x, 30)) * _T_MIX1
    x = (x ^ _lsr(x, 27)) * _T_MIX2
    return x ^ _lsr(x, 31)


def fold_torch(h: torch.Tensor, *indices: torch.Tensor) -> torch.Tensor:
    """Vectorized, broadcasting :func:`bits.fold` on int64 tensors."""
    for i in indices:
        h = hash64_torch(h ^ hash64_torch(i))
    return h


def as_int64_bits(x: int) -> int:
    """Public alias used by callers building torch index tensors from uint64 values."""
    return _signed(x)


# ---------------------------------------------------------------------------- float part

_NP_OPS = SimpleNamespace(
    f64_bits=lambda x: x.view(np.int64),
    bits_f64=lambda b: b.view(np.float64),
    to_f64=lambda i: i.astype(np.float64),
    where=np.where,
    floor=np.floor,
    sqrt=np.sqrt,
    maximum=np.maximum,
)


def _sqrt_torch(x: torch.Tensor) -> torch.Tensor:
    # ATen's CPU float64 sqrt goes through MKL's vector math, which is not correctly rounded
    # (about 1.4% of inputs differ in the last bit from IEEE sqrt). numpy's sqrt and CUDA's
    # double sqrt are correctly rounded, so CPU tensors take numpy's (zero-copy).
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.numpy()))
    return torch.sqrt(x)


_TORCH_OPS = SimpleNamespace(
    f64_bits=lambda x: x.view(torch.int64),
    bits_f64=lambda b: b.view(torch.float64),
    to_f64=lambda i: i.to(torch.float64),
    where=torch.where,
    floor=torch.floor,
    sqrt=_sqrt_torch,
    maximum=lambda a, b: torch.clamp(a, min=b),
)


def _box_muller(k1f, k2f, ops):
    """Vectorized :func:`bits.box_muller`; ``k1f``, ``k2f`` hold the 53-bit integers as float64.

    Mirrors the scalar reference operation for operation; branches become selects.
    """
    # ---- -2 ln u1
    u1 = ops.maximum(k1f * B.TWO_M53, B.U1_FLOOR)
    b = ops.f64_bits(u1)
    e = ops.to_f64(((b >> 52) & B.EXP_MASK) - 1023)
    m = ops.bits_f64((b & B.MANT_MASK) | B.EXP_ONE)
    big = m > B.SQRT2
    m = ops.where(big, m * 0.5, m)
    e = ops.where(big, e + 1.0, e)
    f = m - 1.0
    s = f / (m + 1.0)
    z = s * s
    p = z * 0.0 + B.LOG_COEF[10]  # broadcast the constant; exact (z is finite)
    for c in B.LOG_COEF[9::-1]:
        p = c + z * p
    t = 2.0 * s
    logm = t + t * (z * p)
    ln_u1 = e * B.LN2_HI + (e * B.LN2_LO + logm)
    r = ops.sqrt(-2.0 * ln_u1)
    # ---- cos(2 pi u2)
    theta = B.TWO_PI * (k2f * B.TWO_M53)
    q = ops.floor(theta * B.INV_PIO2 + 0.5)
    r1 = theta - q * B.PIO2_1
    t2 = q * B.PIO2_2
    x_hi = r1 - t2
    bb = x_hi - r1
    err = (r1 - (x_hi - bb)) + (-t2 - bb)
    x_lo = err - q * B.PIO2_2T
    z = x_hi * x_hi
    pc = z * 0.0 + B.COS_COEF[8]
    for c in B.COS_COEF[7::-1]:
        pc = c + z * pc
    ps = z * 0.0 + B.SIN_COEF[8]
    for c in B.SIN_COEF[7::-1]:
        ps = c + z * ps
    cos_x = 1.0 + (z * pc - x_hi * x_lo)
    sin_x = x_hi + (x_hi * (z * ps) + x_lo)
    quad = ops.where(q == 4.0, 0.0, q)
    c = ops.where(
        quad == 0.0, cos_x, ops.where(quad == 1.0, -sin_x, ops.where(quad == 2.0, -cos_x, sin_x))
    )
    return r * c


def box_muller_np(k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """Gaussian from uint64 arrays of 53-bit integers (numpy backend)."""
    return _box_muller(k1.astype(np.float64), k2.astype(np.float64), _NP_OPS)


def box_muller_torch(k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """Gaussian from int64 tensors of 53-bit integers (torch backend, any device)."""
    return _box_muller(k1.to(torch.float64), k2.to(torch.float64), _TORCH_OPS)


def gaussian_from_state_np(h: np.ndarray) -> np.ndarray:
    """Gaussian for folded coordinate states (uint64), numpy backend."""
    k1 = hash64_np(h ^ _U(B.HASH_SEL_U1)) >> _U(11)
    k2 = hash64_np(h ^ _U(B.HASH_SEL_U2)) >> _U(11)
    return box_muller_np(k1, k2)


def gaussian_from_state_torch(h: torch.Tensor) -> torch.Tensor:
    """Gaussian for folded coordinate states (int64 bits), torch backend."""
    k1 = _lsr(hash64_torch(h ^ _signed(B.HASH_SEL_U1)), 11)
    k2 = _lsr(hash64_torch(h ^ _signed(B.HASH_SEL_U2)), 11)
    return box_muller_torch(k1, k2)


def uniform_from_state_np(h: np.ndarray) -> np.ndarray:
    """u01 of the uniform-scheme selector for folded states, numpy backend."""
    k = hash64_np(h ^ _U(B.HASH_SEL_UNIFORM)) >> _U(11)
    return k.astype(np.float64) * B.TWO_M53


def uniform_from_state_torch(h: torch.Tensor) -> torch.Tensor:
    """u01 of the uniform-scheme selector for folded states, torch backend."""
    k = _lsr(hash64_torch(h ^ _signed(B.HASH_SEL_UNIFORM)), 11)
    return k.to(torch.float64) * B.TWO_M53
